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

import contextlib
import hashlib
import numbers
import threading

import keras
import numpy as np

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _fingerprints
from kd_keras import _io


def _check_model(model, role):
    if not callable(getattr(model, "generate", None)):
        raise ValueError(
            f"The {role} must be a KerasHub causal LM (a model with "
            f"`generate`). Received: {type(model).__name__}."
        )
    if getattr(model, "preprocessor", None) is not None:
        raise ValueError(
            f"The {role} `{model.name}` has a preprocessor, but these regimes "
            "work on token ids: set `model.preprocessor = None` (keep it to "
            "tokenize the prompts, with its `generate_preprocess`)."
        )


def _stop_ids(stop_token_ids, padding):
    """`stop_token_ids` as a tuple of ints (or None); refused if a stop id
    pads a prompt, where KerasHub's generation would see it and stop at
    once."""
    if stop_token_ids is None:
        return None
    if isinstance(stop_token_ids, numbers.Integral):
        stop_token_ids = (stop_token_ids,)
    try:
        stop = tuple(int(i) for i in np.asarray(stop_token_ids).ravel())
    except (TypeError, ValueError):
        raise ValueError(
            "Expected `stop_token_ids` as token ids, e.g. `(end_token_id,)`. "
            f"Received: {stop_token_ids!r}"
        ) from None
    if np.isin(padding, stop).any():
        raise ValueError(
            f"The prompts are padded with a stop token ({sorted(set(stop))}), "
            "so generation would stop before it starts: pad them with an id "
            "that is not a stop token (KerasHub's padding id, 0 for GPT-2's "
            "preprocessor)."
        )
    return stop


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


def _sampler(sampler):
    import keras_hub

    resolved = keras_hub.samplers.get(sampler)
    if not isinstance(resolved, keras_hub.samplers.Sampler):
        raise ValueError(
            'Expected `sampler` as a KerasHub sampler or its name ("greedy", '
            f'"top_k", ...). Received: sampler={sampler!r}'
        )
    return resolved


