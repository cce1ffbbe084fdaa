import gzip
import shutil

import numpy as np
import pytest
import tensorflow as tf

from kd_keras import data

# The label counts printed in the MNIST README.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def label_counts(dataset):
    _, labels = data.to_arrays(dataset)
    return np.bincount(labels, minlength=10).tolist()


@pytest.mark.slow
def test_imported_mnist_loads_through_tfds_with_no_network(mnist_data_dir):
    test = data.load(
        "mnist", "test", data_dir=mnist_data_dir, batch_size=1000, download=False
    )
    images, labels = data.to_arrays(test)
    assert images.shape == (10_000, 28, 28, 1)
    assert images.dtype == np.float32
    assert 0.0 == images.min() and images.max() == 1.0
    assert np.bincount(labels).tolist() == TEST_COUNTS


@pytest.mark.slow
def test_imported_mnist_train_split_has_the_published_label_counts(mnist_data_dir):
    train = data.load(
        "mnist", "train", data_dir=mnist_data_dir, batch_size=5000, download=False
    )
    assert label_counts(train) == TRAIN_COUNTS


@pytest.mark.slow
def test_import_is_idempotent(shared_mnist, mnist_data_dir):
    assert data.import_mnist(shared_mnist, mnist_data_dir) == {
        "train": 60_000,
        "test": 10_000,
    }


@pytest.mark.slow
def test_tfds_split_slicing_works_on_imported_data(mnist_data_dir):
    part = data.load(
        "mnist", "train[:1%]", data_dir=mnist_data_dir, download=False, batch_size=100
    )
    images, _ = data.to_arrays(part)
    assert len(images) == 600


def test_loading_missing_data_without_download_names_the_import(tmp_path):
    with pytest.raises(ValueError, match="kd-keras data"):
        data.load("mnist", "test", data_dir=tmp_path, download=False)


def test_read_idx_matches_the_header_and_rejects_other_files(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "small-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + b"".join(
        d.to_bytes(4, "big") for d in images.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(data.read_idx(path), images)
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(bad)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(header + images.tobytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(truncated)


def test_import_names_the_missing_files(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        data.import_mnist(tmp_path, tmp_path / "tfds")


def as_pairs(images, labels):
    """The (label, image bytes) pairs of a split, in a fixed order: tfds
    stores the examples in an order of its own."""
    return sorted(zip(labels.tolist(), [i.tobytes() for i in images], strict=True))


def test_an_idx_set_imported_as_fashion_mnist_loads_by_that_name(
    small_idx_set, tmp_path
):
    folder, arrays = small_idx_set
    counts = data.import_idx(folder, tmp_path / "tfds", name="fashion_mnist")
    assert counts == {"train": 20, "test": 10}
    train = data.load(
        "fashion_mnist", "train", data_dir=tmp_path / "tfds", download=False
    )
    images, labels = data.to_arrays(train)
    pixels = np.round(images[..., 0] * 255).astype(np.uint8)
    assert as_pairs(pixels, labels) == as_pairs(*arrays["train"])


def test_import_idx_refuses_names_it_cannot_import(small_idx_set, tmp_path):
    folder, _ = small_idx_set
    with pytest.raises(ValueError, match="'mnist', 'fashion_mnist'.*name='kmnist'"):
        data.import_idx(folder, tmp_path / "tfds", name="kmnist")


@pytest.mark.slow
@pytest.mark.parametrize(
    "real, name, fix",
    [("mnist", "fashion_mnist", "mnist"), ("fashion_mnist", "mnist", "fashion_mnist")],
)
def test_the_real_set_under_the_other_name_is_refused_naming_the_fix(
    real, name, fix, small_idx_set, shared_mnist, tmp_path
):
    # The labels tell the sets apart and are checked first, so the small
    # label file of the real set stands in for the whole set.
    labels = shared_mnist.parent / real / "train-labels-idx1-ubyte.gz"
    if not labels.is_file():
        pytest.skip(f"{labels} is missing")
    folder, _ = small_idx_set
    shutil.copy(labels, folder / labels.name)
    with pytest.raises(ValueError, match=f"name={name!r}.*with name={fix!r}"):
        data.import_idx(folder, tmp_path / "tfds", name=name)


def test_loading_missing_fashion_mnist_names_its_import(tmp_path):
    with pytest.raises(ValueError, match="kd-keras data --name fashion_mnist"):
        data.load("fashion_mnist", "test", data_dir=tmp_path, download=False)


@pytest.mark.slow
def test_sample_is_a_small_real_mnist_subset(shared_mnist):
    (x_train, y_train), (x_test, y_test) = data.sample()
    assert x_train.shape == (8000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (2000, 28, 28)
    assert set(np.unique(y_train)) == set(range(10))
    assert data.SAMPLE_PATH.stat().st_size <= 2 * 1024 * 1024
    if shared_mnist.is_dir():
        full = data.read_idx(shared_mnist / "t10k-images-idx3-ubyte.gz")
        np.testing.assert_array_equal(x_test, full[:2000])


def test_sample_loads_by_name_as_normalised_batches():
    batches = data.load("mnist_sample", "test", batch_size=500)
    images, labels = data.to_arrays(batches)
    assert images.shape == (2000, 28, 28, 1) and labels.dtype == np.int32
    assert images.max() == 1.0


def test_jitter_shifts_each_image_by_at_most_two_pixels():
    image = np.zeros((64, 28, 28, 1), "float32")
    image[:, 14, 14, 0] = 1.0
    dataset = tf.data.Dataset.from_tensors((image, np.zeros(64, "int32")))
    ((shifted, _),) = data.jitter(dataset, max_shift=2, seed=1).as_numpy_iterator()
    rows, cols = [], []
    for picture in shifted[..., 0]:
        assert picture.sum() == pytest.approx(1.0)
        r, c = np.argwhere(picture == 1.0)[0]
        rows.append(r - 14)
        cols.append(c - 14)
    assert max(map(abs, rows + cols)) <= 2
    assert len(set(zip(rows, cols, strict=True))) > 5


def test_filter_classes_drops_and_keeps_classes():
    x = np.zeros((10, 2), "float32")
    y = np.arange(10) % 5
    examples = tf.data.Dataset.from_tensor_slices((x, y))
    dropped = [int(b) for _, b in data.filter_classes(examples, drop=[3])]
    kept = [int(b) for _, b in data.filter_classes(examples, keep=[1, 2])]
    assert 3 not in dropped and len(dropped) == 8
    assert sorted(set(kept)) == [1, 2] and len(kept) == 4


def test_pipeline_filters_limits_and_batches():
    (x, y), _ = data.sample()
    batches = data.pipeline((x, y), batch_size=100, drop_classes=[3], limit=1000)
    images, labels = data.to_arrays(batches)
    assert len(labels) == 1000 and 3 not in labels
    assert images.shape[1:] == (28, 28, 1)
