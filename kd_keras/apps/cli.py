"""`kd-keras`: a thin command line over the library.

    kd-keras COMMAND [--flag=value ...]
    kd-keras COMMAND --help

Each command is a few public library calls; the command prints what they
return. Subcommands are absl's `argparse_flags` parsers; each flag is
defined once, in a group that the commands using it share, and a command's
own defaults are set on its parser.
"""

import argparse
import pathlib
import sys

from absl import logging
from absl.flags import argparse_flags

from kd_keras.apps import commands


class _Parser(argparse_flags.ArgumentParser):
    """An argparse parser whose errors are one line that names the flag and
    points at the command's help."""

    def error(self, message):
        message = message.removeprefix("argument ")
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


# Flag values: each type refuses what no command can use, before any work,
# with an error argparse prints as `--flag: <message>`.


def _value(text, convert, what, check=lambda value: True):
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not check(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text):
    return _value(text, int, "an integer >= 1", lambda v: v >= 1)


def _natural(text):
    return _value(text, int, "an integer >= 0", lambda v: v >= 0)


def _positive(text):
    return _value(text, float, "a number > 0", lambda v: 0 < v < float("inf"))


def _fraction(text):
    return _value(text, float, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def _rate(text):
    return _value(text, float, "a rate in [0, 1)", lambda v: 0 <= v < 1)


def _list(text, convert):
    parts = [part for part in text.split(",") if part.strip()]
    return tuple(convert(part) for part in parts) if parts else None


def _ints(text):
    return _value(
        text,
        lambda t: _list(t, int),
        "integers >= 1 separated by commas",
        lambda v: all(i >= 1 for i in v),
    )


def _temperatures(text):
    return _value(
        text,
        lambda t: _list(t, float),
        "numbers > 0 separated by commas",
        lambda v: all(0 < t < float("inf") for t in v),
    )


def _weight_range(text):
    return _value(
        text,
        lambda t: _list(t, float),
        "min,max,step with 0 <= min <= max <= 1 and step > 0",
        lambda v: len(v) == 3 and 0 <= v[0] <= v[1] <= 1 and v[2] > 0,
    )


def _names(text):
    return _value(text, lambda t: _list(t, str.strip), "names separated by commas")


def _folder(text):
    """A folder path where no existing part is a file."""
    path = pathlib.Path(text)
    blocking = next(
        (p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None
    )
    if blocking is not None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a folder: {str(blocking)!r} is a file"
        )
    return text


def _file(text):
    """A file path whose folder can exist."""
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, expected a file")
    _folder(str(path.parent))
    return text


def _flag(name, help, **options):
    """One flag: its name, help and `add_argument` options."""
    return name, dict(help=help, **options)


# Flag groups: every flag is defined once, here. A command's parser adds the
# groups it uses anew, so that its own defaults (`set_defaults`) never leak
# into another's, as they would through argparse's shared parent parsers.
DATASET = (
    _flag(
        "--dataset",
        "tfds name such as mnist or fashion_mnist (see `data`), or "
        "mnist_sample (shipped).",
        default="mnist",
    ),
    _flag("--batch_size", "Batch size.", type=_positive_int, default=128),
)
SPLITS = (
    _flag("--train_split", "Split to train on.", default="train"),
    _flag("--val_split", "Split to validate on; the test split if unset."),
)
TEST_SPLIT = (_flag("--test_split", "Split to test on.", default="test"),)
DATA_DIR = (
    _flag("--data_dir", "tensorflow-datasets folder (see `data`).", type=_folder),
)
SEED = (
    _flag("--seed", "Seed of weights, shuffles and jitter.", type=_natural, default=0),
)
FAMILY = (
    _flag("--family", "Model family.", choices=("mlp", "plain_cnn"), default="mlp"),
    _flag("--width", "plain_cnn: width multiplier.", type=_positive, default=1.0),
)
SHAPE = (
    _flag(
        "--hidden",
        "mlp: hidden widths, e.g. 1200,1200.",
        type=_ints,
        default=(800, 800),
    ),
    _flag("--dropout", "mlp: dropout after hidden layers.", type=_rate, default=0.0),
    _flag("--input_dropout", "mlp: dropout on the inputs.", type=_rate, default=0.0),
    _flag(
        "--max_norm", "mlp: max-norm of each unit's incoming weights.", type=_positive
    ),
    _flag(
        "--depth", "plain_cnn: depth.", type=int, choices=(2, 4, 6, 8, 10), default=2
    ),
)
EPOCHS = (
    _flag(
        "--epochs", "Epochs (of each model or step).", type=_positive_int, default=10
    ),
)
TEACHER_EPOCHS = (
    _flag("--teacher_epochs", "Epochs of a teacher trained here.", type=_positive_int),
)
OPTIMIZER = (
    _flag("--optimizer", "Keras optimizer name, e.g. adam or sgd.", default="adam"),
    _flag("--learning_rate", "Its learning rate.", type=_positive, default=1e-3),
)
VERBOSE = (
    _flag("--verbose", "Keras verbosity.", type=int, choices=(0, 1, 2), default=1),
)
LOGDIR = (_flag("--logdir", "TensorBoard logs here (loss terms, T, λ).", type=_folder),)
OUTPUT = (
    _flag(
        "--output",
        "Where to write the trained .keras model.",
        type=_file,
        required=True,
    ),
    _flag(
        "--jitter", "Shift training images by up to N pixels.", type=_natural, default=0
    ),
)
OUTPUT_DIR = (_flag("--output_dir", "Folder to write to.", type=_folder),)
WORKDIR = (
    _flag(
        "--workdir",
        "Folder of the work; a rerun continues it.",
        type=_folder,
        default="kd_keras_runs",
    ),
)
KD = (
    _flag(
        "--temperature", "Distillation temperature T > 0.", type=_positive, default=4.0
    ),
    _flag("--distillation_weight", "Weight λ in [0, 1].", type=_fraction, default=0.9),
)
TEACHER = (_flag("--teacher", "The trained teacher (.keras)."),)
SIZES = (
    _flag("--teacher_size", "Size of the teacher.", default="10"),
    _flag("--student_size", "Size of the student.", default="2"),
)
MODEL_FILE = (_flag("--model", "The .keras model.", required=True),)
SNAPSHOTS = (
    _flag(
        "--snapshot_epochs",
        "Also save after these epochs, e.g. 5,10.",
        type=_ints,
        default=(),
    ),
    _flag("--snapshot_every", "Also save every N epochs.", type=_positive_int),
)
DISTILL = (
    _flag(
        "--cache_teacher",
        "Cache the teacher's logits.",
        choices=("auto", "yes", "no"),
        default="auto",
    ),
    _flag(
        "--teacher_snapshot",
        "Distil from this epoch's teacher snapshot.",
        type=_positive_int,
    ),
    _flag("--student_early_stop_epoch", "Labels only from this epoch.", type=_natural),
    _flag("--student_early_stop_monitor", "Labels only once this metric plateaus."),
    _flag(
        "--student_early_stop_patience",
        "Epochs of that plateau.",
        type=_natural,
        default=2,
    ),
)
CHAIN = (
    _flag(
        "--sizes", "Sizes, teacher to student.", type=_names, default=("10", "4", "2")
    ),
)
PATHS = (
    _flag(
        "--candidates",
        "Assistants, largest first.",
        type=_names,
        default=("8", "6", "4"),
    ),
)
TUNE = (
    _flag(
        "--assistant_sizes",
        "Assistants to choose from.",
        type=_names,
        default=("8", "6", "4"),
    ),
    _flag(
        "--temperatures",
        "Temperatures to choose from.",
        type=_temperatures,
        default=(1.0, 2.0, 5.0, 10.0, 15.0, 20.0),
    ),
    _flag(
        "--distillation_weights",
        "min,max,step of λ.",
        type=_weight_range,
        default=(0.05, 1.0, 0.05),
    ),
    _flag(
        "--tuner",
        "keras-tuner tuner.",
        choices=("bayesian", "random", "hyperband"),
        default="bayesian",
    ),
    _flag("--max_trials", "Trials of the sweep.", type=_positive_int, default=12),
    _flag("--project_name", "The sweep's name in --workdir.", default="sweep"),
    _flag(
        "--overwrite",
        "Start afresh instead of resuming.",
        action=argparse.BooleanOptionalAction,
        default=False,
    ),
    _flag(
        "--mixed_precision",
        "Students' dtype policy.",
        choices=("mixed_float16", "mixed_bfloat16"),
    ),
    _flag(
        "--jit_compile",
        "XLA compilation.",
        choices=("auto", "true", "false"),
        default="auto",
    ),
)
EXPORT = (
    _flag(
        "--formats",
        "Formats; tflite_int8 needs --dataset.",
        type=_names,
        default=("saved_model", "tflite", "tflite_dynamic"),
    ),
    _flag(
        "--representative_split", "Split that calibrates int8.", default="train[:1000]"
    ),
    _flag(
        "--tolerance",
        "Largest logit difference of float formats.",
        type=_positive,
        default=1e-4,
    ),
)
EXPERIMENTS = ("hinton-mnist",)
REPRODUCE = (
    _flag("experiment", "The experiment to rerun.", choices=EXPERIMENTS),
    _flag(
        "--quick",
        "A run of about 10 minutes instead of 90.",
        action=argparse.BooleanOptionalAction,
        default=False,
    ),
    _flag("--seeds", "Seeds (default: 3, or 2 quick).", type=_positive_int),
)
IDX = (
    _flag(
        "--idx_dir",
        "Folder of the four IDX files of MNIST or Fashion-MNIST.",
        type=_folder,
        required=True,
    ),
    _flag(
        "--name",
        "tfds name to import the files as (then --dataset NAME).",
        choices=("mnist", "fashion_mnist"),
        default="mnist",
    ),
)
FITTING = (DATASET, SPLITS, DATA_DIR, SEED, FAMILY, EPOCHS, OPTIMIZER, VERBOSE, LOGDIR)
TRAINING = (*FITTING, TEST_SPLIT)
# Commands that choose by validation accuracy hold it out of the training
# split, and climb the ladder of plain CNNs of the assistants' paper.
LADDER = (*TRAINING, KD, TEACHER, TEACHER_EPOCHS, WORKDIR)
LADDER_DEFAULTS = dict(
    train_split="train[:90%]",
    val_split="train[90%:]",
    family="plain_cnn",
    width=0.25,
    epochs=5,
    verbose=0,
)


def _parser():
    parser = _Parser(
        prog="kd-keras",
        description="Knowledge distillation for Keras. "
        "`kd-keras COMMAND --help` lists a command's flags.",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser, required=True
    )
    for function, groups, defaults in (
        (
            commands.demo,
            (WORKDIR, EPOCHS, TEACHER_EPOCHS, KD, SEED, VERBOSE),
            dict(
                workdir="kd_keras_demo",
                epochs=20,
                teacher_epochs=30,
                temperature=8.0,
                verbose=2,
            ),
        ),
        (commands.train, (*TRAINING, SHAPE, OUTPUT, SNAPSHOTS), {}),
        (commands.distill, (*TRAINING, SHAPE, OUTPUT, KD, TEACHER, DISTILL), {}),
        (commands.chain, (*LADDER, CHAIN), LADDER_DEFAULTS),
        (commands.paths, (*LADDER, SIZES, PATHS), LADDER_DEFAULTS),
        (
            commands.tune,
            (*FITTING, TEACHER, TEACHER_EPOCHS, WORKDIR, SIZES, TUNE),
            LADDER_DEFAULTS,
        ),
        (
            commands.export,
            (DATASET, TEST_SPLIT, DATA_DIR, MODEL_FILE, OUTPUT_DIR, EXPORT),
            dict(dataset=None),
        ),
        (commands.evaluate, (DATASET, TEST_SPLIT, DATA_DIR, MODEL_FILE), {}),
        (
            commands.reproduce,
            (DATA_DIR, OUTPUT_DIR, VERBOSE, REPRODUCE),
            dict(output_dir="hinton_mnist", verbose=0),
        ),
        (commands.data, (DATA_DIR, IDX), dict(data_dir="~/tensorflow_datasets")),
    ):
        # The docstring's first line is the summary; "%" is argparse's.
        doc = function.__doc__.replace("%", "%%")
        sub = subparsers.add_parser(
            function.__name__,
            help=doc.strip().splitlines()[0],
            description=" ".join(doc.split()),
            inherited_absl_flags=None,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        for group in groups:
            for flag, options in group:
                sub.add_argument(flag, **options)
        sub.set_defaults(run=function, **defaults)
    return parser


# Entry point.


def run(argv=None):
    """Runs `kd-keras`; returns the process exit status."""
    argv = list(sys.argv if argv is None else argv)
    parser = _parser()
    if len(argv) < 2:
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exit_:  # --help, or a usage error.
        return exit_.code or 0
    logging.set_verbosity(logging.WARNING)
    if hasattr(args, "seed"):
        import keras

        # The command line's runs are reproducible; the library never sets
        # the global seed itself.
        keras.utils.set_random_seed(args.seed)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(
            f"kd-keras {args.command}: interrupted; the same command resumes "
            "from the last finished epoch where the command keeps a backup.",
            file=sys.stderr,
        )
        return 130
    except Exception as error:  # Every error, as one line: no traceback.
        kind = "" if isinstance(error, ValueError) else f"{type(error).__name__}: "
        print(
            f"kd-keras {args.command}: {kind}{' '.join(str(error).split())}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
