"""Sequence-level and on-policy distillation of tiny KerasHub causal LMs,
on TensorFlow and JAX."""

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import hub_models  # noqa: E402

import kd_keras  # noqa: E402
from kd_keras import language  # noqa: E402

pytestmark = pytest.mark.all_backends

VOCABULARY, LENGTH = 32, 8


def causal_lm(hidden, seed):
    return hub_models.gpt2(hidden, vocabulary=VOCABULARY, length=LENGTH, seed=seed)


def prompts(rows=6, seed=0, length=LENGTH):
    """Prompts of 2 to 4 real tokens, padded to `length`."""
    rng = np.random.default_rng(seed)
    real = rng.integers(2, 5, rows)
    mask = np.arange(length) < real[:, None]
    ids = np.where(mask, rng.integers(1, VOCABULARY, (rows, length)), 0)
    return {"token_ids": ids.astype("int32"), "padding_mask": mask}


def test_teacher_generations_are_greedy_continuations_weighted_past_the_prompt():
    teacher = causal_lm(16, seed=1)
    given = prompts()
    x, y, weights = language.teacher_generations(
        teacher, given, sampler="greedy", batch_size=4
    )
    ids = np.concatenate([x["token_ids"][:, :1], y], axis=1)
    # The prompt is kept, the rest is the teacher's greedy choice.
    np.testing.assert_array_equal(
        ids[given["padding_mask"]], given["token_ids"][given["padding_mask"]]
    )
    for row in range(len(ids)):
        start = int(given["padding_mask"][row].sum())
        context = {
            "token_ids": ids[row : row + 1, :start],
            "padding_mask": np.ones((1, start), bool),
        }
        logits = keras.ops.convert_to_numpy(teacher(context))
        assert ids[row, start] == logits[0, -1].argmax()
    # Weights: 1 on every generated next token, 0 on the prompt's.
    expected = ~given["padding_mask"][:, 1:]
    np.testing.assert_array_equal(weights, expected.astype("float32"))