@contextlib.contextmanager
def _using_sampler(model, sampler):
    """The KerasHub model generates with `sampler` (None: its own) inside
    the block, its compile settings untouched, and its own after."""
    if sampler is None:
        yield
        return
    own = model.sampler, getattr(model, "generate_function", None)
    model.sampler, model.generate_function = _sampler(sampler), None
    try:
        yield
    finally:
        model.sampler, model.generate_function = own


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
    `"greedy"` or `keras_hub.samplers.TopKSampler(k=10, seed=0)`, for this
    call only (the teacher's compile settings are left alone). With
    `directory`, each batch of generations is written as it is made, and a
    later call with the same teacher weights, prompts and settings reads
    them back: so an interrupted run resumes, and a finished one is reused.
    Greedy generations are reproducible; a sampler's draws are kept as
    first drawn, and the batches a resumed run makes are new draws.

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
    _check_model(teacher, "teacher")
    ids, mask = _check_prompts(prompts)
    stop_token_ids = _stop_ids(stop_token_ids, ids[~mask])
    _checks.check_positive_int(batch_size, "batch_size")
    with _using_sampler(teacher, sampler):
        return _teacher_generations(
            teacher, ids, mask, stop_token_ids, batch_size, directory
        )


def _teacher_generations(teacher, ids, mask, stop_token_ids, batch_size, directory):
    folder = None
    if directory is not None:
        prompts = f"{ids.shape}".encode() + ids.tobytes() + mask.tobytes()
        stamp = {
            "teacher": _fingerprints.weights(teacher),
            "prompts": hashlib.blake2b(prompts).hexdigest(),
            "sampler": keras.saving.serialize_keras_object(teacher.sampler),
            "stop_token_ids": stop_token_ids,
            "batch_size": batch_size,
        }
        folder = _io.make_folder(directory, "directory")
        folder = _io.make_folder(
            folder / f"generations-{_fingerprints.digest(stamp)}", "directory"
        )
    parts = []
    for index, start in enumerate(range(0, len(ids), batch_size)):
        path = None if folder is None else folder / f"batch-{index:06d}.npz"
        batch = slice(start, start + batch_size)
        if path is not None and path.is_file():
            with np.load(path) as saved:
                kept = saved["token_ids"], saved["padding_mask"]
            if kept[0].shape == ids[batch].shape == kept[1].shape:
                parts.append(kept)
                continue
        generated = _generate(teacher, ids[batch], mask[batch], stop_token_ids)
        if path is not None:
            _save(path, generated)
        parts.append(generated)
    token_ids = np.concatenate([p[0] for p in parts])
    padding_mask = np.concatenate([p[1] for p in parts])
    return training_triples(token_ids, padding_mask, mask)


def _save(path, generated):
    """Writes a batch's generations whole or not at all."""
    _io.write_whole(
        path,
        lambda handle: np.savez(
            handle, token_ids=generated[0], padding_mask=generated[1]
        ),
    )


class OnPolicyData(keras.utils.PyDataset):
    """Training batches that mix the data with the student's own
    continuations (on-policy distillation: GKD, DistiLLM).

    Each batch is, with probability `fraction` (GKD's λ), a batch of the
    student's continuations of prompts drawn from a replay buffer, and
    otherwise the next batch of the data (its rows reshuffled every
    epoch). `OnPolicyRefresh`, a callback, refills the buffer with the
    current student's continuations every N steps: generations are reused
    until then, which DistiLLM found several times cheaper than generating
    for every batch, at a fixed fraction here (DistiLLM also raises the
    student's share as validation loss rises). `fraction=0` is plain
    distillation on the data.

    Keras builds batches a few steps ahead of training (its prefetch), so
    a batch may come from the buffer as it stood a few steps before; under
    `workers > 1`, up to `max_queue_size` batches before. Processes
    (`use_multiprocessing=True`) would each keep the buffer of the epoch's
    start, and are refused.

    The continuations' labels are the student's own tokens, so train them
    with `distillation_weight=1.0`: the teacher's distribution at each of
    the student's tokens is the only signal, as in GKD.

    Args:
        x: the data's inputs, `{"token_ids", "padding_mask"}`.
        y: their next tokens.
        sample_weight: the next tokens' weights (None: the inputs'
            padding mask).
        prompts: `{"token_ids", "padding_mask"}` prompts padded to the
            data's length plus one (the continuations' length).
        fraction: the probability that a batch is the student's.
        batch_size: rows per batch.
        buffer_size: the most continuations kept; the oldest go first.
        seed: seeds the draws (an integer >= 0).
        **kwargs: `keras.utils.PyDataset`'s (`workers`, `max_queue_size`).
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
        if kwargs.get("use_multiprocessing"):
            raise ValueError(
                "OnPolicyData's buffer is refilled in the training process, "
                "which worker processes would not see: pass "
                "`use_multiprocessing=False` (threads, `workers=N`, share it)."
            )
        super().__init__(**kwargs)
        _checks.check_positive_int(batch_size, "batch_size")
        _checks.check_positive_int(buffer_size, "buffer_size")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(
                f"Expected `seed` to be an integer >= 0. Received: {seed!r}"
            )
        if not (isinstance(x, dict) and {"token_ids", "padding_mask"} <= set(x)):
            raise ValueError(
                'Expected `x` as a dict of "token_ids" and "padding_mask" '
                f"arrays. Received: {type(x).__name__}"
            )
        self.x = {k: np.asarray(v) for k, v in x.items()}
        self.y = np.asarray(y)
        if sample_weight is None:
            sample_weight = self.x["padding_mask"]
        self.sample_weight = np.asarray(sample_weight, "float32")
        shapes = {
            "x token_ids": self.x["token_ids"].shape,
            "x padding_mask": self.x["padding_mask"].shape,
            "y": self.y.shape,
            "sample_weight": self.sample_weight.shape,
        }
        if len(set(shapes.values())) != 1 or len(shapes["y"]) != 2:
            raise ValueError(
                "Expected the data's token ids, padding mask, next tokens and "
                f"weights of one shape (examples, length). Received: {shapes}"
            )
        self.prompt_ids, self.prompt_mask = _check_prompts(prompts)
        length = self.y.shape[1]
        if self.prompt_ids.shape[1] != length + 1:
            raise ValueError(
                f"The prompts have length {self.prompt_ids.shape[1]}, but the "
                f"data's inputs {length}: pad the prompts to {length + 1} "
                "tokens, so that their continuations train like the data."
            )
        self.fraction = _checks.check_share(fraction, "fraction")
        self.batch_size = batch_size
        self.buffer_size, self.seed = buffer_size, int(seed)
        self.buffer = None  # (x, y, sample_weight) of the continuations.
        self.refreshes, self.epoch = 0, 0
        self._orders = (None, None)  # (epoch, its order of the data's rows).
        self._lock = threading.Lock()

    def __len__(self):
        return -(-len(self.y) // self.batch_size)

    def on_epoch_end(self):
        self.epoch += 1

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"Batch {index} of {len(self)}.")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        with self._lock:
            buffer = self.buffer
        if buffer is not None and rng.random() < self.fraction:
            rows = rng.choice(len(buffer[1]), self.batch_size, replace=True)
            x, y, w = buffer
        else:
            order = self._order()
            rows = order[index * self.batch_size : (index + 1) * self.batch_size]
            x, y, w = self.x, self.y, self.sample_weight
        return (
            {
                "token_ids": x["token_ids"][rows].astype("int32"),
                "padding_mask": x["padding_mask"][rows].astype(bool),
            },
            y[rows].astype("int32"),
            w[rows].astype("float32"),
        )

    def _order(self):
        """The data's rows in this epoch's order, drawn once per epoch."""
        epoch, order = self._orders
        if epoch != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(
                len(self.y)
            )
            self._orders = self.epoch, order
        return order

    def refresh(self, student, count, stop_token_ids=None):
        """Generates `count` continuations of prompts drawn at random with
        the student, into the buffer."""
        _checks.check_positive_int(count, "count")
        stop = _stop_ids(stop_token_ids, self.prompt_ids[~self.prompt_mask])
        rng = np.random.default_rng([self.seed, 1 << 20, self.refreshes])
        many = count > len(self.prompt_ids)
        rows = rng.choice(len(self.prompt_ids), count, replace=many)
        ids, mask = self.prompt_ids[rows], self.prompt_mask[rows]
        fresh = training_triples(*_generate(student, ids, mask, stop), mask)
        with self._lock:
            if self.buffer is not None:
                fresh = keras.tree.map_structure(
                    lambda new, old: np.concatenate([new, old]), fresh, self.buffer
                )
            self.buffer = keras.tree.map_structure(
                lambda a: a[: self.buffer_size], fresh
            )
            self.refreshes += 1


class OnPolicyRefresh(keras.callbacks.Callback):
    """Fills an `OnPolicyData`'s buffer with the student's continuations at
    the start of training and every `every` steps after.

    Args:
        data: the `OnPolicyData` that `fit` trains on.
        every: training steps between refreshes.
        count: continuations generated at each refresh.
        sampler: the student's sampler while it generates (a KerasHub
            sampler or its name), or None for its own; its compile
            settings are left alone.
        stop_token_ids: token ids that end a continuation.
    """

    def __init__(self, data, every=50, count=64, sampler=None, stop_token_ids=None):
        super().__init__()
        if not isinstance(data, OnPolicyData):
            raise ValueError(
                "Expected `data` to be the `OnPolicyData` that `fit` trains "
                f"on. Received: {type(data).__name__}"
            )
        _checks.check_positive_int(every, "every")
        _checks.check_positive_int(count, "count")
        self.data, self.every, self.count = data, every, count
        self.sampler = None if sampler is None else _sampler(sampler)
        self.stop_token_ids = stop_token_ids
        self._steps, self._epoch_start = 0, 0

    def _student(self):
        return getattr(self.model, "student", self.model)

    def _refresh(self):
        if _backend.name() == "jax" and hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()  # The student's weights of this step.
        self.data.refresh(self._student(), self.count, self.stop_token_ids)

    def on_train_begin(self, logs=None):
        _check_model(self._student(), "student")
        # The sampler for the whole of `fit`: generation is traced once.
        self._sampling = contextlib.ExitStack()
        self._sampling.enter_context(_using_sampler(self._student(), self.sampler))
        if self.data.fraction > 0:
            self._refresh()

    def on_train_end(self, logs=None):
        self._sampling.close()

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the last step of the execution (several steps with
        # `steps_per_execution`).
        steps = self._epoch_start + batch + 1
        crossed = steps // self.every > self._steps // self.every
        self._steps = steps
        if self.data.fraction > 0 and crossed:
            self._refresh()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_start = self._steps
