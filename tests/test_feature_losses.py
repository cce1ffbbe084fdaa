"""Feature losses (FitNets hints, attention transfer, Keras' feature
distillation) against NumPy references, and the Distiller that reads
features of nested and subclassed models in its forward pass."""

import keras
import numpy as np
import pytest

import kd_keras
from kd_keras import losses

pytestmark = pytest.mark.all_backends

rng = np.random.default_rng(5)
X = rng.normal(size=(48, 8, 8, 1)).astype("float32")
Y = rng.integers(0, 4, size=48)


def cnn(width, name, seed):
    """A CNN whose "block2/conv" sits inside a nested model."""
    keras.utils.set_random_seed(seed)
    block = keras.Sequential(
        [
            keras.Input((4, 4, width)),
            keras.layers.Conv2D(width, 3, padding="same", name="conv"),
            keras.layers.ReLU(name="relu"),
        ],
        name="block2",
    )
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="c1")(
        inputs
    )
    h = block(keras.layers.MaxPooling2D(name="pool")(h))
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(6, activation="relu", name="fc")(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(h), name=name)


class SubclassedStudent(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.conv = keras.layers.Conv2D(3, 3, padding="same", activation="relu")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(4)

    def call(self, x):
        return self.head(self.pool(self.conv(x)))


def subclassed_student():
    keras.utils.set_random_seed(3)
    student = SubclassedStudent()
    student(X[:1])
    return student


def numpy_attention(features, p=2.0):
    maps = (np.abs(features) ** p).mean(-1).reshape(len(features), -1)
    return maps / np.linalg.norm(maps, axis=-1, keepdims=True)


def attention_reference(t, s, p=2.0):
    return ((numpy_attention(s, p) - numpy_attention(t, p)) ** 2).mean(-1)


def test_feature_hint_matches_numpy_through_its_adapter(gradient):
    t = rng.normal(size=(3, 4, 4, 5))
    s = rng.normal(size=(3, 4, 4, 2))
    hint = losses.FeatureHint("a", "b")
    adapter = hint.prepare(t.shape, s.shape)
    adapter.build((None, 4, 4, 2))
    kernel = rng.normal(size=(2, 5)).astype("float32")
    bias = rng.normal(size=5).astype("float32")
    adapter.set_weights([kernel, bias])

    def reference(student):
        return (((student @ kernel + bias) - t) ** 2).reshape(3, -1).mean(-1)

    got = keras.ops.convert_to_numpy(
        hint.per_example([t.astype("float32")], [s.astype("float32")], [adapter])
    )
    np.testing.assert_allclose(got, reference(s), rtol=1e-5)
    grad = gradient(
        lambda v: keras.ops.mean(
            hint.per_example([t.astype("float32")], [v], [adapter])
        ),
        s,
    )
    # d/ds mean_n mean_i (a(s) − t)²: the adapter's kernel carries it back.
    residual = (s @ kernel + bias) - t
    expected = 2 * residual @ kernel.T / residual[0].size / 3
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("p", [2, 3])
def test_attention_transfer_matches_numpy(p, gradient, central_differences):
    t = rng.normal(size=(3, 4, 4, 6))
    s = rng.normal(size=(3, 4, 4, 2))
    at = losses.AttentionTransfer([("a", "b")], p=p)
    got = keras.ops.convert_to_numpy(
        at.per_example([t.astype("float32")], [s.astype("float32")], [None])
    )
    np.testing.assert_allclose(got, attention_reference(t, s, p), rtol=1e-4)
    grad = gradient(
        lambda v: keras.ops.mean(at.per_example([t.astype("float32")], [v], [None])), s
    )
    expected = central_differences(lambda v: attention_reference(t, v, p).mean(), s)
    np.testing.assert_allclose(grad, expected, rtol=2e-3, atol=1e-6)


def test_attention_maps_of_other_sizes_are_resized_to_the_smaller():
    # A teacher map that is the student's, doubled in each direction: the
    # resized maps agree far better than those of an unrelated teacher.
    s = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    t = np.repeat(np.repeat(s, 2, axis=1), 2, axis=2)
    at = losses.AttentionTransfer([("a", "b")])
    at.prepare(t.shape, s.shape)
    same = keras.ops.convert_to_numpy(at.per_example([t], [s], [None]))
    other = keras.ops.convert_to_numpy(
        at.per_example([rng.normal(size=t.shape).astype("float32")], [s], [None])
    )
    assert same.shape == (2,) and np.all(same < other / 5)


# The feature term's value and gradient tests run on every backend.
@pytest.mark.backend_independent
def test_hints_train_adapters_that_stay_out_of_the_student(tmp_path):
    teacher, student = cnn(8, "teacher", 1), cnn(4, "student", 2)
    student_weights = len(student.weights)
    distiller = kd_keras.Distiller(
        teacher,
        student,
        losses=[
            losses.SoftTargets(),
            (losses.FeatureHint("block2/conv", "block2/conv"), 0.5),
        ],
    )
    (adapter,) = distiller.adapters
    assert adapter.built and tuple(adapter.kernel.shape) == (4, 8)
    distiller.compile("adam")
    kernel = keras.ops.convert_to_numpy(adapter.kernel).copy()
    history = distiller.fit(X, Y, epochs=1, batch_size=16, verbose=0).history
    assert {"soft_targets_loss", "feature_hint_loss"} <= set(history)
    assert not np.allclose(kernel, keras.ops.convert_to_numpy(adapter.kernel))
    assert len(distiller.student.weights) == student_weights
    assert not any(w is adapter.kernel for w in distiller.student.weights)
    distiller.student.save(tmp_path / "student.keras")
    loaded_student = keras.saving.load_model(tmp_path / "student.keras")
    assert len(loaded_student.weights) == student_weights

    # The whole Distiller saves its adapter with it.
    before = distiller.evaluate(X, Y, verbose=0, return_dict=True)
    distiller.save(tmp_path / "distiller.keras")
    loaded = keras.saving.load_model(tmp_path / "distiller.keras")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded.adapters[0].kernel),
        keras.ops.convert_to_numpy(adapter.kernel),
    )
    after = loaded.evaluate(X, Y, verbose=0, return_dict=True)
    assert after["feature_hint_loss"] == pytest.approx(
        before["feature_hint_loss"], rel=1e-5
    )


