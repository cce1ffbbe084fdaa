"""Distilling a language model on Shakespeare's works: token-level losses,
sequence-level and on-policy distillation, and the seed's remedies for a
capacity gap (a teacher assistant, the student's early stop).

A KerasHub GPT-2 teacher of 2.6 M parameters is trained on the training
plays (a SentencePiece tokenizer of 4,000 pieces, windows of 64 tokens)
with early stopping on the validation works; a student 7 × smaller then
learns from a transfer set of windows drawn from the training plays, by
each method. Every method is tuned alike by the harness of `fair.py`
(keras-tuner, the same number of trials, scored on the validation works'
log-perplexity) and run over 3 or more seeds; the test works are read once
per final run.

Reported per method: test perplexity over real tokens; the share of the
scratch-to-teacher gap in log-perplexity it closes (per seed, against that
seed's scratch student); the teacher's mean negative log-likelihood of the
student's sampled continuations of test prompts; its epoch cost against
scratch and its tokens per second (minimum over interleaved epochs); a plot
of validation perplexity per epoch; samples.

    python benchmarks/language_model.py [--quick] [--backend jax]
"""

import dataclasses
import math
import pathlib
import tempfile
import time

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import fair
import keras
import keras_tuner
import numpy as np
import shakespeare

import kd_keras
from kd_keras import callbacks as kd_callbacks
from kd_keras import language
from kd_keras import losses
from kd_keras import store
from kd_keras import training

FLAGS = flags.FLAGS
common.define_backend_flag()
flags.DEFINE_bool("quick", False, "A smaller run, about 6 minutes on 2 cores.")
flags.DEFINE_integer("trials", None, "Tuner trials per method (default: the mode's).")
flags.DEFINE_string("shakespeare_dir", None, "Folder of the gzipped texts.")
flags.DEFINE_string(
    "workdir",
    None,
    "Where the tokenizer, teacher, searches and finished runs are kept, so "
    "that a rerun resumes (default: a folder in the temporary folder).",
)
flags.DEFINE_string("output_dir", str(common.RESULTS), "Where to write the results.")
flags.DEFINE_bool(
    "same_settings",
    False,
    "After the table, also run the other token-level losses at the T and λ "
    "chosen for forward KL (an ablation, not tuned: is a loss worse, or was "
    "its search unlucky?), written as language_model_<mode>_same_settings.md.",
)

LENGTH = 64  # Tokens a window trains on (and the continuations' length).
BATCH = 32
PROMPT = 16  # Real tokens of the prompts of samples and on-policy data.
SETTINGS = {
    "quick": {
        "teacher": [128, 3],
        "assistant": [80, 2],
        "student": [48, 1],
        "teacher_windows": 3072,
        "teacher_epochs": 1,
        "train_windows": 256,
        "tune_windows": 128,
        "epochs": 2,
        "val_windows": 128,
        "test_windows": 128,
        "samples": 32,
        "refresh_every": 4,
        "trials": 1,
        "seeds": 3,
        "more_seeds": 3,
    },
    "full": {
        "teacher": [192, 4],
        "assistant": [128, 3],
        "student": [64, 2],
        "teacher_windows": None,  # All of them.
        "teacher_epochs": 3,
        "train_windows": 2048,
        "tune_windows": 1024,
        "epochs": 3,
        "val_windows": 1024,
        "test_windows": None,
        "samples": 64,
        "refresh_every": 16,
        "trials": 3,
        "seeds": 3,
        # The harness's 5 seeds for close calls would not fit in 60 minutes.
        "more_seeds": 3,
    },
}
TEMPERATURES = [1.0, 2.0, 4.0]
WEIGHTS = [0.25, 0.5, 0.75, 1.0]
PEAK_RATE = 2e-3
# Recorded with each mode's settings, so that a work folder made with other
# values is refused rather than reused.
CONSTANTS = {
    "length": LENGTH,
    "batch": BATCH,
    "prompt": PROMPT,
    "pieces": shakespeare.PIECES,
    "peak_rate": PEAK_RATE,
    "temperatures": TEMPERATURES,
    "weights": WEIGHTS,
}


