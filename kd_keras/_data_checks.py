"""The checks a Distiller runs on the first batch of its data, before any
work is done: bad data fail with a message that names the fix, not deep
inside a compiled step or after an epoch."""

import keras
from keras import ops
import numpy as np

from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _loss_terms

_CATEGORICAL_LOSSES = (
    keras.losses.CategoricalCrossentropy,
    keras.losses.CategoricalFocalCrossentropy,
    keras.losses.CategoricalHinge,
    keras.losses.KLDivergence,
)


class FirstBatchChecks:
    """Checks `fit`'s and `evaluate`'s data on their first batch.

    Args:
        teacher: the teacher.
        student: the student.
        terms: the Distiller's `LossTerms`.
        pairs: the Distiller's `FeaturePairs`.
    """

    def __init__(self, teacher, student, terms, pairs):
        self.teacher, self.student = teacher, student
        self.terms, self.pairs = terms, pairs

    def check(self, x, y, *, weight, check_finite, what, student_loss_arg=None):
        """Checks the data `(x, y)` of `fit` or `evaluate`.

        Args:
            x, y: the data, as `fit` takes them.
            weight: λ, a number.
            check_finite: refuse NaN or infinite float inputs.
            what: the data's name in messages ("training data", ...).
            student_loss_arg: the label loss as the user gave it, to name it.
        """
        batch = _datasets.first_batch(x, y, what)
        if batch is None:
            if self.pairs:
                self._features_from_spec(x, what)
            return
        inputs, labels = batch
        inputs, cached = _datasets.split_cached(inputs)
        if check_finite:
            for leaf in keras.tree.flatten(inputs):
                _checks.check_finite(leaf, f"inputs of the {what}")
        _checks.check_batched(inputs, self.student, "student", what)
        self._check_labels_given(labels, weight, what)
        rows = keras.tree.map_structure(lambda a: a[: _checks.PEEK_ROWS], inputs)
        student_logits = _first_logits(self.student, "student", rows, what)
        self.terms.check_logits_shape(student_logits.shape)
        if self.pairs:
            if cached is not None:
                raise self.pairs.no_teacher_features(what)
            self.pairs.check(rows, what)
        _checks.check_not_probabilities(student_logits, "student", self.student.name)
        teacher_logits = self._teacher_logits(rows, cached, weight, what)
        if teacher_logits is not None:
            self.terms.check_shapes(
                (None, *teacher_logits.shape[1:]),
                (None, *student_logits.shape[1:]),
                " per example",
            )
        if labels is None:
            return
        if self.terms.student_loss is None:
            _checks.check_labels(labels, student_logits.shape)
        else:
            _checks.check_finite(labels, f"labels of the {what}")
            self._check_student_loss_on(
                labels[: _checks.PEEK_ROWS], student_logits, student_loss_arg
            )

    def _features_from_spec(self, x, what):
        """For data whose first batch is not read: the feature pairs from a
        pipeline's element spec; cached logits are refused."""
        spec = _datasets.describe(x).inputs_spec
        inputs, cached = (
            _datasets.split_cached(spec) if spec is not None else (None,) * 2
        )
        if cached is not None:
            raise self.pairs.no_teacher_features(what)
        self.pairs.check_spec(inputs, what)

    def _check_labels_given(self, labels, weight, what):
        if labels is not None:
            return
        if weight < 1.0:
            raise ValueError(
                "The data has no labels, but the label term has weight "
                f"1 - distillation_weight = {1.0 - weight:g}. Pass labels, "
                "or set `distillation_weight=1.0` to distil on an unlabeled "
                "transfer set."
            )
        needy = self.terms.needing_labels()
        if needy:
            raise _loss_terms.needs_labels_error(needy, what)

    def _teacher_logits(self, rows, cached, weight, what):
        """The teacher's logits on the first rows, checked; None where the
        teacher does not run, or was checked when the Distiller was made."""
        if cached is not None:
            _checks.check_finite(cached, f"cached teacher logits of the {what}")
            return np.asarray(cached[: _checks.PEEK_ROWS])
        if _checks.output_layers(self.teacher) or not weight:
            return None
        logits = _first_logits(self.teacher, "teacher", rows, what)
        _checks.check_not_probabilities(logits, "teacher", self.teacher.name)
        return logits

    def _check_student_loss_on(self, labels, student_logits, given):
        """Runs the user's label loss on the first rows, so that labels it
        cannot take fail here, with a message, rather than in the step."""
        loss = self.terms.student_loss
        name = given if isinstance(given, str) else getattr(given, "__name__", None)
        name = name or type(given).__name__
        if (
            isinstance(loss, _CATEGORICAL_LOSSES)
            and student_logits.shape[-1] > 1
            and np.ndim(labels) < student_logits.ndim
        ):
            raise ValueError(
                f"`student_loss` {name} takes one-hot labels of shape "
                f"{_checks.batch_shape(student_logits.shape[1:])}, but the "
                f"labels are class ids of shape {np.shape(labels)}. Pass "
                "`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`"
                ", or one-hot labels (`keras.utils.to_categorical`)."
            )
        try:
            loss(labels, student_logits)
        except Exception as error:  # Anything the loss raises, with context.
            raise ValueError(
                f"`student_loss` {name} fails on the first batch, with labels "
                f"of shape {np.shape(labels)} and student logits of shape "
                f"{student_logits.shape}: {error}"
            ) from error


def _first_logits(model, role, rows, what):
    """The model's logits on the first rows of the data, as NumPy; raises,
    naming the model and the data, if the model cannot take them."""
    try:
        return ops.convert_to_numpy(model(rows))
    except Exception as error:  # Whatever the model raises, with context.
        shapes = keras.tree.map_structure(np.shape, rows)
        raise ValueError(
            f"The {role} `{model.name}` fails on the first batch of the {what} "
            f"(inputs of shape {shapes}): {error}"
        ) from error
