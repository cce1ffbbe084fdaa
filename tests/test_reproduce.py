import json

import numpy as np
import pytest

from kd_keras.apps import cli
from kd_keras.apps import reproduce


def test_the_bias_shift_is_chosen_on_validation_accuracy():
    # Class 2 is under-predicted: its logit is 2.5 too low on every example,
    # so shifts from 0.75 to 4.25 fix it; the smallest such shift is chosen.
    labels = np.array([0, 1, 2, 2, 2])
    logits = np.eye(3)[labels] * 2.0
    logits[:, 2] -= 2.5
    shift = reproduce._best_shift(logits, labels, (2,), np.arange(0.0, 5.01, 0.25))
    assert shift == 0.75
    shifted = reproduce._shifted(logits, (2,), shift)
    assert np.all(np.argmax(shifted, -1) == labels)
    assert reproduce._errors(logits, labels, only=2) == 3


@pytest.mark.slow
def test_a_tiny_reproduction_writes_the_table_beside_the_paper(
    mnist_data_dir, tmp_path
):
    settings = dict(
        train_split="train[:600]",
        small_split="train[:200]",
        val_split="train[59000:]",
        test_split="test[:2000]",
        teacher_epochs=1,
        epochs=1,
        small_epochs=1,
        teacher_hidden=(32, 32),
        student_hidden=(16, 16),
    )
    result = reproduce.hinton_mnist(
        data_dir=mnist_data_dir,
        output_dir=tmp_path,
        seeds=1,
        name="tiny",
        settings=settings,
    )
    table = (tmp_path / "tiny.md").read_text()
    for row, paper in (
        ("teacher 32×32", "67"),
        ("from scratch", "146"),
        ("T = 20", "74"),
        ("without any 3", "206 (133 on 3s)"),
        ("raised by 3.5", "109 (14 on 3s)"),
        ("7s and 8s only", "47.3%"),
        ("lowered by 7.6", "13.2%"),
        ("3% of the labels", ""),
    ):
        line = next(
            row_line
            for row_line in table.splitlines()
            if row_line.startswith("| ") and row in row_line
        )
        assert f"| {paper} |" in line or not paper
    assert "| target | measured | met |" in table
    for run in result["runs"]:
        assert 0 <= run["omit3_on3"] <= 2000
        assert 0 <= run["distilled_T20"] <= 2000
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert len(saved["runs"]) == 1 and len(saved["targets_met"]) == 3
    for png in ("tiny_temperature.png", "tiny_errors_by_temperature.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_reproduce_needs_a_known_experiment(capsys):
    assert cli.run(["kd-keras", "reproduce", "imagenet"]) == 2
    assert "hinton-mnist" in capsys.readouterr().err


def fake_results(seed):
    results = {
        key: 100 + seed
        for key in (
            "teacher",
            "scratch",
            "omit3",
            "omit3_on3",
            "omit3_bias_val",
            "omit3_bias_val_on3",
            "omit3_bias_paper",
            "omit3_bias_paper_on3",
            "only78",
            "only78_bias_val",
            "only78_bias_paper",
            "small_scratch",
            "small_soft",
        )
    }
    results.update({f"distilled_T{t:g}": 90 for t in reproduce.TEMPERATURES})
    results.update(
        omit3_bias_val_shift=3.0,
        only78_bias_val_shift=-7.0,
        teacher_example_logits=list(range(10)),
    )
    return results


@pytest.mark.slow
def test_a_rerun_keeps_the_finished_seeds(mnist_data_dir, tmp_path, monkeypatch):
    seeds_run = []

    def fake_run(run):
        seeds_run.append(run.seed)
        return fake_results(run.seed)

    monkeypatch.setattr(reproduce._Run, "run", fake_run)
    settings = dict(
        train_split="train[:100]",
        val_split="train[59900:]",
        test_split="test[:100]",
        epochs=1,
    )
    arguments = dict(
        data_dir=mnist_data_dir, output_dir=tmp_path, name="r", settings=settings
    )
    reproduce.hinton_mnist(seeds=1, **arguments)
    result = reproduce.hinton_mnist(seeds=2, **arguments)
    assert seeds_run == [0, 1]
    assert [run["teacher"] for run in result["runs"]] == [100, 101]
    settings["epochs"] = 2
    reproduce.hinton_mnist(seeds=1, **arguments)
    assert seeds_run == [0, 1, 0]


def test_cosine_decay_halves_the_rate_midway_and_ends_near_zero():
    (callback,) = reproduce._cosine_decay(10, learning_rate=1e-3)
    rates = [callback.schedule(epoch, None) for epoch in range(10)]
    np.testing.assert_allclose(
        rates, [5e-4 * (1 + np.cos(np.pi * e / 10)) for e in range(10)]
    )
    assert rates[0] == 1e-3 and rates[5] == 5e-4
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
