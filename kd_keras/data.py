"""Data: tensorflow-datasets loading, offline import of MNIST-format IDX
sets (MNIST, Fashion-MNIST), the shipped sample, jitter, class filters, and
batches of in-memory arrays.

Every pipeline yields `(image, label)` batches with float32 images in [0, 1]
of shape `(28, 28, 1)` for MNIST and Fashion-MNIST, and int32 labels. The
`tf.data` pipelines need TensorFlow, which is imported when one is built;
`ArrayBatches` and the IDX reader work on any Keras backend without it.
"""

import gzip
import hashlib
import os
import pathlib
import re
import tempfile
import zlib

from absl import logging
import keras
import numpy as np

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _tfdata_internals

SAMPLE_PATH = pathlib.Path(__file__).parent / "sample_data" / "mnist_sample.npz"
SAMPLE_NAME = "mnist_sample"

# The four files of an MNIST-format IDX set, named as LeCun distributed
# MNIST; Fashion-MNIST kept the names.
MNIST_FILES = {
    "train_data": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_data": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# The tfds names `import_idx` writes: (title, tfds builder class, SHA-256
# of the uncompressed train-labels file of the real set). The two sets' files
# have the same names, so only their contents tell them apart.
_IDX_SETS = {
    "mnist": (
        "MNIST",
        "MNIST",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "fashion_mnist": (
        "Fashion-MNIST",
        "FashionMNIST",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
}
# The tfds names `import_idx` accepts, and their titles.
IDX_DATASETS = {name: title for name, (title, _, _) in _IDX_SETS.items()}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def _open(path):
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read(file, size, path):
    """`file.read(size)`, with gzip's errors on a damaged file as one that
    names the file."""
    try:
        return file.read(size)
    except (EOFError, OSError, zlib.error) as error:
        raise ValueError(
            f"{path} is truncated or corrupt ({error}). Download it again."
        ) from None


def read_idx_header(path):
    """Returns `(dtype, shape)` from an IDX(.gz) file's header."""
    with _open(path) as f:
        head = _read(f, 4, path)
        if len(head) != 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES:
            raise ValueError(
                f"{path} is not an IDX file: its first bytes are {head!r}, "
                "expected 00 00 <type> <rank>. Pass MNIST-format IDX files "
                "such as train-images-idx3-ubyte(.gz)."
            )
        rank = head[3]
        dims = _read(f, 4 * rank, path)
        if len(dims) != 4 * rank:
            raise ValueError(f"{path} ends inside its IDX header.")
        shape = tuple(
            int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(rank)
        )
    return np.dtype(_IDX_DTYPES[head[2]]), shape


def read_idx(path):
    """Reads an IDX(.gz) file into a NumPy array."""
    dtype, shape = read_idx_header(path)
    with _open(path) as f:
        _read(f, 4 + 4 * len(shape), path)
        buffer = _read(f, -1, path)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(buffer) != expected:
        raise ValueError(
            f"{path} holds {len(buffer)} bytes of data but its header "
            f"{shape} promises {expected}. The file is truncated or corrupt."
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _find_idx_files(idx_dir):
    idx_dir = pathlib.Path(idx_dir)
    if not idx_dir.is_dir():
        raise ValueError(
            "Expected a folder holding the four IDX files of an MNIST-format "
            f"set (MNIST, Fashion-MNIST). Received: "
            f"idx_dir={str(idx_dir)!r}, which is not a folder."
        )
    found, missing = {}, []
    for key, stem in MNIST_FILES.items():
        candidates = [
            idx_dir / name
            for name in (
                stem,
                stem + ".gz",
                stem.replace("-idx", ".idx"),
                stem.replace("-idx", ".idx") + ".gz",
            )
        ]
        existing = [c for c in candidates if c.is_file()]
        if existing:
            found[key] = existing[0]
        else:
            missing.append(stem + "[.gz]")
    if missing:
        raise ValueError(
            f"{idx_dir} lacks {', '.join(missing)}. Put the four IDX files "
            "of an MNIST-format set (gzipped or not) in one folder."
        )
    return found


def _check_idx_files(files):
    """Checks headers; returns the number of examples per split."""
    counts = {}
    for split in ("train", "test"):
        # Read whole, so that a truncated file fails here, not inside tfds.
        image_shape = read_idx(files[split + "_data"]).shape
        label_shape = read_idx(files[split + "_labels"]).shape
        if len(image_shape) != 3 or image_shape[1:] != (28, 28):
            raise ValueError(
                f"{files[split + '_data']} holds arrays of shape "
                f"{image_shape}, expected (N, 28, 28) images of an "
                "MNIST-format set."
            )
        if label_shape != image_shape[:1]:
            raise ValueError(
                f"{split}: {image_shape[0]} images but {label_shape} labels. "
                "Use an image file and a label file of the same split."
            )
        counts[split] = image_shape[0]
    return counts


def _check_idx_name(name):
    if name not in _IDX_SETS:
        raise ValueError(
            "Expected `name` to be a tfds name of an MNIST-format set: "
            f"{', '.join(map(repr, _IDX_SETS))}. Received: name={name!r}"
        )


def _sha256(path):
    """The SHA-256 of a file's uncompressed bytes."""
    with _open(path) as f:
        return hashlib.sha256(_read(f, -1, path)).hexdigest()


def _check_not_the_other_set(files, name):
    """Raises if the files are the real set of another name (MNIST imported
    as Fashion-MNIST, or the reverse); custom sets pass."""
    digest = _sha256(files["train_labels"])
    for other, (title, _, known) in _IDX_SETS.items():
        if other != name and digest == known:
            raise ValueError(
                f"{files['train_labels'].parent} holds the {title} files, "
                f"not {IDX_DATASETS[name]}: received name={name!r}. Import "
                f"them with name={other!r} (`kd-keras data --name {other}`), "
                f"or pass the {IDX_DATASETS[name]} files."
            )


def _local_idx_builder(builder_class, tfds_name, files, counts, data_dir):
    """A tfds builder of the MNIST family, reading the given files instead
    of the web."""
    import tensorflow_datasets as tfds

    class LocalIDX(builder_class, skip_registration=True):
        name = tfds_name

        def _split_generators(self, dl_manager):
            paths = dl_manager.extract({k: str(v) for k, v in files.items()})
            return [
                tfds.core.SplitGenerator(
                    name=split,
                    gen_kwargs=dict(
                        num_examples=counts[split],
                        data_path=paths[split + "_data"],
                        label_path=paths[split + "_labels"],
                    ),
                )
                for split in ("train", "test")
            ]

    return LocalIDX(data_dir=str(data_dir))


def import_idx(idx_dir, data_dir, name="mnist"):
    """Imports a local MNIST-format IDX set into a tensorflow-datasets folder.

    Afterwards `load(name, split, data_dir=data_dir)` (and
    `tfds.load(name, data_dir=data_dir)`) read it with no network. The set
    is four IDX files, gzipped or not, named as in LeCun's MNIST, which
    Fashion-MNIST's files follow. Importing again into a folder that holds
    the set already does nothing.

    Args:
        idx_dir: folder with `train-images-idx3-ubyte(.gz)`,
            `train-labels-idx1-ubyte(.gz)`, `t10k-images-idx3-ubyte(.gz)` and
            `t10k-labels-idx1-ubyte(.gz)`.
        data_dir: the tensorflow-datasets data folder to write to.
        name: the tfds name to import the set as: `"mnist"` or
            `"fashion_mnist"`. The real MNIST files under `"fashion_mnist"`,
            or the reverse, are refused; other IDX data is imported as given.

    Returns:
        A dict `{"train": n_train, "test": n_test}` of example counts.

    Example:

        >>> import_idx("~/Downloads/fashion", "~/tensorflow_datasets", "fashion_mnist")
        {'train': 60000, 'test': 10000}
    """
    _check_idx_name(name)
    import tensorflow_datasets as tfds

    idx_dir = pathlib.Path(os.path.expanduser(str(idx_dir)))
    data_dir = pathlib.Path(os.path.expanduser(str(data_dir)))
    files = _find_idx_files(idx_dir)
    # Before the whole files are read: the labels tell the set apart.
    _check_not_the_other_set(files, name)
    counts = _check_idx_files(files)
    builder_class = getattr(tfds.image_classification, _IDX_SETS[name][1])
    builder = _local_idx_builder(builder_class, name, files, counts, data_dir)
    with tempfile.TemporaryDirectory() as scratch:
        builder.download_and_prepare(
            download_dir=scratch,
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False, extract_dir=os.path.join(scratch, "extracted")
            ),
        )
    return {
        split: builder.info.splits[split].num_examples for split in ("train", "test")
    }


def import_mnist(idx_dir, data_dir):
    """Imports local MNIST IDX files: `import_idx(idx_dir, data_dir, "mnist")`.

    Example:

        >>> import_mnist("~/Downloads/mnist", "~/tensorflow_datasets")
        {'train': 60000, 'test': 10000}
    """
    return import_idx(idx_dir, data_dir, name="mnist")


def read_mnist(idx_dir):
    """Reads the four files of an MNIST-format IDX set into NumPy arrays.

    Any such set: MNIST, Fashion-MNIST, or your own data in their format.
    Needs no TensorFlow, so it is the way to these sets on a JAX or PyTorch
    machine without it.

    Args:
        idx_dir: folder with the four files, named as in LeCun's MNIST,
            gzipped or not (see `import_idx`).

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images of shape
        `(n, 28, 28)` and uint8 labels, as `keras.datasets.mnist.load_data()`
        returns them.

    Example:

        >>> (x_train, y_train), _ = read_mnist("~/Downloads/fashion_mnist")
        >>> x_train.shape
        (60000, 28, 28)
    """
    files = _find_idx_files(os.path.expanduser(str(idx_dir)))
    _check_idx_files(files)
    return tuple(
        (read_idx(files[split + "_data"]), read_idx(files[split + "_labels"]))
        for split in ("train", "test")
    )


def sample():
    """Returns the small MNIST sample shipped with the package.

    It holds the first 8,000 training and the first 2,000 test images of
    MNIST (Y. LeCun, C. Cortes, C. J. C. Burges; CC BY-SA 3.0), in the form
    `keras.datasets.mnist.load_data()` returns.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images of shape
        `(n, 28, 28)` and uint8 labels.

    Example:

        >>> (x_train, y_train), (x_test, y_test) = sample()
        >>> x_train.shape
        (8000, 28, 28)
    """
    with np.load(SAMPLE_PATH) as arrays:
        return (
            (arrays["x_train"], arrays["y_train"]),
            (arrays["x_test"], arrays["y_test"]),
        )


def filter_classes(dataset, keep=None, drop=None):
    """Keeps the examples of some classes in an unbatched `(x, y)` dataset.

    Args:
        dataset: an unbatched `tf.data.Dataset` of `(x, y)` with integer y.
        keep: class ids to keep (all others are dropped).
        drop: class ids to drop, e.g. `[3]` for Hinton's omitted-3 transfer set.

    Returns:
        The filtered dataset.
    """
    tf = _backend.require_tensorflow("`filter_classes` (a tf.data filter)")
    keep = None if keep is None else sorted(set(int(c) for c in keep))
    drop = sorted(set(int(c) for c in drop or ()))
    if keep is not None and not keep:
        raise ValueError("Expected at least one class in `keep`. Received: []")

    def wanted(x, y):
        label = tf.cast(tf.reshape(y, []), tf.int64)
        result = tf.constant(True)
        if keep is not None:
            result = tf.reduce_any(tf.equal(label, tf.constant(keep, tf.int64)))
        if drop:
            result = tf.logical_and(
                result,
                tf.logical_not(
                    tf.reduce_any(tf.equal(label, tf.constant(drop, tf.int64)))
                ),
            )
        return result

    return dataset.filter(wanted)


def jitter(dataset, max_shift=2, seed=None):
    """Shifts each image of a batched dataset by up to `max_shift` pixels.

    Hinton et al. (2015) trained the MNIST teacher on inputs jittered by up to
    two pixels in any direction. Shifts are whole pixels (nearest
    interpolation), empty borders are filled with zeros.

    Args:
        dataset: a batched dataset of `(images, labels)`, images NHWC.
        max_shift: the largest shift, in pixels.
        seed: seed of the random shifts.

    Returns:
        The jittered dataset. It differs on every pass, so do not cache
        teacher logits of it.
    """
    tf = _backend.require_tensorflow("`jitter` (a tf.data map)")
    height, width = dataset.element_spec[0].shape[1:3]
    translate = keras.layers.RandomTranslation(
        height_factor=max_shift / height,
        width_factor=max_shift / width,
        fill_mode="constant",
        interpolation="nearest",
        seed=seed,
    )

    def shift(x, y, *rest):
        return (translate(x, training=True), y, *rest)

    return dataset.map(shift, num_parallel_calls=tf.data.AUTOTUNE)


def _normalise(x, y, *rest):
    import tensorflow as tf

    x = tf.cast(x, tf.float32) / 255.0
    if x.shape.rank == 3:
        x = x[..., tf.newaxis]
    return (x, tf.cast(y, tf.int32), *rest)


def pipeline(
    examples,
    batch_size=128,
    shuffle=False,
    seed=None,
    max_shift=0,
    keep_classes=None,
    drop_classes=None,
    limit=None,
):
    """Turns unbatched `(uint8 image, label)` examples into training batches.

    Args:
        examples: an unbatched `tf.data.Dataset`, or a tuple `(x, y)` of arrays.
        batch_size: examples per batch.
        shuffle: reshuffle every epoch.
        seed: seed of the shuffle and the jitter.
        max_shift: jitter by up to this many pixels (0: none).
        keep_classes: if set, keep only these class ids.
        drop_classes: drop these class ids.
        limit: keep only the first `limit` examples (after class filtering).

    Returns:
        A batched, prefetched `tf.data.Dataset` of (float32 images in [0, 1],
        int32 labels).
    """
    tf = _backend.require_tensorflow(
        "`pipeline` and `load` (tf.data; without TensorFlow, use "
        "`read_mnist` and `ArrayBatches`)"
    )
    _checks.check_positive_int(batch_size, "batch_size")
    if limit is not None:
        _checks.check_positive_int(limit, "limit")
    if isinstance(examples, tuple):
        _check_classes_left(np.asarray(examples[1]), keep_classes, drop_classes)
        examples = tf.data.Dataset.from_tensor_slices(examples)
    if keep_classes is not None or drop_classes:
        examples = filter_classes(examples, keep=keep_classes, drop=drop_classes)
    if limit is not None:
        examples = examples.take(limit)
    if shuffle:
        examples = examples.shuffle(10_000, seed=seed)
    batches = examples.batch(batch_size).map(
        _normalise, num_parallel_calls=tf.data.AUTOTUNE
    )
    if max_shift:
        batches = jitter(batches, max_shift, seed=seed)
    return batches.prefetch(tf.data.AUTOTUNE)


def _check_classes_left(labels, keep, drop):
    """Raises if the class filter leaves no examples; warns about kept
    classes that do not occur."""
    if keep is None and not drop:
        return
    present = set(np.unique(labels).tolist())
    left = present if keep is None else present & {int(c) for c in keep}
    left -= {int(c) for c in drop or ()}
    arguments = ", ".join(
        f"{name}={list(value)}"
        for name, value in (("keep_classes", keep), ("drop_classes", drop))
        if value is not None
    )
    if not left:
        raise ValueError(
            f"The class filter {arguments} leaves no examples: the labels "
            f"hold the classes {sorted(present)}. Keep some of those."
        )
    missing = sorted({int(c) for c in keep or ()} - present)
    if missing:
        logging.warning(
            "keep_classes: the classes %s do not occur in these labels (%s).",
            missing,
            sorted(present),
        )


_SPLIT = re.compile(r"^(train|test)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$")


def _sample_split(split):
    """The sample's arrays for a split such as "train" or "train[:90%]"."""
    (x_train, y_train), (x_test, y_test) = sample()
    arrays = {"train": (x_train, y_train), "test": (x_test, y_test)}
    match = _SPLIT.match(split.replace(" ", ""))
    if not match:
        raise ValueError(
            "The sample has the splits 'train' and 'test', which may be "
            "sliced as tensorflow-datasets does ('train[:90%]', "
            f"'train[7000:]'). Received: split={split!r}"
        )
    name, start, start_percent, stop, stop_percent = match.groups()
    x, y = arrays[name]

    def bound(text, percent):
        if not text:
            return None
        value = int(text)
        return round(value * len(x) / 100) if percent else value

    window = slice(bound(start, start_percent), bound(stop, stop_percent))
    return x[window], y[window]


def load(
    name="mnist",
    split="train",
    data_dir=None,
    batch_size=128,
    shuffle=False,
    seed=None,
    max_shift=0,
    keep_classes=None,
    drop_classes=None,
    limit=None,
    download=True,
    in_memory=True,
):
    """Loads a dataset through tensorflow-datasets as normalised batches.

    Args:
        name: a tensorflow-datasets image classification name such as
            `"mnist"` or `"fashion_mnist"` (see `import_idx`), or
            `"mnist_sample"` for the sample shipped with the package.
        split: a tfds split such as `"train"`, `"test"` or `"train[:90%]"`.
        data_dir: the tensorflow-datasets data folder (see `import_idx`).
        batch_size: examples per batch.
        shuffle: reshuffle every epoch.
        seed: seed of the shuffle and jitter.
        max_shift: jitter by up to this many pixels (Hinton's teacher: 2).
        keep_classes: if set, keep only these class ids.
        drop_classes: drop these class ids (e.g. `[3]`).
        limit: keep only the first `limit` examples.
        download: let tensorflow-datasets download the data if it is missing.
        in_memory: decode the whole split once into memory (fast epochs for
            MNIST-sized data); False streams and decodes every epoch.

    Returns:
        A batched `tf.data.Dataset` of `(images, labels)`.

    Example:

        >>> train = load("mnist", "train", batch_size=128, shuffle=True)
        >>> test = load("mnist", "test")
    """
    _backend.require_tensorflow(
        "`load` (tensorflow-datasets and tf.data; without TensorFlow, use "
        "`read_mnist` and `ArrayBatches`)"
    )
    if name == SAMPLE_NAME:
        examples = _sample_split(split)
        if not len(examples[0]):
            raise ValueError(
                f"The split {split!r} of {SAMPLE_NAME!r} holds no examples "
                f"(the sample has {len(sample()[0][0])} training and "
                f"{len(sample()[1][0])} test examples)."
            )
    else:
        import tensorflow_datasets as tfds

        try:
            with _tfdata_internals.few_download_retries():
                examples = tfds.load(
                    name,
                    split=split,
                    data_dir=None
                    if data_dir is None
                    else os.path.expanduser(str(data_dir)),
                    as_supervised=True,
                    download=download,
                    batch_size=-1 if in_memory else None,
                )
            if in_memory:
                examples = tuple(tfds.as_numpy(examples))
        except (tfds.core.DatasetNotFoundError, AssertionError, OSError) as error:
            hint_name = name if name in IDX_DATASETS else "NAME"
            raise ValueError(
                f"Could not load {name!r} split {split!r} from "
                f"data_dir={data_dir!r}: {error}. For "
                f"{' or '.join(IDX_DATASETS.values())} with no network, import "
                f"the IDX files first: `kd-keras data --name {hint_name} "
                "--idx_dir DIR --data_dir DATA_DIR` (or "
                "`kd_keras.data.import_idx`)."
            ) from error
    return pipeline(
        examples,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        max_shift=max_shift,
        keep_classes=keep_classes,
        drop_classes=drop_classes,
        limit=limit,
    )


def synthetic(count, *, batch_size=128, shape=(784,), classes=10):
    """A deterministic synthetic dataset of any size, made inside tf.data.

    For sizing work at scale (caches, memory, throughput) without storing
    data: example i is computed from i by integer arithmetic, with no random
    op, so every pass yields the same batches and nothing is held in memory.
    Its label is `i % classes`; its float32 values lie in [0, 1): half a
    pseudo-random pattern of (i, position), half a mark on the positions
    congruent to the label, so that a classifier can learn it.

    Args:
        count: number of examples.
        batch_size: examples per batch (the last may be smaller).
        shape: shape of one example.
        classes: number of classes.

    Returns:
        A batched `tf.data.Dataset` of `(x, y)`, x float32 of
        `(batch, *shape)`, y int32.
    """
    tf = _backend.require_tensorflow("`synthetic` (a tf.data pipeline)")
    _checks.check_positive_int(count, "count")
    _checks.check_positive_int(batch_size, "batch_size")
    _checks.check_positive_int(classes, "classes")
    size = int(np.prod(shape))
    positions = tf.range(size, dtype=tf.int64)

    def make(ids):
        labels = ids % classes
        mixed = (ids[:, None] * 7919 + positions[None, :] * 104729) % 1009
        pattern = tf.cast(mixed, tf.float32) / 1009.0
        mark = tf.cast(positions[None, :] % classes == labels[:, None], tf.float32)
        x = 0.5 * pattern + 0.49 * mark
        return tf.reshape(x, [-1, *shape]), tf.cast(labels, tf.int32)

    return (
        tf.data.Dataset.range(count)
        .batch(batch_size)
        .map(make, num_parallel_calls=tf.data.AUTOTUNE)
    )


def to_arrays(dataset):
    """Collects a batched `(x, y)` dataset (a `tf.data.Dataset` or a
    `PyDataset`) into two NumPy arrays."""
    xs, ys = [], []
    for x, y, _ in _datasets.numpy_batches(dataset):
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


class ArrayBatches(keras.utils.PyDataset):
    """Batches of in-memory arrays, for `fit` on any backend.

    A `keras.utils.PyDataset` over NumPy arrays: it needs no TensorFlow, so
    it is the input pipeline of JAX or PyTorch machines without it, and
    `kd_keras.cache_teacher_logits` returns one for arrays. Batches are
    slices of the arrays (NumPy fancy indexing when shuffled), reshuffled at
    the end of every epoch.

    Args:
        x: an array, or a dict or tuple of arrays, of the same length.
        y: optional labels.
        sample_weight: optional weights.
        batch_size: examples per batch; the last batch may be smaller.
        shuffle: reshuffle the examples every epoch.
        seed: seed of the shuffle.

    Example:

        >>> train = ArrayBatches(x_train, y_train, batch_size=128, shuffle=True)
        >>> student.fit(train, epochs=5)
    """

    def __init__(
        self, x, y=None, sample_weight=None, *, batch_size=128, shuffle=False, seed=None
    ):
        super().__init__()
        x, y, sample_weight = keras.tree.map_structure(
            lambda a: None if a is None else np.asarray(a), (x, y, sample_weight)
        )
        _checks.check_positive_int(batch_size, "batch_size")
        self.x, self.y, self.sample_weight = x, y, sample_weight
        lengths = {
            len(a) for a in keras.tree.flatten((x, y, sample_weight)) if a is not None
        }
        if len(lengths) != 1:
            raise ValueError(
                "Expected inputs, labels and sample weights with one row per "
                f"example. Received arrays of lengths {sorted(lengths)}."
            )
        self.count = lengths.pop()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        # Unseeded, it draws from NumPy's global generator, which
        # `keras.utils.set_random_seed` seeds.
        self._rng = np.random.default_rng(
            seed if seed is not None else np.random.randint(2**31)
        )
        self._order = self._rng.permutation(self.count) if shuffle else None

    def __len__(self):
        return -(-self.count // self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"Batch {index} of {len(self)}.")
        start = index * self.batch_size
        rows = slice(start, start + self.batch_size)
        if self._order is not None:
            rows = self._order[rows]
        x, y, sample_weight = keras.tree.map_structure(
            lambda a: None if a is None else a[rows],
            (self.x, self.y, self.sample_weight),
        )
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def on_epoch_end(self):
        if self.shuffle:
            self._order = self._rng.permutation(self.count)

    def with_arrays(self, x, y=None, sample_weight=None, shuffle=None):
        """The same batching (size, shuffle, seed) over other arrays."""
        return ArrayBatches(
            x,
            y,
            sample_weight,
            batch_size=self.batch_size,
            shuffle=self.shuffle if shuffle is None else shuffle,
            seed=self.seed,
        )


def as_batches(data, batch_size=None, shuffle=True):
    """Batches of `data`: a `tf.data.Dataset` or `PyDataset` as it is, or a
    tuple of arrays `(x, y[, sample_weight])` in `ArrayBatches` of
    `batch_size` (default 128), reshuffled every epoch if `shuffle`."""
    if isinstance(data, tuple) and 1 <= len(data) <= 3:
        return ArrayBatches(*data, batch_size=batch_size or 128, shuffle=shuffle)
    _datasets.check_batches(data)
    return data
