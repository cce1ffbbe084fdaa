"""Teacher and student logits over vocabularies that differ only by padding.

Language models often pad their embedding, and so their logits, to a
multiple of 64 or 128 for speed: 32,000 token ids in 32,064 logits, or
Qwen2.5's 151,936 and 152,064 logits over one tokenizer. The ids they share
are the leading ones; the extra logits belong to no token. The Distiller
then distils over the shared ids: by `shared_vocabulary=N`, or by the rule
in `shared_size`.
"""

from absl import logging

from kd_keras import _checks
from kd_keras.losses import check_same_shape

# Embeddings are padded to a multiple of this (64 or 128 in practice) ...
PADDING_MULTIPLE = 64
# ... by at most this many logits.
MOST_PADDING = 256


def check_argument(shared_vocabulary):
    if shared_vocabulary is not None:
        _checks.check_positive_int(shared_vocabulary, "shared_vocabulary")
    return shared_vocabulary


def shared_size(teacher_shape, student_shape, given=None):
    """The number of leading classes (token ids) to distil over, or None to
    use the logits as they are.

    With `given`, that number (at most the smaller size). Without it, logits
    of the same size are used whole, and logits per token (rank 3 or more)
    whose sizes differ by padding are cut to the smaller size: the larger is
    a multiple of 64 and exceeds the smaller by at most 256. Any other
    mismatch of logits per token raises before work (of classes, the
    caller's shape check does).
    """
    teacher, student = teacher_shape[-1], student_shape[-1]
    if given is not None:
        smaller = min(n for n in (teacher, student, given) if n is not None)
        if given > smaller:
            raise ValueError(
                f"`shared_vocabulary={given}` is more than the logits hold: "
                f"the teacher gives {teacher} and the student {student} per "
                "position. Pass at most the smaller, the number of token ids "
                "both tokenizers share."
            )
        return None if teacher == student == given else given
    if teacher is None or student is None or teacher == student:
        return None
    if len(teacher_shape) < 3:
        return None  # Classes, not tokens: `check_same_shape` says so.
    larger, smaller = max(teacher, student), min(teacher, student)
    if larger % PADDING_MULTIPLE == 0 and larger - smaller <= MOST_PADDING:
        return smaller
    raise ValueError(
        f"The teacher gives {teacher} logits per token and the student "
        f"{student}. Token-level distillation compares the two distributions "
        "id by id, so both models need one vocabulary. If one model's "
        "logits are the other's vocabulary padded (e.g. 32000 ids in 32064 "
        "logits), pass `shared_vocabulary=N`, the number of ids both share. "
        "(Without it, logits per token whose larger size is a multiple of "
        f"{PADDING_MULTIPLE} and exceeds the smaller by at most {MOST_PADDING} "
        "are taken as padding.) Models with different tokenizers cannot be "
        "distilled token by token, and kd_keras does not map one vocabulary "
        "onto another: give the student the teacher's tokenizer, or train "
        "it on the teacher's generated text (sequence-level distillation)."
    )


def check_shapes(teacher_shape, student_shape, given=None, where=""):
    """`shared_size` of two logit shapes, which must agree on every other
    axis; raises otherwise."""
    teacher_shape, student_shape = tuple(teacher_shape), tuple(student_shape)
    size = shared_size(teacher_shape, student_shape, given)
    if size is not None:
        teacher_shape = (*teacher_shape[:-1], size)
        student_shape = (*student_shape[:-1], size)
    check_same_shape(teacher_shape, student_shape, where)
    return size


def tell_cut(teacher, student, size):
    """Logs, once per Distiller, that the padding rule cut the logits: the
    rule cannot tell padding from another tokenizer of nearly one size."""
    logging.warning(
        "Distilling over the first %d token ids: the teacher's %d logits and "
        "the student's %d are taken as one vocabulary, the larger padded. If "
        "the two models use different tokenizers, this is wrong: token-level "
        "distillation needs one tokenizer. Pass `shared_vocabulary=%d` to "
        "say so and silence this warning.",
        size,
        teacher,
        student,
        size,
    )


def cut(logits, size):
    """The first `size` logits of every position (all, for None)."""
    return logits if size is None else logits[..., :size]
