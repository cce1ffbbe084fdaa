"""Shakespeare's works for the language-model benchmarks: the split by whole
works that `../shared/data/shakespeare/README.md` suggests, a SentencePiece
tokenizer trained on the training split, token windows, and tiny KerasHub
GPT-2 models.

Import it after `common` (which sets the backend from `--backend`).
"""

import gzip
import io
import pathlib

import common
import keras
import numpy as np

FOLDER = common.REPO.parent / "shared" / "data" / "shakespeare"
VALIDATION = ("julius_caesar", "twelfth_night", "sonnets")
TEST = ("hamlet", "much_ado_about_nothing", "passionate_pilgrim")
PIECES = 4_000
PAD, UNKNOWN, START, END = 0, 1, 2, 3


def works(folder=None):
    """`{name: text}` of every work, by its file name without `_gut.txt.gz`."""
    folder = pathlib.Path(folder or FOLDER)
    paths = sorted(folder.glob("*_gut.txt.gz"))
    if not paths:
        raise FileNotFoundError(
            f"No Shakespeare texts (*_gut.txt.gz) in {folder}: pass "
            "--shakespeare_dir, the folder of the gzipped texts."
        )
    return {
        path.name[: -len("_gut.txt.gz")]: gzip.decompress(path.read_bytes()).decode()
        for path in paths
    }


def split(folder=None):
    """`{"train", "validation", "test"}`: lists of texts, by whole works."""
    texts = works(folder)
    held = {"validation": VALIDATION, "test": TEST}
    parts = {name: [texts[w] for w in chosen] for name, chosen in held.items()}
    taken = set(VALIDATION) | set(TEST)
    parts["train"] = [text for name, text in texts.items() if name not in taken]
    return parts


def tokenizer(train_texts, pieces=PIECES):
    """A SentencePiece unigram tokenizer of `pieces` pieces trained on the
    training texts, as a KerasHub `SentencePieceTokenizer` (ids: 0 padding,
    1 unknown, 2 start, 3 end)."""
    import keras_hub
    import sentencepiece

    lines = [line for text in train_texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=pieces,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=PAD,
        unk_id=UNKNOWN,
        bos_id=START,
        eos_id=END,
        minloglevel=2,
    )
    return keras_hub.tokenizers.SentencePieceTokenizer(proto=model.getvalue())


def token_ids(tokenizer, texts):
    """Every text's ids, one work after another, each work closed by END."""
    ids = []
    for text in texts:
        lines = [line for line in text.splitlines() if line.strip()]
        for line_ids in tokenizer.tokenize(lines):
            ids.extend(np.asarray(line_ids).tolist())
        ids.append(END)
    return np.asarray(ids, "int32")


def windows(ids, length):
    """Non-overlapping windows of `length + 1` ids (inputs and next tokens)."""
    count = (len(ids) - 1) // length
    starts = np.arange(count) * length
    return np.stack([ids[s : s + length + 1] for s in starts])


def lm_arrays(windows_, pad_tail=0, seed=0):
    """`(x, y, sample_weight)` of a causal LM from windows, as KerasHub's
    preprocessor gives them. With `pad_tail`, each window's last 0 to
    `pad_tail` tokens are padding (the sample weight leaves them out)."""
    ids = windows_.copy()
    mask = np.ones(ids.shape, bool)
    if pad_tail:
        rng = np.random.default_rng(seed)
        cut = rng.integers(0, pad_tail + 1, len(ids))
        mask = np.arange(ids.shape[1]) < (ids.shape[1] - cut)[:, None]
        ids[~mask] = PAD
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return x, ids[:, 1:], mask[:, 1:].astype("float32")


def gpt2(hidden, layers, heads, length, vocabulary=PIECES, seed=0, dropout=0.1):
    """A randomly initialised KerasHub GPT-2 causal LM, without preprocessor."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        intermediate_dim=4 * hidden,
        dropout=dropout,
        max_sequence_length=length,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