def test_teacher_generations_resume_from_their_folder(tmp_path):
    teacher = causal_lm(16, seed=1)
    given = prompts(rows=8)
    first = language.teacher_generations(
        teacher, given, sampler="greedy", batch_size=4, directory=tmp_path
    )
    (folder,) = tmp_path.glob("generations-*")
    (folder / "batch-000001.npz").unlink()  # As if cut short.
    calls = []
    generate = teacher.generate
    teacher.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    again = language.teacher_generations(
        teacher, given, sampler="greedy", batch_size=4, directory=tmp_path
    )
    assert len(calls) == 1  # Only the missing batch.
    for a, b in zip(keras.tree.flatten(first), keras.tree.flatten(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_student_learns_the_teachers_generations():
    teacher, student = causal_lm(16, seed=1), causal_lm(8, seed=2)
    x, y, weights = language.teacher_generations(
        teacher, prompts(rows=16), sampler="greedy"
    )
    student.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )
    before = student.evaluate(x, y, sample_weight=weights, verbose=0)[1]
    student.fit(x, y, sample_weight=weights, epochs=15, batch_size=8, verbose=0)
    after = student.evaluate(x, y, sample_weight=weights, verbose=0)[1]
    assert after > before


def test_on_policy_batches_mix_the_students_continuations(tmp_path):
    teacher, student = causal_lm(16, seed=1), causal_lm(8, seed=2)
    data_x, data_y, data_w = language.teacher_generations(
        teacher, prompts(rows=16, seed=3), sampler="greedy"
    )
    data = language.OnPolicyData(
        data_x,
        data_y,
        data_w,
        prompts=prompts(rows=8, seed=4),
        fraction=0.5,
        batch_size=4,
        buffer_size=16,
    )
    distiller = kd_keras.Distiller(
        teacher,
        student,
        temperature=1.0,
        distillation_weight=1.0,
        losses=kd_keras.losses.GeneralizedJSD(beta=0.5),
    )
    distiller.compile(optimizer="adam")
    refresh = language.OnPolicyRefresh(data, every=2, count=8, sampler="greedy")
    before = [w.copy() for w in student.get_weights()]
    distiller.fit(data, epochs=2, verbose=0, callbacks=[refresh])
    # Refreshed at the start and every 2 of 8 steps.
    assert data.refreshes == 1 + 4
    assert len(data.buffer[1]) == 16
    # The buffer holds the student's greedy continuations of its prompts.
    x, y, w = data.buffer
    assert w.sum() > 0
    # The newest, made after the last step, with the student's final weights.
    for row in range(8):
        first = int(np.argmax(w[row] > 0))
        context = {
            "token_ids": x["token_ids"][row : row + 1, : first + 1],
            "padding_mask": np.ones((1, first + 1), bool),
        }
        logits = keras.ops.convert_to_numpy(student(context))
        assert y[row, first] == logits[0, -1].argmax()
    assert any(
        not np.allclose(a, b)
        for a, b in zip(before, student.get_weights(), strict=True)
    )
    kinds = {
        "student"
        if any((x["token_ids"] == batch[0]["token_ids"][:1]).all(1))
        else "data"
        for batch in (data[i] for i in range(len(data)))
    }
    assert kinds == {"student", "data"}


@pytest.mark.parametrize(
    "bad, error",
    [
        ({"token_ids": np.zeros((2, 4), "int32")}, "dict of token ids"),
        (
            {
                "token_ids": np.zeros((2, 4), "int32"),
                "padding_mask": np.ones((2, 4), bool),
            },
            "nothing to generate",
        ),
        (
            {
                "token_ids": np.zeros((2, 4), "int32"),
                "padding_mask": np.array([[0, 1, 1, 0], [1, 0, 0, 0]], bool),
            },
            "real tokens first",
        ),
    ],
)
def test_bad_prompts_are_refused(bad, error):
    with pytest.raises(ValueError, match=error):
        language.teacher_generations(causal_lm(8, seed=1), bad)


def test_a_sampler_is_used_for_the_call_only_and_compile_settings_stay():
    teacher = causal_lm(16, seed=1)
    teacher.compile(optimizer="sgd", loss="mse")
    own = teacher.sampler
    language.teacher_generations(teacher, prompts(), sampler="greedy")
    assert teacher.sampler is own
    assert type(teacher.optimizer).__name__ == "SGD" and teacher.loss == "mse"
    with pytest.raises(ValueError, match="sampler='gredy'"):
        language.teacher_generations(teacher, prompts(), sampler="gredy")


def test_a_stop_token_that_pads_the_prompts_is_refused():
    with pytest.raises(ValueError, match=r"padded with a stop token \(\[0\]\)"):
        language.teacher_generations(causal_lm(8, seed=1), prompts(), stop_token_ids=0)


def test_a_model_with_a_preprocessor_is_refused():
    with pytest.raises(ValueError, match="generate"):
        language.teacher_generations(keras.Sequential([keras.Input((2,))]), prompts())


def test_the_buffer_keeps_its_size_and_draws_change_with_the_epoch():
    student = causal_lm(8, seed=2)
    x, y, w = language.training_triples(
        *[prompts(rows=12)[k] for k in ("token_ids", "padding_mask")],
        np.zeros((12, LENGTH), bool),
    )
    data = language.OnPolicyData(
        x,
        y,
        w,
        prompts=prompts(rows=4, length=LENGTH),
        fraction=0.5,
        batch_size=2,
        buffer_size=5,
    )
    data.refresh(student, 12)
    assert len(data.buffer[1]) == 5
    kinds = []
    for _ in range(2):
        kinds.append([data[i][0]["token_ids"].tobytes() for i in range(len(data))])
        data.on_epoch_end()
    assert kinds[0] != kinds[1]


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(fraction=1.5), "fraction"),
        (dict(seed=None), "seed"),
        (dict(use_multiprocessing=True), "use_multiprocessing=False"),
        (dict(y=np.zeros((3, LENGTH - 1), "int32")), "one shape"),
    ],
)
def test_on_policy_data_refuses_bad_arguments(change, error):
    x, y, w = language.training_triples(
        *[prompts(rows=6)[k] for k in ("token_ids", "padding_mask")],
        np.zeros((6, LENGTH), bool),
    )
    arguments = dict(x=x, y=y, sample_weight=w, prompts=prompts(rows=4), batch_size=2)
    arguments.update(change)
    with pytest.raises(ValueError, match=error):
        language.OnPolicyData(**arguments)