def test_the_feature_term_is_the_numpy_value_of_the_read_features():
    # The Distiller reads the nested layer's output in its forward pass: its
    # logged term is the loss of the features of a separate extractor.
    teacher, student = cnn(6, "teacher", 4), cnn(6, "student", 5)
    distiller = kd_keras.Distiller(
        teacher,
        student,
        losses=losses.AttentionTransfer([("block2/relu", "c1"), ("c1", "block2/conv")]),
        distillation_weight=1.0,
    )
    distiller.compile("adam")
    logs = distiller.evaluate(
        X[:16], Y[:16], batch_size=16, verbose=0, return_dict=True
    )

    def features(model, path):
        outer, _, inner = path.partition("/")
        if not inner:
            return keras.Model(model.inputs, model.get_layer(outer).output)(X[:16])
        block = model.get_layer(outer)
        pooled = keras.Model(model.inputs, model.get_layer("pool").output)(X[:16])
        return keras.Model(block.inputs, block.get_layer(inner).output)(pooled)

    as_numpy = keras.ops.convert_to_numpy
    t1, s1 = (
        as_numpy(features(teacher, "block2/relu")),
        as_numpy(features(student, "c1")),
    )
    t2, s2 = (
        as_numpy(features(teacher, "c1")),
        as_numpy(features(student, "block2/conv")),
    )
    # Each pair pairs an 8×8 map with a 4×4 one (resized; the maps' values
    # are checked against NumPy above).
    at = losses.AttentionTransfer([("a", "b")])
    values = [at.per_example([t], [s], [None]) for t, s in ((t1, s1), (t2, s2))]
    expected = sum(as_numpy(v) for v in values).mean()
    assert logs["distillation_loss"] == pytest.approx(expected, rel=1e-4)


