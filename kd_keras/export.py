"""Exporting a student to SavedModel and TFLite, with a parity report.

Every format is written, read back and run against the Keras model on
held-out inputs, so an export that silently differs is caught: a float format
whose logits differ by more than `tolerance` raises. The report gives, per
format, the file size, the largest logit difference, the argmax agreement,
the single-example latency and (with labels) the accuracy.
"""

import pathlib
import time
import warnings

from absl import logging
import keras
import numpy as np

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _io
from kd_keras.distiller import Distiller
from kd_keras.training import class_ids
from kd_keras.training import predicted_classes

FORMATS = ("saved_model", "tflite", "tflite_dynamic", "tflite_int8")
FLOAT_FORMATS = ("saved_model", "tflite")
TFLITE_FILES = {
    "tflite": "student.tflite",
    "tflite_dynamic": "student_dynamic.tflite",
    "tflite_int8": "student_int8.tflite",
}


def _check_formats(formats, representative_data):
    if formats is None:
        formats = FORMATS if representative_data is not None else FORMATS[:-1]
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"Expected `formats` among {FORMATS}. Received: {formats}")
    if "tflite_int8" in formats and representative_data is None:
        raise ValueError(
            "`tflite_int8` calibrates its int8 ranges on example inputs: pass "
            "`representative_data` (a batched dataset or an array of a few "
            "hundred training inputs), or leave out 'tflite_int8'."
        )
    return formats


def _as_model(model):
    if isinstance(model, Distiller):
        logging.info("Exporting the Distiller's student (not its teacher).")
        return model.student
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Expected a `keras.Model` (or a `kd_keras.Distiller`, whose "
            f"student is exported). Received: {type(model).__name__}. Load a "
            "saved model first with `keras.saving.load_model(path)`."
        )
    if not model.built:
        raise ValueError(
            f"The model `{model.name}` is not built. Call it on data or "
            "`model.build(input_shape)` before exporting."
        )
    return model


def _arrays(data, limit=None):
    """(inputs, labels or None, sample weights or None) from a dataset, an
    array, `(x, y)` or `(x, y, sample_weight)`; inputs may be a dict of
    arrays (e.g. a KerasHub model's token ids and padding mask)."""
    if data is None:
        return None, None, None
    if _backend.is_tf_dataset(data) or isinstance(data, keras.utils.PyDataset):
        xs, ys, ws = [], [], []
        for x, y, w in _datasets.numpy_batches(data):
            xs.append(x)
            ys.extend([] if y is None else [y])
            ws.extend([] if w is None else [w])
            if limit and sum(_example_count(a) for a in xs) >= limit:
                break
        x = keras.tree.map_structure(lambda *parts: np.concatenate(parts), *xs)
        y = np.concatenate(ys) if ys else None
        w = np.concatenate(ws) if ws and len(ws) == len(xs) else None
    elif isinstance(data, tuple):
        x, y = _as_arrays(data[0]), np.asarray(data[1])
        w = np.asarray(data[2]) if len(data) > 2 and data[2] is not None else None
    else:
        x, y, w = _as_arrays(data), None, None
    if limit:
        x = _slice(x, 0, limit)
        y = None if y is None else y[:limit]
        w = None if w is None else w[:limit]
    return x, y, w


def _as_arrays(x):
    """A dict of arrays as it is; anything else as one float32 array."""
    if isinstance(x, dict):
        return {name: np.asarray(value) for name, value in x.items()}
    return np.asarray(x).astype("float32")


def _example_count(x):
    return len(keras.tree.flatten(x)[0])


def _slice(x, start, stop):
    return keras.tree.map_structure(lambda a: a[start:stop], x)


def _like_model_inputs(model, x):
    """Dict inputs in the dtypes of the model's inputs of the same names
    (a bool padding mask for an int32 input), as the exports take them."""
    if not isinstance(x, dict):
        return x
    dtypes = {t.name: t.dtype for t in getattr(model, "inputs", None) or []}
    return {
        name: value.astype(dtypes[name]) if name in dtypes else value
        for name, value in x.items()
    }


def _size(path):
    path = pathlib.Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _median_ms(run, example, repeats):
    run(example)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(example)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _interpreter(content):
    import tensorflow as tf

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite's deprecation notice.
            Interpreter = tf.lite.Interpreter
    return Interpreter(model_content=content)