def gpt2(size, seed=0):
    hidden, layers = size
    return shakespeare.gpt2(hidden, layers, max(1, hidden // 64), LENGTH + 1, seed=seed)


def nll(logits, y, weights):
    """Sum of −log p(y) over the weighted tokens, and the weights' sum."""
    logits = logits.astype("float64")
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, y[..., None], -1)[..., 0]
    return float(((log_z - picked) * weights).sum()), float(weights.sum())


def mean_nll(model, x, y, weights, batch=64):
    """A causal LM's mean negative log-likelihood (nats) per weighted token."""
    total = count = 0.0
    for start in range(0, len(y), batch):
        rows = slice(start, start + batch)
        logits = keras.ops.convert_to_numpy(
            model.predict_on_batch({k: v[rows] for k, v in x.items()})
        )
        s, c = nll(logits, y[rows], weights[rows])
        total, count = total + s, count + c
    return total / count


class Text:
    """The Shakespeare split as windows of token ids, tokenized once and
    kept in the work folder; the harness's data (`objective`, `score`).

    `train`: `train_windows` windows drawn at random (seed 0) from the
    training plays; `tune`: the first `tune_windows` of them; `teacher`:
    the teacher's training windows (all, or the first `teacher_windows` of
    the same draw); `val` and `test`: the validation and test works'
    windows (the first `val_windows` and `test_windows`, or all); `curve`:
    the first 256 of `val`.
    """

    objective = keras_tuner.Objective("val_log_perplexity", "min")

    def __init__(self, settings, folder, workdir):
        cached = pathlib.Path(workdir) / f"tokens-{shakespeare.PIECES}.npz"
        if not cached.exists():
            parts = shakespeare.split(folder)
            tokenizer = shakespeare.tokenizer(parts["train"])
            ids = {k: shakespeare.token_ids(tokenizer, v) for k, v in parts.items()}
            partial = cached.with_suffix(".partial.npz")
            np.savez(partial, proto=np.frombuffer(tokenizer.proto, "uint8"), **ids)
            partial.replace(cached)
        with np.load(cached) as stored:
            import keras_hub

            self.tokenizer = keras_hub.tokenizers.SentencePieceTokenizer(
                proto=stored["proto"].tobytes()
            )
            ids = {k: stored[k] for k in ("train", "validation", "test")}
        self.tokens = {k: len(v) for k, v in ids.items()}
        train = shakespeare.windows(ids["train"], LENGTH)
        train = train[np.random.default_rng(0).permutation(len(train))]
        val = shakespeare.windows(ids["validation"], LENGTH)
        test = shakespeare.windows(ids["test"], LENGTH)
        self.windows = {
            "teacher": train[: settings["teacher_windows"]],
            "train": train[: settings["train_windows"]],
            "tune": train[: settings["tune_windows"]],
            "val": val[: settings["val_windows"]],
            "curve": val[: settings["val_windows"]][:256],
            "test": test[: settings["test_windows"]],
        }
        self.arrays = {k: shakespeare.lm_arrays(v) for k, v in self.windows.items()}

    def prompts(self, split, length=PROMPT):
        """Each window's first `length` tokens, padded to the window's
        length + 1 (the continuations' length)."""
        ids = self.windows[split].copy()
        mask = np.zeros(ids.shape, bool)
        mask[:, :length] = True
        ids[~mask] = shakespeare.PAD
        return {"token_ids": ids, "padding_mask": mask}

    def score(self, model, split):
        """Log-perplexity: mean NLL per real token of the split."""
        return mean_nll(model, *self.arrays[split])

    def text(self, ids):
        return str(keras.ops.convert_to_numpy(self.tokenizer.detokenize(ids)))


class Curve(keras.callbacks.Callback):
    """Validation perplexity of the student after every epoch."""

    def __init__(self, data, student):
        super().__init__()
        self.data, self.student, self.values = data, student, []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append(math.exp(self.data.score(self.student, "curve")))


@dataclasses.dataclass
class Run:
    """What a method trains: `model.fit(**fit, callbacks=callbacks)` trains
    `student`; `one_off` seconds of work came first (generations, an
    assistant)."""

    model: object
    student: object
    fit: dict
    callbacks: list = dataclasses.field(default_factory=list)
    one_off: float = 0.0


def sampler(name, seed=0):
    """A KerasHub sampler by name; the random ones seeded."""
    import keras_hub

    if name == "greedy":
        return keras_hub.samplers.GreedySampler()
    if name == "top_k":
        return keras_hub.samplers.TopKSampler(k=10, seed=seed)
    return keras_hub.samplers.RandomSampler(seed=seed)  # "random": T = 1.


def with_kd(*extra):
    """A search space: T and λ, then `extra(hp)` declarations."""

    def space(hp):
        fair.temperature_and_weight(hp, TEMPERATURES, WEIGHTS)
        for declare in extra:
            declare(hp)

    return space


class Methods:
    """The compared methods. Each run function `(hp, split, seed)` builds
    the seed's student first (so that every method starts from the same
    weights for a seed) and returns a `Run`."""

    def __init__(self, study, teacher, settings):
        self.study, self.data, self.teacher = study, study.data, teacher
        self.settings, self.epochs = settings, settings["epochs"]

    def optimizer(self, split):
        """Adam warming up over the first epoch, then a cosine to 0."""
        windows = len(self.data.windows[split])
        return fair.warm_up_adam(self.epochs, windows, BATCH, PEAK_RATE, clipnorm=1.0)

    def student(self, seed):
        return gpt2(self.settings["student"], seed=seed)

    def batches(self, arrays, split, seed):
        """`fit`'s arguments for `(x, y, sample_weight)` in batches whose
        order the seed fixes alike for every method (reshuffled every
        epoch): `OnPolicyData` without the student's share."""
        data = language.OnPolicyData(
            *arrays,
            prompts=self.data.prompts(split),
            fraction=0.0,
            batch_size=BATCH,
            seed=seed,
        )
        return {"x": data}

    def distiller(self, teacher, student, split, **options):
        distiller = kd_keras.Distiller(teacher, student, **options)
        distiller.compile(self.optimizer(split))
        return distiller

    def on_labels(self, student, split):
        """The student as a plain functional model sharing its weights, to
        train on labels: KerasHub's own `fit` takes no `PyDataset`."""
        plain = keras.Model(student.inputs, student.outputs)
        plain.compile(self.optimizer(split), training.label_loss())
        return plain

    def scratch(self, hp, split, seed):
        student = self.student(seed)
        fit = self.batches(self.data.arrays[split], split, seed)
        return Run(self.on_labels(student, split), student, fit)

    def token_level(self, loss=lambda hp: None, *, teacher=None, callbacks=None):
        """Distillation on the data with `loss(hp)` (None: forward KL)."""

        def run(hp, split, seed):
            student = self.student(seed)
            distiller = self.distiller(
                teacher() if teacher else self.teacher,
                student,
                split,
                temperature=hp.get("temperature"),
                distillation_weight=hp.get("distillation_weight"),
                losses=loss(hp),
            )
            return Run(
                distiller,
                student,
                self.batches(self.data.arrays[split], split, seed),
                callbacks(hp) if callbacks else [],
            )

        return run

    def assistant(self, split):
        """The assistant of the split: distilled from the teacher once
        (seed 0) with forward KL at the settings chosen for "forward KL",
        kept in the work folder; and the seconds that took."""
        start = time.perf_counter()

        if "forward KL" not in self.study.chosen:
            raise RuntimeError('Tune "forward KL" before the assistant path.')
        chosen = self.study.chosen["forward KL"]

        def build():
            assistant = gpt2(self.settings["assistant"], seed=0)
            distiller = self.distiller(
                self.teacher,
                assistant,
                split,
                temperature=chosen["temperature"],
                distillation_weight=chosen["distillation_weight"],
            )
            fit = self.batches(self.data.arrays[split], split, 0)
            distiller.fit(**fit, epochs=self.epochs, verbose=0)
            return assistant

        assistant = self.study.model(f"assistant-{split}", build)
        return assistant, time.perf_counter() - start

    def assistant_path(self, hp, split, seed):
        assistant, seconds = self.assistant(split)
        run = self.token_level(teacher=lambda: assistant)(hp, split, seed)
        run.one_off = seconds
        return run

    def sequence_level(self, hp, split, seed):
        """The student learns the teacher's continuations of the windows'
        first tokens (Kim & Rush), kept in the work folder."""
        name, prompt = hp.get("sampler"), hp.get("prompt_tokens")
        student = self.student(seed)
        start = time.perf_counter()
        generated = language.teacher_generations(
            self.teacher,
            self.data.prompts(split, prompt),
            sampler=sampler(name),
            batch_size=128,
            directory=self.study.workdir / "generations" / f"{split}-{name}-{prompt}",
        )
        seconds = time.perf_counter() - start
        fit = self.batches(generated, split, seed)
        return Run(self.on_labels(student, split), student, fit, one_off=seconds)

    def on_policy(self, hp, split, seed):
        """GKD's mix: a `student_fraction` of batches are the student's own
        continuations (sampled at T = 1, refreshed every few steps), the
        rest the data's; generalized JSD(β) on both, at T = 1."""
        student = self.student(seed)
        distiller = self.distiller(
            self.teacher,
            student,
            split,
            temperature=1.0,
            distillation_weight=1.0,
            losses=losses.GeneralizedJSD(hp.get("beta")),
        )
        batches = language.OnPolicyData(
            *self.data.arrays[split],
            prompts=self.data.prompts(split),
            fraction=hp.get("student_fraction"),
            batch_size=BATCH,
            buffer_size=8 * BATCH,
            seed=seed,
        )
        refresh = language.OnPolicyRefresh(
            batches,
            every=self.settings["refresh_every"],
            count=2 * BATCH,
            sampler=sampler("random", seed),
        )
        return Run(distiller, student, {"x": batches}, [refresh])

    def all(self):
        """`[(fair.Method, its run function)]`, in the table's order."""

        def choice(name, values):
            return lambda hp: hp.Choice(name, values)

        def stop(hp):
            return [kd_callbacks.StudentEarlyStop(epoch=hp.get("kd_epochs"))]

        table = [
            ("scratch", self.scratch, None),
            ("forward KL", self.token_level(), with_kd()),
            ("reverse KL", self.token_level(lambda hp: losses.ReverseKL()), with_kd()),
            (
                "generalized JSD",
                self.token_level(lambda hp: losses.GeneralizedJSD(hp.get("beta"))),
                with_kd(choice("beta", [0.1, 0.5, 0.9])),
            ),
            (
                "skew KL",
                self.token_level(lambda hp: losses.SkewKL(hp.get("alpha"))),
                with_kd(choice("alpha", [0.1, 0.3])),
            ),
            (
                "sequence-level KD",
                self.sequence_level,
                lambda hp: (
                    hp.Choice("sampler", ["greedy", "top_k"]),
                    hp.Choice("prompt_tokens", [8, 16, 32]),
                ),
            ),
            (
                "on-policy (GKD mix)",
                self.on_policy,
                lambda hp: (
                    hp.Choice("student_fraction", [0.25, 0.5, 0.75]),
                    hp.Choice("beta", [0.1, 0.5, 0.9]),
                ),
            ),
            ("teacher assistant", self.assistant_path, with_kd()),
            (
                "student early stop",
                self.token_level(callbacks=stop),
                with_kd(choice("kd_epochs", list(range(1, self.epochs)))),
            ),
        ]
        return [
            (fair.Method(name, self.trainer(run), space), run)
            for name, run, space in table
        ]

    def trainer(self, run):
        """The method's `train` for the harness; a final run also records
        its validation curve, epoch times and samples."""

        def train(hp, split, seed):
            prepared = run(hp, split, seed)
            if split != "train":
                prepared.model.fit(
                    **prepared.fit,
                    epochs=self.epochs,
                    callbacks=prepared.callbacks,
                    verbose=0,
                )
                return prepared.student
            curve, timer = Curve(self.data, prepared.student), common.EpochTimer()
            prepared.model.fit(
                **prepared.fit,
                epochs=self.epochs,
                callbacks=[*prepared.callbacks, timer, curve],
                verbose=0,
            )
            switches = [
                c.switch_epoch
                for c in prepared.callbacks
                if isinstance(c, kd_callbacks.StudentEarlyStop)
            ]
            return prepared.student, dict(
                self.samples(prepared.student, seed),
                val_perplexity=curve.values,
                epoch_seconds=timer.seconds,
                switch_epoch=switches[0] if switches else None,
                one_off_seconds=prepared.one_off,
            )

        return train

    def prompts(self):
        """The first tokens of test windows spread evenly over the test
        works (not only the first play's title and cast list)."""
        prompts = self.data.prompts("test")
        count = self.settings["samples"]
        rows = np.linspace(0, len(prompts["token_ids"]) - 1, count).astype(int)
        return {k: v[rows] for k, v in prompts.items()}

    def samples(self, model, seed, show=3):
        """The teacher's mean NLL of the model's top-10-sampled
        continuations of the test prompts, and a few of them as text."""
        prompts = self.prompts()
        ids, mask = prompts["token_ids"], prompts["padding_mask"]
        x, y, w = language.teacher_generations(
            model, prompts, sampler=sampler("top_k", seed), batch_size=len(ids)
        )
        return {
            "teacher_nll_of_samples": mean_nll(self.teacher, x, y, w),
            "samples": [
                self.data.text(ids[i][mask[i]]) + " ‖ " + self.data.text(y[i][w[i] > 0])
                for i in range(show)
            ],
        }


def train_teacher(study, settings):
    """The teacher, trained on its windows with early stopping on the
    validation works (the best epoch's weights), kept in the work folder."""

    def build():
        start = time.perf_counter()
        data = study.data
        model = gpt2(settings["teacher"], seed=0)
        x, y, w = data.arrays["teacher"]
        steps = -(-len(y) // BATCH)
        model.compile(
            keras.optimizers.Adam(
                keras.optimizers.schedules.CosineDecay(
                    0.0,
                    decay_steps=settings["teacher_epochs"] * steps,
                    warmup_target=PEAK_RATE,
                    warmup_steps=min(200, steps),
                    alpha=0.1,
                ),
                clipnorm=1.0,
            ),
            training.label_loss(),
        )
        history = model.fit(
            x,
            y,
            sample_weight=w,
            batch_size=BATCH,
            epochs=settings["teacher_epochs"],
            validation_data=data.arrays["val"],
            callbacks=[
                keras.callbacks.EarlyStopping(patience=1, restore_best_weights=True)
            ],
            verbose=2,
        )
        store.write_json(
            study.workdir / "teacher_history.json",
            dict(history.history, seconds=time.perf_counter() - start),
        )
        return model

    return study.model("teacher", build)


def epoch_costs(study, names):
    """Seconds of an epoch of each method's final runs: the minimum over
    its seeds' epochs after the first (which traces the step) and but the
    epoch where `StudentEarlyStop` switched (which traces the step without
    the teacher). The harness runs seed by seed, each seed's methods in
    turn, so these epochs interleave across methods (a stall only ever
    adds time)."""

    def timed(name, switches=True):
        runs = [study.runs[f"{name} / {seed}"] for seed in range(study.seeds)]
        return [
            seconds
            for run in runs
            for epoch, seconds in enumerate(run["epoch_seconds"])
            if epoch and (switches or epoch != run.get("switch_epoch"))
        ]

    # With 2 epochs (--quick) the switch's epoch is the only one left.
    return {name: min(timed(name, False) or timed(name)) for name in names}


def spread(values, digits=1):
    mean, std = common.mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(study, names, test, teacher_nll, costs, tokens_per_epoch):
    """The rows: perplexity, share of the gap closed, samples' NLL under the
    teacher, epoch cost and speed, settings chosen on validation."""
    seeds = study.seeds
    scratch = np.asarray(test["scratch"])
    rows = []
    for name in names:
        nll_ = np.asarray(test[name])
        runs = [study.runs[f"{name} / {s}"] for s in range(seeds)]
        closed = 100 * (scratch - nll_) / (scratch - teacher_nll)
        # In nats of log-perplexity, scratch's minus the method's.
        difference = fair.paired_difference(scratch, nll_, scale=1.0)
        rows.append(
            {
                "method": name,
                "test_perplexity": spread(np.exp(nll_)),
                "gap_closed_percent": "—" if name == "scratch" else spread(closed),
                "log_ppl_gain_nats_95ci": "—"
                if name == "scratch"
                else fair.difference_text(difference),
                "teacher_nll_of_samples": spread(
                    [r["teacher_nll_of_samples"] for r in runs], 2
                ),
                "epoch_cost_x_scratch": f"{costs[name] / costs['scratch']:.2f}",
                "tokens_per_s": f"{tokens_per_epoch / costs[name]:,.0f}",
                # Made by the first run, then read from the work folder.
                "one_off_s": f"{max(r['one_off_seconds'] for r in runs):.0f}",
                "chosen_on_validation": fair._settings_text(study.chosen.get(name, {})),
                "per_seed_test_nll": [round(float(v), 4) for v in nll_],
            }
        )
    return rows


def plot_curves(curves, path):
    """Validation perplexity per epoch, on a log scale (a method far off
    would flatten the others)."""
    from kd_keras.apps import plots

    figure = plots.plot_history(
        curves, metric="val perplexity", title="Validation perplexity per epoch"
    )
    figure.axes[0].set_yscale("log")
    figure.axes[0].set_ylabel("val perplexity (mean over seeds, log scale)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def same_settings(study, runs, mode):
    """The token-level losses at forward KL's chosen T and λ (β = 0.5,
    α = 0.1: GJSD's midpoint, DistiLLM's α), over the table's seeds, next to
    forward KL's runs; written as a second report."""
    started = time.perf_counter()
    chosen = study.chosen["forward KL"]
    extra = {"beta": 0.5, "alpha": 0.1}
    settings = fair._settings_text(dict(chosen, **extra))
    rows, test = [], {}
    for method, _ in runs:
        if method.name not in ("reverse KL", "generalized JSD", "skew KL"):
            continue
        hp = keras_tuner.HyperParameters()
        for name, value in dict(chosen, **extra).items():
            hp.Fixed(name, value)
        # Named by the settings: another choice for forward KL makes new runs.
        fixed = fair.Method(f"{method.name} at {settings}", method.train)
        test[fixed.name] = [
            study._run(fixed, hp, seed)["test"] for seed in range(study.seeds)
        ]
    scratch = [study.runs[f"scratch / {s}"]["test"] for s in range(study.seeds)]
    forward = [study.runs[f"forward KL / {s}"]["test"] for s in range(study.seeds)]
    for name, values in [("forward KL", forward), *test.items()]:
        difference = fair.paired_difference(scratch, values, scale=1.0)
        rows.append(
            {
                "method": name,
                "test_perplexity": spread(np.exp(values)),
                "log_ppl_gain_nats_95ci": fair.difference_text(difference),
                "per_seed_test_nll": " / ".join(f"{v:.4f}" for v in values),
            }
        )
    minutes = (time.perf_counter() - started) / 60
    common.write_report(
        FLAGS,
        f"language_model_{mode}_same_settings",
        f"The token-level losses at forward KL's settings ({settings}), "
        f"not tuned; {study.seeds} seeds; {minutes:.1f} min",
        common.markdown_table(rows, list(rows[0])),
        {"rows": rows, "settings": dict(chosen, **extra), "minutes": minutes},
    )


def main(argv):
    del argv
    mode = "quick" if FLAGS.quick else "full"
    settings = dict(SETTINGS[mode], **CONSTANTS)
    if FLAGS.trials is not None:
        settings["trials"] = FLAGS.trials
    workdir = pathlib.Path(
        FLAGS.workdir
        or pathlib.Path(tempfile.gettempdir()) / f"kd_keras_language_model_{mode}"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = Text(settings, FLAGS.shakespeare_dir, workdir)
    study = fair.Study("language_model", mode, settings, data, workdir)
    teacher = train_teacher(study, settings)
    methods = Methods(study, teacher, settings)
    runs = methods.all()
    test = study.scores([method for method, _ in runs])
    names = [method.name for method, _ in runs]
    costs = epoch_costs(study, names)
    tokens_per_epoch = len(data.windows["train"]) * LENGTH
    teacher_nll = data.score(teacher, "test")
    assistant, _ = methods.assistant("train")
    rows = table(study, names, test, teacher_nll, costs, tokens_per_epoch)

    teacher_samples = methods.samples(teacher, 0)
    trained = store.read_json(study.workdir / "teacher_history.json")
    reference = [
        f"- teacher ({teacher.count_params():,} parameters): test perplexity "
        f"{math.exp(teacher_nll):.1f}; teacher NLL of its own samples "
        f"{teacher_samples['teacher_nll_of_samples']:.2f}; trained "
        f"{len(trained['val_loss'])} epoch(s) (validation perplexity "
        + ", ".join(f"{math.exp(v):.1f}" for v in trained["val_loss"])
        + f") in {trained['seconds'] / 60:.1f} min",
        f"- assistant ({assistant.count_params():,}): test perplexity "
        f"{math.exp(data.score(assistant, 'test')):.1f}",
        f"- student: {methods.student(0).count_params():,} parameters",
    ]
    samples = ["teacher: " + teacher_samples["samples"][0]] + [
        f"{name}: " + study.runs[f"{name} / 0"]["samples"][0] for name in names
    ]

    def curve(name):
        runs_ = [study.runs[f"{name} / {s}"] for s in range(study.seeds)]
        return np.mean([r["val_perplexity"] for r in runs_], axis=0).tolist()

    curves = {name: {"val perplexity": curve(name)} for name in names}
    out = pathlib.Path(FLAGS.output_dir)
    plot_curves(curves, out / f"language_model_{mode}.png")
    elapsed = time.perf_counter() - started
    columns = [k for k in rows[0] if k != "per_seed_test_nll"]
    markdown = "\n".join(
        [
            common.markdown_table(
                [
                    dict(
                        r,
                        per_seed_test_nll=" / ".join(map(str, r["per_seed_test_nll"])),
                    )
                    for r in rows
                ],
                [*columns, "per_seed_test_nll"],
            ),
            "",
            *reference,
            f"- tokens: {data.tokens} (train, validation, test); "
            f"students' transfer set {len(data.windows['train']) * LENGTH:,} tokens, "
            f"{settings['epochs']} epochs; the teacher's "
            f"{len(data.windows['teacher']) * LENGTH:,}",
            f"- {settings['trials']} trials per method on "
            f"{len(data.windows['tune']) * LENGTH:,} tokens, scored on "
            f"{len(data.windows['val']) * LENGTH:,} validation tokens",
            "- epoch cost: the minimum over the final runs' epochs after the "
            "first, interleaved across methods (student early stop: but the "
            "epoch of its switch, which traces the step anew; after the "
            "switch its epochs train without the teacher); run time "
            f"{elapsed / 60:.1f} min, the teacher's training included if "
            "this run trained it",
            "",
            "Samples (prompt: a test window's first 16 tokens; top-10 sampling):",
            "",
            *[f"- {line!r}" for line in samples],
        ]
    )
    common.write_report(
        FLAGS,
        f"language_model_{mode}",
        f"Distilling a GPT-2 on Shakespeare ({keras.backend.backend()}); "
        f"{study.seeds} seeds",
        markdown,
        {
            "settings": settings,
            "rows": rows,
            "runs": study.runs,
            "chosen": study.chosen,
            "seeds": study.seeds,
            "epoch_seconds": costs,
            "teacher_test_nll": teacher_nll,
            "curves": curves,
            "minutes": elapsed / 60,
        },
    )
    print(f"\nWrote {out}/language_model_{mode}.{{md,json,png}}")
    if FLAGS.same_settings:
        same_settings(study, runs, mode)


if __name__ == "__main__":
    app.run(main)
