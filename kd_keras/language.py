"""Training regimes for language models: sequence-level distillation (the
teacher's generations as training data) and on-policy distillation (the
student's own continuations, scored by the teacher).

Both work on KerasHub causal LMs without their preprocessor, on token ids:
a prompt is `{"token_ids": (n, length), "padding_mask": (n, length)}`, its
real tokens first and padding after, and generation fills the padding (as
KerasHub's `generate` does without a preprocessor). Both give batches in
the form a causal LM trains on, `(x, y, sample_weight)`: the inputs, the
next tokens, and the weight of each next token, 1 for the generated tokens
only, so that the prompt itself is not learned again.
"""

import hashlib
import pathlib
import threading

import keras
import numpy as np

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _fingerprints
from kd_keras import _io


def _check_prompts(prompts):
    if not (
        isinstance(prompts, dict)
        and {"token_ids", "padding_mask"} <= set(prompts)
        and np.ndim(prompts["token_ids"]) == 2
        and np.shape(prompts["token_ids"]) == np.shape(prompts["padding_mask"])
    ):
        raise ValueError(
            "Expected prompts as a dict of token ids and their padding mask, "
            '`{"token_ids": (n, length), "padding_mask": (n, length)}`, '
            "padded to the length to generate (a KerasHub preprocessor's "
            "`generate_preprocess` gives them). Received: "
            f"{keras.tree.map_structure(np.shape, prompts)!r}"
        )
    ids = np.asarray(prompts["token_ids"], "int32")
    mask = np.asarray(prompts["padding_mask"], bool)
    if not mask[:, 0].all() or (np.diff(mask.astype("int8"), axis=1) > 0).any():
        raise ValueError(
            "Each prompt needs at least one real token, and its real tokens "
            "first: a padding mask of ones, then zeros."
        )
    if mask.all():
        raise ValueError(
            "The prompts fill their whole length, so there is nothing to "
            "generate: pad them to the length of prompt and continuation."
        )
    return ids, mask


def training_triples(token_ids, padding_mask, prompt_mask):
    """`(x, y, sample_weight)` of a causal LM from whole sequences: the
    weights keep the real next tokens that are not part of the prompt."""
    token_ids = np.asarray(token_ids, "int32")
    padding_mask = np.asarray(padding_mask, bool)
    generated = padding_mask & ~np.asarray(prompt_mask, bool)
    x = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
    return x, token_ids[:, 1:], generated[:, 1:].astype("float32")


def _generate(model, ids, mask, stop_token_ids):
    """The model's continuations of padded prompts, as NumPy `(ids, mask)`."""
    out = model.generate(
        {"token_ids": ids, "padding_mask": mask}, stop_token_ids=stop_token_ids
    )
    return (
        np.asarray(keras.ops.convert_to_numpy(out["token_ids"]), "int32"),
        np.asarray(keras.ops.convert_to_numpy(out["padding_mask"]), bool),
    )


def _use_sampler(model, sampler):
    """Gives the KerasHub model `sampler` (its `compile`'s), if one is
    given."""
    if sampler is not None:
        model.compile(sampler=sampler)


