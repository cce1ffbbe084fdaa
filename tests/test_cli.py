import shutil

import keras
import pytest

from kd_keras.apps import cli


def run(*args):
    return cli.run(["kd-keras", *map(str, args)])


@pytest.fixture(scope="module")
def model_trained_once(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.keras"
    train = ["--dataset=mnist_sample", "--epochs=1", "--verbose=0", "--hidden=8"]
    assert run("train", *train, f"--output={path}") == 0
    return path


@pytest.fixture
def trained_model(model_trained_once, tmp_path):
    """A tiny model trained by `kd-keras train`, as tmp_path/student.keras."""
    path = tmp_path / "student.keras"
    shutil.copy(model_trained_once, path)
    return path


COMMANDS = (
    "demo",
    "train",
    "distill",
    "chain",
    "paths",
    "tune",
    "export",
    "evaluate",
    "reproduce",
    "data",
)


def test_usage_lists_every_command(capsys):
    assert run() == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"    {name}" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_help_with_its_flags(command, capsys):
    assert run(command, "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kd-keras {command}")
    assert "--" in out.split("options:")[1]


def test_unknown_command_and_bad_flags_fail_with_a_hint(capsys):
    assert run("teach") == 2
    assert "invalid choice: 'teach'" in capsys.readouterr().err
    assert run("train", "--epochs=many", "--output=x.keras") == 2
    assert "kd-keras train --help" in capsys.readouterr().err
    assert run("train") == 2
    assert "--output" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_demo_prints_the_table_and_writes_the_students(tmp_path, capsys):
    assert (
        run(
            "demo",
            "--epochs=1",
            "--teacher_epochs=1",
            "--verbose=0",
            f"--workdir={tmp_path}",
        )
        == 0
    )
    out = capsys.readouterr().out
    for row in (
        "teacher 2x1200",
        "student 2x800 from scratch",
        "student 2x800 distilled",
    ):
        assert row in out
    assert "test_errors" in out
    for name in (
        "teacher.keras",
        "scratch_student.keras",
        "distilled_student.keras",
        "students_val_accuracy.png",
    ):
        assert (tmp_path / name).is_file()


@pytest.mark.slow
def test_train_distill_and_evaluate_on_the_sample(tmp_path, capsys):
    common = ["--dataset=mnist_sample", "--epochs=1", "--verbose=0", "--batch_size=256"]
    teacher, student = tmp_path / "teacher.keras", tmp_path / "student.keras"
    assert run("train", *common, "--hidden=64", f"--output={teacher}") == 0
    assert (
        run(
            "distill",
            *common,
            "--hidden=16",
            f"--teacher={teacher}",
            "--temperature=3",
            f"--output={student}",
        )
        == 0
    )
    loaded = keras.saving.load_model(student)
    assert loaded.count_params() == 784 * 16 + 16 + 16 * 10 + 10
    capsys.readouterr()
    assert run("evaluate", "--dataset=mnist_sample", f"--model={student}") == 0
    assert "test_errors" in capsys.readouterr().out


@pytest.mark.slow
def test_distill_reports_bad_values_without_a_traceback(
    trained_model, tmp_path, capsys
):
    teacher = trained_model
    assert (
        run(
            "distill",
            "--dataset=mnist_sample",
            f"--teacher={teacher}",
            "--temperature=0",
            f"--output={tmp_path / 's.keras'}",
        )
        == 2  # Refused by the flag's type, before anything loads.
    )
    assert "--temperature: expected a number > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_data_command_imports_mnist(shared_mnist, mnist_data_dir, capsys):
    assert run("data", f"--idx_dir={shared_mnist}", f"--data_dir={mnist_data_dir}") == 0
    out = capsys.readouterr().out
    assert "60000" in out and "10000" in out


def test_data_command_imports_fashion_mnist_and_names_the_flags(
    small_idx_set, tmp_path, capsys
):
    folder, _ = small_idx_set
    tfds_dir = tmp_path / "tfds"
    assert (
        run(
            "data",
            "--name=fashion_mnist",
            f"--idx_dir={folder}",
            f"--data_dir={tfds_dir}",
        )
        == 0
    )
    assert (
        f"Fashion-MNIST is ready in {tfds_dir}: pass --dataset fashion_mnist "
        f"--data_dir {tfds_dir}"
    ) in capsys.readouterr().out


@pytest.mark.slow
def test_train_on_fashion_mnist_after_the_data_command(small_idx_set, tmp_path):
    folder, _ = small_idx_set
    tfds_dir, model = tmp_path / "tfds", tmp_path / "model.keras"
    run("data", "--name=fashion_mnist", f"--idx_dir={folder}", f"--data_dir={tfds_dir}")
    train = ["--epochs=1", "--verbose=0", "--hidden=8", f"--output={model}"]
    assert (
        run("train", "--dataset=fashion_mnist", f"--data_dir={tfds_dir}", *train) == 0
    )
    assert model.is_file()


@pytest.mark.slow
def test_teacher_snapshots_and_student_early_stop_from_the_cli(tmp_path, capsys):
    common = ["--dataset=mnist_sample", "--verbose=0", "--batch_size=512"]
    teacher = tmp_path / "teacher.keras"
    assert (
        run(
            "train",
            *common,
            "--epochs=3",
            "--hidden=32",
            "--snapshot_epochs=1,2",
            f"--output={teacher}",
        )
        == 0
    )
    assert "Snapshots of epochs 1, 2" in capsys.readouterr().out
    assert (tmp_path / "teacher.snapshots" / "epoch_001.keras").is_file()
    student = tmp_path / "student.keras"
    assert (
        run(
            "distill",
            *common,
            "--epochs=2",
            "--hidden=8",
            f"--teacher={teacher}",
            "--teacher_snapshot=1",
            "--student_early_stop_epoch=1",
            f"--output={student}",
        )
        == 0
    )
    assert "labels only from epoch 2" in capsys.readouterr().out
    assert (
        run(
            "distill",
            *common,
            "--epochs=1",
            "--hidden=8",
            f"--teacher={teacher}",
            "--teacher_snapshot=7",
            f"--output={student}",
        )
        == 1
    )
    assert "Available epochs: 1, 2" in capsys.readouterr().err


@pytest.mark.slow
def test_chain_and_paths_print_tables_and_write_plots(tmp_path, capsys):
    common = [
        "--dataset=mnist_sample",
        "--train_split=train[:1000]",
        "--val_split=train[7500:]",
        "--test_split=test[:500]",
        "--family=mlp",
        "--epochs=1",
        "--batch_size=250",
        f"--workdir={tmp_path}",
    ]
    assert run("chain", *common, "--sizes=64,16,4") == 0
    out = capsys.readouterr().out
    assert "mlp_16" in out and "mlp_4" in out and "Student test errors" in out
    assert (tmp_path / "chain.png").is_file()
    assert run("chain", *common, "--sizes=64,16,4") == 0
    out = capsys.readouterr().out
    assert "Reusing the teacher" in out and "True" in out
    assert (
        run(
            "paths", *common, "--teacher_size=64", "--candidates=16", "--student_size=4"
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "teacher → 16 → student" in out
    assert "3 distinct steps against 3" in out
    assert (tmp_path / "paths.png").is_file()


@pytest.mark.slow
def test_tune_prints_the_trials_and_the_best_settings(tmp_path, capsys):
    assert (
        run(
            "tune",
            "--dataset=mnist_sample",
            "--train_split=train[:500]",
            "--val_split=train[7500:]",
            "--family=mlp",
            "--teacher_size=32",
            "--student_size=4",
            "--assistant_sizes=8",
            "--temperatures=2,4",
            "--distillation_weights=0.5,1,0.5",
            "--tuner=random",
            "--max_trials=2",
            "--epochs=1",
            "--batch_size=250",
            f"--workdir={tmp_path}",
            "--project_name=s",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Best: {" in out and "'train': 1" in out
    assert (tmp_path / "s" / "best_hyperparameters.json").is_file()
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 1000


@pytest.mark.slow
def test_export_prints_the_report_table(trained_model, tmp_path, capsys):
    model = trained_model
    assert (
        run(
            "export",
            "--dataset=mnist_sample",
            f"--model={model}",
            "--formats=saved_model,tflite,tflite_dynamic,tflite_int8",
            "--representative_split=train[:200]",
            "--test_split=test[:500]",
        )
        == 0
    )
    out = capsys.readouterr().out
    for fmt in ("keras", "saved_model", "tflite", "tflite_dynamic", "tflite_int8"):
        assert f"\n{fmt} " in out
    assert (tmp_path / "student_export" / "student_int8.tflite").is_file()


@pytest.mark.slow
def test_export_needs_no_data_for_float_formats(trained_model, capsys, monkeypatch):
    from kd_keras import data

    model = trained_model
    monkeypatch.setattr(
        data, "load", lambda *a, **k: pytest.fail("export loaded a dataset")
    )
    assert run("export", f"--model={model}", "--formats=tflite") == 0
    assert "Compared on 300 random normal inputs" in capsys.readouterr().out
    assert run("export", f"--model={model}", "--formats=tflite_int8") == 1
    assert "--dataset" in capsys.readouterr().err


def test_distill_needs_a_teacher(tmp_path, capsys):
    assert (
        run("distill", "--dataset=mnist_sample", f"--output={tmp_path / 's.keras'}")
        == 1
    )
    assert "--teacher" in capsys.readouterr().err


def test_commands_keep_their_own_defaults():
    parser = cli._parser()
    train = parser.parse_args(["train", "--output=x.keras"])
    chain = parser.parse_args(["chain"])
    assert (train.epochs, train.family, train.train_split) == (10, "mlp", "train")
    assert (chain.epochs, chain.family, chain.train_split) == (
        5,
        "plain_cnn",
        "train[:90%]",
    )


@pytest.mark.slow
def test_logdir_writes_tensorboard_logs_with_both_terms_t_and_lambda(tmp_path):
    import tensorflow as tf

    common = [
        "--dataset=mnist_sample",
        "--train_split=train[:512]",
        "--test_split=test[:256]",
        "--epochs=1",
        "--verbose=0",
        "--batch_size=256",
        "--hidden=8",
    ]
    teacher = tmp_path / "teacher.keras"
    assert run("train", *common, f"--output={teacher}") == 0
    assert (
        run(
            "distill",
            *common,
            f"--teacher={teacher}",
            f"--output={tmp_path / 's.keras'}",
            f"--logdir={tmp_path / 'logs'}",
        )
        == 0
    )
    tags = set()
    for events in (tmp_path / "logs").rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            tags.update(value.tag for value in event.summary.value)
    assert {
        "epoch_student_loss",
        "epoch_distillation_loss",
        "epoch_temperature",
        "epoch_distillation_weight",
    } <= tags


def test_flags_without_a_command_ask_for_one(capsys):
    assert run("--verbosity=0") == 2
    assert "COMMAND" in capsys.readouterr().err