class _TFLiteRunner:
    """Runs a TFLite flatbuffer on batches of any size; dict inputs go to
    its serving signature by name."""

    def __init__(self, content):
        self.interpreter = _interpreter(content)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = None
        self.signature = None

    def __call__(self, x):
        if isinstance(x, dict):
            if self.signature is None:
                self.signature = self.interpreter.get_signature_runner()
            (outputs,) = self.signature(**x).values()
            return outputs.astype("float32")
        if self.batch != x.shape:
            self.interpreter.resize_tensor_input(self.input["index"], x.shape)
            self.interpreter.allocate_tensors()
            self.batch = x.shape
        self.interpreter.set_tensor(self.input["index"], x.astype(self.input["dtype"]))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).astype("float32")


def _in_batches(run, x, batch_size=500):
    return np.concatenate(
        [
            run(_slice(x, i, i + batch_size))
            for i in range(0, _example_count(x), batch_size)
        ]
    )


def _convert(saved_model_dir, fmt, representative):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    if fmt in ("tflite_dynamic", "tflite_int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if fmt == "tflite_int8":

        def examples():
            for index in range(_example_count(representative)):
                row = _slice(representative, index, index + 1)
                yield row if isinstance(row, dict) else [row]

        converter.representative_dataset = examples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def export_student(
    model,
    directory,
    formats=None,
    representative_data=None,
    test_data=None,
    tolerance=1e-4,
    calibration_examples=500,
    latency_repeats=200,
):
    """Exports a model to SavedModel and TFLite and checks each export.

    Writes `directory/saved_model/` (with a `serving_default` signature),
    `student.tflite` (float), `student_dynamic.tflite` (dynamic-range
    quantised weights) and `student_int8.tflite` (int8 weights and
    activations, calibrated on `representative_data`, with float input and
    output). Each is read back and compared with the Keras model on
    `test_data` (or, without it, on the representative inputs, or without
    those on 300 seeded random normal inputs of the model's input shape; the
    report's `compared_on` says which): the largest absolute logit
    difference and the argmax agreement in %. A float format
    that differs by more than `tolerance` raises `ValueError`. The report
    (also written as `directory/report.json`) adds file sizes, the median
    single-example latency and, when `test_data` has labels, accuracy.
    It runs with Keras on TensorFlow, and on JAX with TensorFlow installed
    (Keras' `model.export` converts the model through jax2tf); on PyTorch it
    raises an error that says how to export from a TensorFlow process.
    Quantised formats are not held to `tolerance`; compare their accuracy
    (the test suite holds int8 to at most 1 point below Keras on the 2,000
    sample test digits; on full MNIST it lost under 0.05 points).

    Args:
        model: the `keras.Model` to export (a `Distiller` exports its
            student).
        directory: output folder.
        formats: any of "saved_model", "tflite", "tflite_dynamic",
            "tflite_int8". Every TFLite format is converted from the
            SavedModel, which is written in any case. By default all four
            with `representative_data`, and without it all but
            "tflite_int8", which needs data to calibrate.
        representative_data: training inputs (a batched dataset, an array, or
            `(x, y)`) to calibrate int8; required for "tflite_int8".
        test_data: held-out inputs and labels (a batched dataset, `(x, y)`
            or `(x, y, sample_weight)`) to compare on; labels may be class
            ids or one-hot. Inputs may be a dict of arrays by input name, as
            KerasHub models take (`{"token_ids": ..., "padding_mask":
            ...}`). Accuracy weighs examples (or tokens) by the sample
            weights, else tokens by the inputs' padding mask; the logit
            difference and the argmax agreement take every position.
        tolerance: the largest logit difference a float format may show.
        calibration_examples: how many representative inputs calibrate int8.
        latency_repeats: timed single-example runs per format.

    Returns:
        The report: `{"keras": {"latency_ms", "params", "compared_on",
        "accuracy"}, format: {"path", "bytes", "max_abs_diff",
        "argmax_agreement_percent", "latency_ms", "accuracy"}}` (accuracy
        only with labels).

    Example:

        ```python
        report = kd_keras.export.export_student(
            distiller.student, "export", representative_data=train,
            test_data=test)
        report["tflite_int8"]["accuracy"]
        ```
    """
    _check_backend()
    tf = _backend.require_tensorflow(
        "Export to SavedModel and TFLite (Keras' `model.export`)"
    )
    model = _as_model(model)
    formats = _check_formats(formats, representative_data)
    representative, _, _ = _arrays(representative_data, calibration_examples)
    if representative is not None:
        _checks.check_batched(representative, model, "model", "representative_data")
        representative = _like_model_inputs(model, representative)
    (x_test, y_test, w_test), compared_on = _comparison_data(
        model, test_data, representative
    )
    _checks.check_batched(x_test, model, "model", "test_data")
    x_test = _like_model_inputs(model, x_test)
    directory = _io.make_folder(directory, "directory")
    expected = _in_batches(
        lambda x: np.asarray(model.predict_on_batch(x), "float32"), x_test
    )
    report = {
        "keras": {
            "latency_ms": _median_ms(
                model.predict_on_batch, _slice(x_test, 0, 1), latency_repeats
            ),
            "params": model.count_params(),
            "compared_on": compared_on,
            **_accuracy(expected, y_test, w_test, x_test),
        }
    }
    failures = []
    for fmt, (path, run) in _write_formats(
        tf, model, directory, formats, representative
    ).items():
        got = _in_batches(run, x_test)
        report[fmt] = {
            "path": str(path),
            "bytes": _size(path),
            "max_abs_diff": float(np.max(np.abs(got - expected))),
            "argmax_agreement_percent": 100.0
            * float(np.mean(predicted_classes(got) == predicted_classes(expected))),
            "latency_ms": _median_ms(run, _slice(x_test, 0, 1), latency_repeats),
            **_accuracy(got, y_test, w_test, x_test),
        }
        if fmt in FLOAT_FORMATS and report[fmt]["max_abs_diff"] > tolerance:
            failures.append(f"{fmt}: {report[fmt]['max_abs_diff']:.3g}")
    _io.write_json(directory / "report.json", report)
    if failures:
        raise ValueError(
            f"Float exports differ from the Keras model by more than "
            f"tolerance={tolerance:g} ({'; '.join(failures)}); see "
            f"{directory / 'report.json'}. The model may use an op the "
            "converter approximates; check its custom layers."
        )
    return report


def _check_backend():
    if _backend.name() == "torch":
        raise ValueError(
            "export_student runs with Keras on TensorFlow or JAX: on PyTorch, "
            "Keras' SavedModel export goes through `torch.export`, which "
            "fails on common models. Save the model (`model.save("
            "'student.keras')`; the file is the same on every backend) and "
            "export it with TensorFlow: `KERAS_BACKEND=tensorflow kd-keras "
            "export --model student.keras`."
        )


RANDOM_INPUTS = 300


def _comparison_data(model, test_data, representative):
    """`((inputs, labels or None, weights or None), what they are)` to
    compare the exports on:
    the test data, else the representative inputs, else seeded random
    inputs of the model's input shape."""
    arrays = _arrays(test_data)
    if arrays[0] is not None:
        return arrays, "test data"
    if representative is not None:
        logging.warning(
            "No `test_data`: comparing the exports with the Keras model on "
            "the representative (training) inputs, which are not held out. "
            "Pass `test_data` for a held-out comparison and accuracy."
        )
        arrays = (representative, None, None)
        return arrays, "representative inputs (not held out)"
    try:
        (model_input,) = model.inputs
    except (AttributeError, TypeError, ValueError):
        model_input = None
    shape = None if model_input is None else tuple(model_input.shape[1:])
    if shape is None or None in shape or "float" not in str(model_input.dtype):
        given = _input_description(model)
        raise ValueError(
            f"The model `{model.name}` takes {given}, for which random float "
            "inputs cannot be made. Pass `test_data` to compare the exports on."
        )
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((RANDOM_INPUTS, *shape)).astype("float32")
    return (inputs, None, None), f"{RANDOM_INPUTS} random normal inputs (seed 0)"


def _input_description(model):
    inputs = getattr(model, "inputs", None) or []
    described = [f"{t.name} {tuple(t.shape)} {t.dtype}" for t in inputs]
    return "inputs " + ", ".join(described) if described else "unknown inputs"


def _accuracy(logits, labels, weights, x):
    """Accuracy; for tokens over the real ones: those the sample weights
    keep, else those of the inputs' padding mask."""
    if labels is None:
        return {}
    correct = predicted_classes(logits) == class_ids(labels, logits)
    if weights is None and isinstance(x, dict):
        weights = x.get("padding_mask")
    if weights is None or np.shape(weights) != correct.shape:
        weights = np.ones_like(correct)
    weights = np.asarray(weights, "float64")
    return {"accuracy": float(np.sum(correct * weights) / max(np.sum(weights), 1e-12))}


def _write_formats(tf, model, directory, formats, representative):
    """Writes every format; returns `{format: (path, run)}` to compare."""
    saved_model_dir = directory / "saved_model"
    model.export(str(saved_model_dir), format="tf_saved_model", verbose=False)
    runners = {}
    if "saved_model" in formats:
        loaded = tf.saved_model.load(str(saved_model_dir))
        runners["saved_model"] = (saved_model_dir, lambda x: loaded.serve(x).numpy())
    for fmt in formats:
        if fmt == "saved_model":
            continue
        content = _convert(saved_model_dir, fmt, representative)
        path = directory / TFLITE_FILES[fmt]
        path.write_bytes(content)
        runners[fmt] = (path, _TFLiteRunner(content))
    return runners