def teacher_generations(
    teacher,
    prompts,
    *,
    sampler=None,
    stop_token_ids=None,
    batch_size=32,
    directory=None,
):
    """Sequence-level distillation (Kim & Rush, EMNLP 2016): the teacher's
    continuations of `prompts`, as a causal LM's training data.

    The teacher (a KerasHub causal LM without preprocessor) continues each
    prompt up to the prompts' padded length, with its sampler: the one it
    was compiled with (KerasHub's default, top-k), or `sampler`, e.g.
    `"greedy"` or `keras_hub.samplers.TopKSampler(k=10, seed=0)`. With
    `directory`, each batch of generations is written as it is made, and a
    later call with the same teacher weights, prompts and settings reads
    them back: so an interrupted run resumes, and a finished one is reused
    (generations with a seeded sampler, or greedy ones, are reproducible;
    an unseeded sampler's are kept as first drawn).

    Args:
        teacher: a KerasHub `CausalLM` with `preprocessor=None`.
        prompts: `{"token_ids", "padding_mask"}` arrays `(n, length)`, each
            row's real tokens first, padded to the full length.
        sampler: a KerasHub sampler or its name, or None for the teacher's.
        stop_token_ids: token ids that end a continuation (e.g. the end
            token), or None to fill every prompt's length.
        batch_size: prompts generated at once.
        directory: a folder to keep the generations in, or None.

    Returns:
        `(x, y, sample_weight)` NumPy arrays for `fit`: `x` the
        generated sequences' inputs, `y` their next tokens, and
        `sample_weight` 1 on the generated tokens only.
    """
    ids, mask = _check_prompts(prompts)
    _checks.check_positive_int(batch_size, "batch_size")
    _use_sampler(teacher, sampler)
    folder = None
    if directory is not None:
        stamp = {
            "teacher": _fingerprints.weights(teacher),
            "prompts": hashlib.blake2b(ids.tobytes() + mask.tobytes()).hexdigest(),
            "sampler": keras.saving.serialize_keras_object(teacher.sampler),
            "stop_token_ids": None if stop_token_ids is None else list(stop_token_ids),
            "batch_size": batch_size,
        }
        folder = _io.make_folder(directory, "directory")
        folder = _io.make_folder(
            folder / f"generations-{_fingerprints.digest(stamp)}", "directory"
        )
    parts = []
    for index, start in enumerate(range(0, len(ids), batch_size)):
        path = None if folder is None else folder / f"batch-{index:06d}.npz"
        if path is not None and path.is_file():
            with np.load(path) as saved:
                parts.append((saved["token_ids"], saved["padding_mask"]))
            continue
        batch = slice(start, start + batch_size)
        generated = _generate(teacher, ids[batch], mask[batch], stop_token_ids)
        if path is not None:
            _save(path, generated)
        parts.append(generated)
    token_ids = np.concatenate([p[0] for p in parts])
    padding_mask = np.concatenate([p[1] for p in parts])
    return training_triples(token_ids, padding_mask, mask)


def _save(path, generated):
    """Writes a batch's generations whole or not at all."""
    temporary = pathlib.Path(f"{path}.{_io.unique_token()}.tmp")
    with open(temporary, "wb") as handle:
        np.savez(handle, token_ids=generated[0], padding_mask=generated[1])
    temporary.replace(path)