def test_a_subclassed_student_by_its_layer_and_by_a_function():
    teacher = cnn(8, "teacher", 1)
    for student_layer in ("conv", None):
        student = subclassed_student()
        spec = (
            student.conv
            if student_layer
            else (lambda model, inputs: model.conv(inputs))
        )
        distiller = kd_keras.Distiller(
            teacher, student, losses=losses.FeatureHint("c1", spec)
        )
        distiller.compile("adam")
        before = keras.ops.convert_to_numpy(student.conv.kernel).copy()
        logs = distiller.fit(X, Y, epochs=1, batch_size=16, verbose=0).history
        assert np.isfinite(logs["distillation_loss"][0])
        assert distiller.adapters[0].built
        assert not np.allclose(before, keras.ops.convert_to_numpy(student.conv.kernel))


def test_keras_feature_distillation_switches_by_one_import(keras_and_kd_keras_totals):
    teacher, student = cnn(8, "teacher", 1), cnn(4, "student", 2)
    arguments = dict(
        distillation_losses=keras.distillation.FeatureDistillation(
            loss="mse", teacher_layer_name="fc", student_layer_name="fc"
        ),
        student_loss_weight=0.25,
    )
    totals = keras_and_kd_keras_totals(teacher, student, arguments, X[:16], Y[:16])
    assert totals[1] == pytest.approx(totals[0], rel=1e-5)


def test_zero_distillation_weight_turns_feature_terms_off():
    teacher, student = cnn(8, "teacher", 1), cnn(4, "student", 2)
    distiller = kd_keras.Distiller(
        teacher, student, losses=losses.FeatureHint("fc", "fc"), distillation_weight=0.0
    )
    distiller.compile("adam")
    kernel = keras.ops.convert_to_numpy(distiller.adapters[0].kernel).copy()
    logs = distiller.fit(X, Y, epochs=1, batch_size=16, verbose=0).history
    assert logs["distillation_loss"] == [0.0]
    np.testing.assert_array_equal(
        kernel, keras.ops.convert_to_numpy(distiller.adapters[0].kernel)
    )


def _distiller(loss, teacher=None, student=None):
    return kd_keras.Distiller(
        teacher or cnn(8, "teacher", 1), student or cnn(4, "student", 2), losses=loss
    )


# The checks of bad input are the same on every backend.
@pytest.mark.backend_independent
@pytest.mark.parametrize(
    "make, error",
    [
        (
            lambda: _distiller(losses.FeatureHint("block2/cnv", "fc")),
            r"no layer 'block2/cnv'\. Close matches: block2/conv",
        ),
        (
            lambda: _distiller(losses.FeatureHint("conv", "fc")),
            r"no layer 'conv'\. .*block2/conv",
        ),
        (
            lambda: _distiller(losses.FeatureHint("c1", "fc")),
            r"teacher layer `c1` and student layer `fc`: .*must agree on every "
            r"other axis.*AttentionTransfer",
        ),
        (
            lambda: _distiller(losses.FeatureHint("fc", "block2/conv", adapter=None)),
            r"adapter=None\) compares the features as they are.*adapter=\"auto\"",
        ),
        (
            lambda: _distiller(losses.AttentionTransfer([("fc", "fc")])),
            r"needs features with positions and channels.*FeatureHint",
        ),
        (
            lambda: _distiller(
                keras.distillation.FeatureDistillation(
                    teacher_layer_name="c1", student_layer_name="c1"
                )
            ),
            r"FeatureDistillation compares features as they are.*FeatureHint",
        ),
        (
            lambda: _distiller(losses.FeatureHint("fc", lambda model: model)),
            r"take `\(model, inputs\)`.*pass the layer itself",
        ),
        (
            lambda: _distiller(
                losses.FeatureHint(cnn(8, "other", 3).get_layer("fc"), "fc")
            ),
            r"not a layer of the teacher `teacher`",
        ),
        (
            lambda: losses.AttentionTransfer([]),
            r"non-empty list of \(teacher_layer, student_layer\)",
        ),
        (
            lambda: losses.FeatureHint("a", "b", adapter="dense"),
            r'"auto", None or a Keras layer',
        ),
    ],
    ids=[
        "misspelt_path",
        "nested_name_without_path",
        "spatial_sizes_differ",
        "no_adapter_other_widths",
        "attention_on_flat_features",
        "keras_features_of_other_shapes",
        "function_of_one_argument",
        "layer_of_another_model",
        "no_pairs",
        "unknown_adapter",
    ],
)
def test_bad_feature_losses_raise_with_the_fix(make, error):
    with pytest.raises(ValueError, match=error):
        make()


