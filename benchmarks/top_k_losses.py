"""How far each distillation loss moves when the teacher's logits come from
the top-k cache, on a language model's tokens.

A small GPT-2 teacher (KerasHub, 4,000-piece SentencePiece vocabulary) is
trained briefly on Shakespeare's training plays, and a smaller student
for fewer steps. On validation tokens, the teacher's logits are stored as
`cache_teacher_logits(..., top_k=k)` stores them (the k largest, their ids,
one value for the other classes that keeps their total probability at
T = 1) and rebuilt as it rebuilds them. For each loss, temperature and k it
reports the relative error of the mean loss over the tokens, and of its
gradient with respect to the student's logits (the L2 norm of the
difference over that of the exact gradient).

    python benchmarks/top_k_losses.py [--quick] [--backend jax]
"""

import time

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras
import numpy as np
import shakespeare

from kd_keras import _logit_files
from kd_keras import losses
from kd_keras import training

FLAGS = flags.FLAGS
common.define_backend_flag()
flags.DEFINE_bool("quick", False, "Fewer training steps and tokens.")
flags.DEFINE_string("shakespeare_dir", None, "Folder of the gzipped texts.")
flags.DEFINE_string("output_dir", str(common.RESULTS), "Where to write results.")

LENGTH = 64
QUICK = {"teacher_steps": 150, "student_steps": 60, "windows": 32}
FULL = {"teacher_steps": 600, "student_steps": 200, "windows": 128}
TEMPERATURES = (1.0, 2.0, 4.0)
TOP_K = (8, 32, 128)
LOSSES = {
    "forward KL (SoftTargets)": losses.SoftTargets(),
    "ReverseKL": losses.ReverseKL(),
    "GeneralizedJSD(0.5)": losses.GeneralizedJSD(0.5),
    "SkewKL(0.1)": losses.SkewKL(0.1),
    "SkewReverseKL(0.1)": losses.SkewReverseKL(0.1),
}


def trained(model, x, y, steps, batch=32):
    model.compile(keras.optimizers.Adam(1e-3), training.label_loss())
    epochs = max(1, steps * batch // len(y))
    count = min(len(y), steps * batch)
    model.fit(
        {k: v[:count] for k, v in x.items()},
        y[:count],
        batch_size=batch,
        epochs=epochs,
        verbose=0,
    )
    return model


def rebuilt(logits, k):
    """The logits as the top-k cache stores and rebuilds them."""
    flat = logits.reshape(-1, logits.shape[-1]).astype("float32")
    layout = _logit_files.Layout((logits.shape[-1],), "float32", k)
    return _logit_files.decode(_logit_files.encode(flat, layout), layout).reshape(
        logits.shape
    )


def value_and_gradient(loss, teacher, student, temperature):
    """The mean loss over the tokens and its gradient in the student's
    logits, by the backend's own differentiation."""

    def mean(s):
        return keras.ops.mean(loss.per_position(teacher, s, temperature))

    student = np.asarray(student, "float32")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        value, gradient = jax.value_and_grad(mean)(student)
        return float(value), np.asarray(gradient)
    import tensorflow as tf

    variable = tf.Variable(student)
    with tf.GradientTape() as tape:
        value = mean(variable)
    return float(value), tape.gradient(value, variable).numpy()


def main(argv):
    del argv
    chosen = QUICK if FLAGS.quick else FULL
    started = time.perf_counter()
    parts = shakespeare.split(FLAGS.shakespeare_dir)
    tokenizer = shakespeare.tokenizer(parts["train"])
    train = shakespeare.windows(
        shakespeare.token_ids(tokenizer, parts["train"]), LENGTH
    )
    held = shakespeare.windows(
        shakespeare.token_ids(tokenizer, parts["validation"]), LENGTH
    )
    np.random.default_rng(0).shuffle(train)
    x, y, _ = shakespeare.lm_arrays(train)
    teacher = trained(
        shakespeare.gpt2(128, 2, 4, LENGTH, seed=1), x, y, chosen["teacher_steps"]
    )
    student = trained(
        shakespeare.gpt2(64, 1, 2, LENGTH, seed=2), x, y, chosen["student_steps"]
    )
    x_held, _, _ = shakespeare.lm_arrays(held[: chosen["windows"]])
    t = np.asarray(keras.ops.convert_to_numpy(teacher.predict(x_held, verbose=0)))
    s = np.asarray(keras.ops.convert_to_numpy(student.predict(x_held, verbose=0)))
    t = t.reshape(-1, t.shape[-1])
    s = s.reshape(-1, s.shape[-1])
    rebuilt_t = {k: rebuilt(t, k) for k in TOP_K}
    p = np.exp(t - t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ranked = -np.sort(-p, axis=-1)
    mass = {k: float(ranked[:, :k].sum(-1).mean()) for k in TOP_K}
    rows, results = [], []
    for name, loss in LOSSES.items():
        for temperature in TEMPERATURES:
            exact, exact_gradient = value_and_gradient(loss, t, s, temperature)
            row = {"loss": name, "T": f"{temperature:g}"}
            for k in TOP_K:
                value, gradient = value_and_gradient(loss, rebuilt_t[k], s, temperature)
                value_error = abs(value - exact) / exact
                gradient_error = np.linalg.norm(gradient - exact_gradient) / (
                    np.linalg.norm(exact_gradient)
                )
                row[f"k = {k}"] = f"{value_error:.1%} / {gradient_error:.1%}"
                results.append(
                    {
                        "loss": name,
                        "temperature": temperature,
                        "k": k,
                        "exact": exact,
                        "value_error": value_error,
                        "gradient_error": gradient_error,
                    }
                )
            rows.append(row)
    minutes = (time.perf_counter() - started) / 60
    heading = (
        f"# Top-k teacher logits: relative error of each loss / of its gradient "
        f"({len(t):,} validation tokens, vocabulary {t.shape[-1]:,}; "
        f"{keras.backend.backend()}, {minutes:.1f} min). The teacher's "
        "probability in its top k at T = 1, mean over the tokens: "
        + ", ".join(f"{mass[k]:.0%} at k = {k}" for k in TOP_K)
        + "."
    )
    name = "top_k_losses_quick" if FLAGS.quick else "top_k_losses_full"
    common.write_report(
        FLAGS,
        name,
        heading,
        common.markdown_table(rows, list(rows[0])),
        {"settings": chosen, "top_k_mass": mass, "results": results},
    )


if __name__ == "__main__":
    app.run(main)