class OnPolicyData(keras.utils.PyDataset):
    """Training batches that mix the data with the student's own
    continuations (on-policy distillation: GKD, DistiLLM).

    Each batch is, with probability `fraction` (GKD's λ), a batch of the
    student's continuations of prompts drawn from a replay buffer, and
    otherwise the next batch of the data. `OnPolicyRefresh`, a callback,
    fills the buffer with the current student's continuations every N
    steps (DistiLLM's adaptive off-policy scheme: generations are reused
    until the next refresh, several times cheaper than generating for every
    batch); `fraction=0` is plain off-policy distillation on the data.

    The continuations' labels are the student's own tokens, so train them
    with `distillation_weight=1.0`: the teacher's distribution at each of
    the student's tokens is the only signal, as in GKD.

    Args:
        x: the data's inputs, `{"token_ids", "padding_mask"}`.
        y: their next tokens.
        sample_weight: the next tokens' weights (None for all 1).
        prompts: `{"token_ids", "padding_mask"}` prompts padded to the
            data's length plus one (the continuations' length).
        fraction: the probability that a batch is the student's.
        batch_size: rows per batch.
        buffer_size: the most continuations kept; the oldest go first.
        seed: seeds the draws.
    """

    def __init__(
        self,
        x,
        y,
        sample_weight=None,
        *,
        prompts,
        fraction=0.5,
        batch_size=32,
        buffer_size=1024,
        seed=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"Expected `fraction` in [0, 1]. Received: {fraction!r}")
        _checks.check_positive_int(batch_size, "batch_size")
        _checks.check_positive_int(buffer_size, "buffer_size")
        self.prompt_ids, self.prompt_mask = _check_prompts(prompts)
        length = np.shape(x["token_ids"])[1]
        if self.prompt_ids.shape[1] != length + 1:
            raise ValueError(
                f"The prompts have length {self.prompt_ids.shape[1]}, but the "
                f"data's inputs {length}: pad the prompts to {length + 1} "
                "tokens, so that their continuations train like the data."
            )
        self.x = {k: np.asarray(v) for k, v in x.items()}
        self.y = np.asarray(y)
        weights = np.ones(self.y.shape) if sample_weight is None else sample_weight
        self.sample_weight = np.asarray(weights, "float32")
        self.fraction, self.batch_size = float(fraction), batch_size
        self.buffer_size, self.seed = buffer_size, seed
        self.buffer = None  # (x, y, sample_weight) of the continuations.
        self.refreshes = 0
        self._lock = threading.Lock()

    def __len__(self):
        return -(-len(self.y) // self.batch_size)

    def _draw(self, index):
        epoch_seed = [self.seed, index, self.refreshes]
        return np.random.default_rng(epoch_seed)

    def __getitem__(self, index):
        rng = self._draw(index)
        with self._lock:
            buffer = self.buffer
        if buffer is not None and rng.random() < self.fraction:
            rows = rng.choice(len(buffer[1]), self.batch_size, replace=True)
            x, y, w = buffer
        else:
            rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
            x, y, w = self.x, self.y, self.sample_weight
        return (
            {
                "token_ids": x["token_ids"][rows].astype("int32"),
                "padding_mask": x["padding_mask"][rows].astype(bool),
            },
            y[rows].astype("int32"),
            w[rows].astype("float32"),
        )

    def refresh(self, student, count, stop_token_ids=None):
        """Generates `count` continuations of prompts drawn at random with
        the student, into the buffer."""
        rng = np.random.default_rng([self.seed, 1 << 20, self.refreshes])
        rows = rng.choice(
            len(self.prompt_ids), count, replace=count > len(self.prompt_ids)
        )
        ids, mask = self.prompt_ids[rows], self.prompt_mask[rows]
        generated = _generate(student, ids, mask, stop_token_ids)
        fresh = training_triples(*generated, mask)
        with self._lock:
            if self.buffer is not None:
                fresh = keras.tree.map_structure(
                    lambda new, old: np.concatenate([new, old])[: self.buffer_size],
                    fresh,
                    self.buffer,
                )
            self.buffer = fresh
            self.refreshes += 1


class OnPolicyRefresh(keras.callbacks.Callback):
    """Fills an `OnPolicyData`'s buffer with the student's continuations at
    the start of training and every `every` steps after.

    Args:
        data: the `OnPolicyData` that `fit` trains on.
        every: steps between refreshes.
        count: continuations generated at each refresh.
        sampler: the student's sampler (a KerasHub sampler or its name),
            or None for its own.
        stop_token_ids: token ids that end a continuation.
    """

    def __init__(self, data, every=50, count=64, sampler=None, stop_token_ids=None):
        super().__init__()
        _checks.check_positive_int(every, "every")
        _checks.check_positive_int(count, "count")
        self.data, self.every, self.count = data, every, count
        self.sampler, self.stop_token_ids = sampler, stop_token_ids
        self._steps = 0

    def _student(self):
        return getattr(self.model, "student", self.model)

    def _refresh(self):
        if _backend.name() == "jax" and hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()  # The student's weights of this step.
        self.data.refresh(self._student(), self.count, self.stop_token_ids)

    def on_train_begin(self, logs=None):
        _use_sampler(self._student(), self.sampler)
        if self.data.fraction > 0:
            self._refresh()

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self.data.fraction > 0 and self._steps % self.every == 0:
            self._refresh()