def test_feature_losses_refuse_cached_logits_before_training():
    teacher, student = cnn(8, "teacher", 1), cnn(4, "student", 2)
    cached = kd_keras.cache_teacher_logits(teacher, (X, Y), batch_size=16)
    distiller = _distiller(losses.FeatureHint("fc", "fc"), teacher, student)
    distiller.compile("adam")
    before = student.get_weights()
    with pytest.raises(
        ValueError, match=r"cached teacher logits.*without `cache_teacher_logits`"
    ):
        distiller.fit(cached, epochs=1, verbose=0)
    for old, new in zip(before, student.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_a_shared_layer_is_refused_on_the_first_batch():
    keras.utils.set_random_seed(0)
    shared = keras.layers.Dense(8, activation="relu", name="shared")
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(inputs)
    h = shared(keras.layers.Dense(8, name="in")(h))
    h = shared(h)
    student = keras.Model(inputs, keras.layers.Dense(4)(h), name="student")
    distiller = _distiller(losses.FeatureHint("fc", "shared"), student=student)
    distiller.compile("adam")
    with pytest.raises(ValueError, match=r"`shared` runs 2 times in one forward pass"):
        distiller.fit(X, Y, epochs=1, verbose=0)


def test_compute_loss_called_directly_reads_its_own_features():
    # After fit, `compute_loss` on other logits must not reuse the features
    # of the last training step (stale, or leaked tracers on JAX).
    teacher, student = cnn(8, "teacher", 1), cnn(4, "student", 2)
    distiller = _distiller(
        losses.FeatureHint("block2/conv", "block2/conv"), teacher, student
    )
    distiller.compile("adam")
    distiller.fit(X, Y, epochs=1, batch_size=16, verbose=0)
    direct = distiller.compute_loss(X[:16], Y[:16], student(X[:16]), training=False)
    logs = distiller.evaluate(
        X[:16], Y[:16], batch_size=16, verbose=0, return_dict=True
    )
    assert float(keras.ops.convert_to_numpy(direct)) == pytest.approx(
        logs["loss"], rel=1e-5
    )


def test_an_adapter_of_the_wrong_width_is_refused():
    hint = losses.FeatureHint(
        "block2/conv", "block2/conv", adapter=keras.layers.Dense(3)
    )
    with pytest.raises(ValueError, match=r"maps the student's feature to shape .*3\)"):
        _distiller(hint)


def test_a_quantized_layer_is_still_read():
    student = cnn(4, "student", 2)
    student.get_layer("fc").quantize("int8")
    distiller = _distiller(losses.FeatureHint("fc", "fc"), student=student)
    distiller.compile("adam")
    logs = distiller.evaluate(X[:16], Y[:16], verbose=0, return_dict=True)
    assert np.isfinite(logs["distillation_loss"]) and logs["distillation_loss"] > 0


def test_adapters_built_after_the_optimizer_ask_to_compile_again():
    student = subclassed_student()
    distiller = _distiller(losses.FeatureHint("c1", student.conv), student=student)
    distiller.compile("adam")
    distiller.optimizer.build(distiller.trainable_variables)
    with pytest.raises(ValueError, match=r"optimizer was already built.*Compile"):
        distiller.fit(X, Y, epochs=1, verbose=0)
    distiller.compile("adam")
    distiller.fit(X, Y, epochs=1, verbose=0)
    assert distiller.adapters[0].built


def test_features_of_unreadable_data_need_shapes_before_training():
    student = subclassed_student()
    distiller = _distiller(losses.FeatureHint("c1", student.conv), student=student)
    distiller.compile("adam")

    def batches():
        while True:
            yield X[:16], Y[:16]

    with pytest.raises(ValueError, match=r"cannot be read ahead.*keras\.Input"):
        distiller.fit(batches(), steps_per_epoch=2, epochs=1, verbose=0)
    assert distiller.adapters == []


def test_a_cached_pipeline_builds_adapters_from_its_spec():
    import tensorflow as tf

    student = subclassed_student()
    distiller = _distiller(losses.FeatureHint("c1", student.conv), student=student)
    distiller.compile("adam")
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(16).cache()
    distiller.fit(data, epochs=1, verbose=0)
    assert tuple(distiller.adapters[0].kernel.shape) == (3, 8)


def test_function_taps_describe_themselves_the_same_in_every_process():
    def first_layer(model, inputs):
        return model.layers[0](inputs)

    text = repr(losses.FeatureHint(first_layer, "fc"))
    assert "test_feature_losses" in text and "first_layer" in text and "0x" not in text


def test_a_checkpoint_of_an_unsaveable_distiller_fails_before_training(tmp_path):
    student = subclassed_student()
    distiller = _distiller(losses.FeatureHint("c1", student.conv), student=student)
    distiller.compile("adam")
    before = student.get_weights()
    checkpoint = keras.callbacks.ModelCheckpoint(tmp_path / "d.keras")
    with pytest.raises(ValueError, match=r"cannot be saved.*by name or by a path"):
        distiller.fit(X, Y, epochs=1, verbose=0, callbacks=[checkpoint])
    for old, new in zip(before, student.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_the_export_of_a_distiller_with_adapters_is_the_student_alone(tmp_path):
    import tensorflow as tf

    from kd_keras import export

    teacher, student = cnn(8, "teacher", 1), cnn(4, "student", 2)
    distiller = _distiller(
        losses.FeatureHint("block2/conv", "block2/conv"), teacher, student
    )
    report = export.export_student(
        distiller, tmp_path, formats=("saved_model",), latency_repeats=1
    )
    assert report["keras"]["params"] == student.count_params()
    loaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    exported = sum(int(np.prod(v.shape)) for v in loaded.variables)
    assert exported == student.count_params()
    assert distiller.adapters[0].count_params() > 0
    assert not any("adapter" in v.name for v in loaded.variables)


class _ScaledLogits(kd_keras.Distiller):
    """An override whose `call` returns new logits, not the student's own."""

    def call(self, inputs, training=False):
        return keras.ops.cast(super().call(inputs, training=training), "float32") * 1.0


def test_an_override_that_changes_the_logits_still_trains():
    teacher, student = cnn(8, "teacher", 1), cnn(4, "student", 2)
    distiller = _ScaledLogits(
        teacher,
        student,
        losses=losses.FeatureHint("block2/conv", "block2/conv"),
        name="scaled",
    )
    distiller.compile("adam")
    history = distiller.fit(X, Y, epochs=1, batch_size=16, verbose=0).history
    assert np.isfinite(history["distillation_loss"][0])


def test_an_adapter_that_cannot_tell_its_shape_is_checked_on_the_first_batch():
    class Narrow(keras.layers.Layer):  # No compute_output_shape.
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

        def compute_output_shape(self, input_shape):
            raise NotImplementedError

    student = subclassed_student()
    distiller = _distiller(
        losses.FeatureHint("c1", student.conv, adapter=Narrow()), student=student
    )
    distiller.compile("adam")
    with pytest.raises(ValueError, match=r"maps its feature to shape \(8, 8, 8, 1\)"):
        distiller.fit(X, Y, epochs=1, verbose=0)


def test_attention_of_high_powers_of_large_activations_does_not_overflow():
    t = 20.0 * np.abs(rng.normal(size=(2, 4, 4, 3)))
    s = rng.normal(size=(2, 4, 4, 2))
    at = losses.AttentionTransfer([("a", "b")], p=16)
    got = keras.ops.convert_to_numpy(
        at.per_example([t.astype("float32")], [s.astype("float32")], [None])
    )
    np.testing.assert_allclose(got, attention_reference(t, s, 16), rtol=1e-3)


def test_unreadable_data_without_adapters_or_shapes():
    import tensorflow as tf

    student = subclassed_student()

    def batches():
        while True:
            yield X[:16], Y[:16]

    # Attention transfer makes no adapter: a generator trains.
    distiller = _distiller(
        losses.AttentionTransfer([("c1", student.conv)]), student=student
    )
    distiller.compile("adam")
    distiller.fit(batches(), steps_per_epoch=2, epochs=1, verbose=0)
    # A hint needs its adapter's shapes: a cached pipeline of unknown image
    # sizes is refused, as is one that carries cached logits.
    hint = _distiller(losses.FeatureHint("c1", student.conv), student=student)
    hint.compile("adam")
    unknown = tf.data.Dataset.from_generator(
        batches,
        output_signature=(
            tf.TensorSpec((None, None, None, 1), tf.float32),
            tf.TensorSpec((None,), tf.int64),
        ),
    )
    with pytest.raises(ValueError, match=r"cannot be read ahead"):
        hint.fit(unknown.take(2).cache(), epochs=1, verbose=0)
    cached = kd_keras.cache_teacher_logits(
        hint.teacher, tf.data.Dataset.from_tensor_slices((X, Y)).batch(16)
    ).cache()
    with pytest.raises(ValueError, match=r"cached teacher logits"):
        hint.fit(cached, epochs=1, verbose=0)


def test_a_callback_list_is_accepted():
    distiller = _distiller(losses.FeatureHint("fc", "fc"))
    distiller.compile("adam")
    # Keras takes a CallbackList as it is (History included, by the user).
    given = keras.callbacks.CallbackList([keras.callbacks.History()], model=distiller)
    distiller.fit(X, Y, epochs=1, verbose=0, callbacks=given)


def _counting_student(counting_layer):
    """A student that counts its forward passes, with a layer "fc" to hint."""
    keras.utils.set_random_seed(3)
    counter = counting_layer()
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.GlobalAveragePooling2D()(counter(inputs))
    h = keras.layers.Dense(6, activation="relu", name="fc")(h)
    student = keras.Model(inputs, keras.layers.Dense(4)(h), name="student")
    return student, counter


def _passes_per_step(distiller, counter):
    distiller.compile("adam")
    distiller.train_on_batch(X[:16], Y[:16])  # Traced and built.
    before = counter.count()
    for _ in range(2):
        distiller.train_on_batch(X[:16], Y[:16])
    return (counter.count() - before) / 2


def test_an_override_of_call_runs_the_student_once_per_step():
    # The step's features come from the forward pass of the step's `call`,
    # also when an override changes the logits it returns (the student used
    # to run a second time then).
    from conftest import CountingLayer

    student, counter = _counting_student(CountingLayer)
    distiller = _ScaledLogits(
        cnn(8, "teacher", 1),
        student,
        losses=losses.FeatureHint("fc", "fc"),
        name="scaled",
    )
    assert _passes_per_step(distiller, counter) == 1


@pytest.mark.tensorflow_only
def test_a_custom_train_step_runs_the_student_once_per_step():
    from conftest import CountingLayer
    import tensorflow as tf

    class CustomStep(kd_keras.Distiller):
        """The usual Keras pattern of a custom step (TensorFlow's)."""

        def train_step(self, data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x, y, y_pred, sample_weight)
            variables = self.trainable_variables
            gradients = tape.gradient(loss, variables)
            self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
            return {"loss": loss}

    student, counter = _counting_student(CountingLayer)
    distiller = CustomStep(
        cnn(8, "teacher", 1),
        student,
        losses=losses.FeatureHint("fc", "fc"),
        name="custom_step",
    )
    assert _passes_per_step(distiller, counter) == 1


class _RebuiltBatch(kd_keras.Distiller):
    """An override of `compute_loss` that unpacks the cached form of `x` and
    packs it again, as the docstring of `compute_loss` shows."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kw):
        from kd_keras.distiller import INPUTS_KEY
        from kd_keras.distiller import TEACHER_LOGITS_KEY
        from kd_keras.distiller import split_cached

        inputs, teacher_logits = split_cached(x)
        if teacher_logits is not None:
            x = {INPUTS_KEY: inputs, TEACHER_LOGITS_KEY: teacher_logits * 1.0}
        return super().compute_loss(x, y, y_pred, sample_weight, **kw)


def test_an_override_of_compute_loss_that_repacks_the_batch_keeps_the_features():
    distiller = _RebuiltBatch(
        cnn(8, "teacher", 1),
        cnn(4, "student", 2),
        losses=[losses.SoftTargets(), losses.FeatureHint("block2/conv", "block2/conv")],
        name="rebuilt",
    )
    distiller.compile("adam")
    history = distiller.fit(X, Y, epochs=1, batch_size=16, verbose=0).history
    assert history["feature_hint_loss"][0] > 0.0
