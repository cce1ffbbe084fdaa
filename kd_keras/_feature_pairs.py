"""The feature pairs of a Distiller's feature losses: where each pair of
features is read, its adapter, and each loss's values on them.

A feature loss names pairs of layers, `(teacher layer, student layer)`;
each pair gets a `Pair` of taps (see `_features`) and, once the features'
shapes are known, its adapter. The runs of the teacher and the student
return their logits together with their features, read in the same
forward pass, as lists in the order of the pairs.
"""

import dataclasses

import keras
from keras import ops
import numpy as np

from kd_keras import _checks
from kd_keras import _features
from kd_keras import losses as kd_losses


@dataclasses.dataclass
class Pair:
    """Where a pair's features are read, and the adapter that maps the
    student's feature to the teacher's (None until prepared, or if the loss
    needs none)."""

    teacher: _features.Tap
    student: _features.Tap
    adapter: object = None


@dataclasses.dataclass(frozen=True)
class Group:
    """A feature loss, its place among the Distiller's losses, and its
    pairs (a slice of `FeaturePairs.pairs`)."""

    index: int
    loss: object
    pairs: slice


class FeaturePairs:
    """The feature pairs of the feature losses among `weighted_losses`.

    Args:
        teacher: the teacher model.
        student: the student model.
        weighted_losses: the Distiller's `[(loss, weight), ...]`.
        owner: what the pairs ask of the Distiller when they make their
            adapters: `owner.scope()`, the distribution scope to build them
            in; `owner.optimizer_built()`; `owner.adopt(adapters)`, which
            tracks them.
    """

    def __init__(self, teacher, student, weighted_losses, owner):
        self.pairs, self.groups = [], []
        for index, (loss, _) in enumerate(weighted_losses):
            if not isinstance(loss, kd_losses.FeatureLoss):
                continue
            start = len(self.pairs)
            for teacher_layer, student_layer in loss.layer_pairs():
                self.pairs.append(
                    Pair(
                        _features.Tap(teacher, teacher_layer, "teacher"),
                        _features.Tap(student, student_layer, "student"),
                    )
                )
            self.groups.append(Group(index, loss, slice(start, len(self.pairs))))
        self.teacher, self.student, self.owner = teacher, student, owner
        self._teacher_taps = [pair.teacher for pair in self.pairs]
        self._student_taps = [pair.student for pair in self.pairs]
        # [(teacher shape, student shape)] of each pair, once prepared.
        self.shapes = None

    def __bool__(self):
        return bool(self.pairs)

    @property
    def adapters(self):
        """The adapters of the pairs that have one, in the pairs' order."""
        return [pair.adapter for pair in self.pairs if pair.adapter is not None]

    @property
    def prepared(self):
        """True once the pairs' shapes are checked and their adapters made."""
        return self.shapes is not None

    def loss_names(self):
        return ", ".join(sorted({type(group.loss).__name__ for group in self.groups}))

    def run_teacher(self, inputs, check=False):
        """The teacher's logits and features, in inference mode."""
        return _run(self.teacher, self._teacher_taps, inputs, False, check)

    def run_student(self, inputs, training, check=False):
        """The student's logits and features."""
        return _run(self.student, self._student_taps, inputs, training, check)

    def values(self, teacher_features, student_features):
        """`{loss index: values per example}` of every feature loss."""
        return {
            group.index: self._group_values(group, teacher_features, student_features)
            for group in self.groups
        }

    def _group_values(self, group, teacher_features, student_features):
        return group.loss.per_example(
            teacher_features[group.pairs],
            student_features[group.pairs],
            [pair.adapter for pair in self.pairs[group.pairs]],
        )

    def zero_values(self, batch):
        """Zeros per example for every feature loss, for a step in which the
        term is off: the adapters get zero gradients rather than none, which
        Keras would warn about."""
        untouched = [ops.sum(v) for a in self.adapters for v in a.trainable_variables]
        zero = 0.0 * ops.sum(ops.stack(untouched or [ops.zeros(())]))
        return {
            group.index: ops.zeros((batch,), "float32") + zero for group in self.groups
        }

    def no_teacher_features(self, what="batch"):
        return ValueError(
            f"{self.loss_names()} compares the teacher's features, but the "
            f"{what} carries cached teacher logits, which hold no features. "
            "Pass the data without `cache_teacher_logits`: the teacher then "
            "runs on the fly."
        )

    # Shapes and adapters.

    def prepare(self, shapes):
        """Checks each pair's shapes and makes its adapter, once."""
        if self.prepared:
            return
        shapes = [(tuple(t), tuple(s)) for t, s in shapes]
        adapters = []
        for group in self.groups:
            for pair, (teacher_shape, student_shape) in zip(
                self.pairs[group.pairs], shapes[group.pairs], strict=True
            ):
                try:
                    adapters.append(group.loss.prepare(teacher_shape, student_shape))
                except ValueError as error:
                    raise ValueError(
                        f"{type(group.loss).__name__} `{group.loss.name}`, "
                        f"teacher layer `{pair.teacher.name}` and student "
                        f"layer `{pair.student.name}`: {error}"
                    ) from None
        if any(a is not None for a in adapters) and self.owner.optimizer_built():
            raise ValueError(
                "The feature adapters are built on the first batch (the "
                "models' input shape is not fixed), but the optimizer was "
                "already built without them. Compile the Distiller again "
                "before `fit`, without building its optimizer."
            )
        with self.owner.scope():
            for pair, adapter, (_, student_shape) in zip(
                self.pairs, adapters, shapes, strict=True
            ):
                if adapter is not None:
                    adapter.build((None, *student_shape[1:]))
                pair.adapter = adapter
        self.shapes = shapes
        self.owner.adopt(self.adapters)

    def prepare_early(self):
        """Prepares the pairs on two rows of zeros when the models' input
        shapes are fixed, so that a saved Distiller loads its adapters'
        weights; else the first batch of `fit` or `evaluate` does."""
        rows = zero_rows(_model_inputs(self.student))
        if rows is None:
            return
        try:
            features = self._eager_features(rows, check=False)
        except Exception:  # The first batch names what fails.
            return
        self.prepare([(t.shape, s.shape) for t, s in features])

    def check(self, rows, what):
        """Runs both models on the first rows, checks every feature, makes
        the adapters and computes the feature losses once."""
        features = self._eager_features(rows)
        self.prepare([(t.shape, s.shape) for t, s in features])
        for pair, (t, s) in zip(self.pairs, features, strict=True):
            adapted = None if pair.adapter is None else pair.adapter(s).shape
            if adapted is not None and tuple(adapted[1:]) != tuple(t.shape[1:]):
                raise ValueError(
                    f"The adapter of student layer `{pair.student.name}` maps "
                    f"its feature to shape {tuple(adapted)}, not to the shape "
                    f"of teacher layer `{pair.teacher.name}`, "
                    f"{tuple(t.shape)}. Give an adapter whose output has the "
                    "teacher's shape."
                )
        teacher_features = [t for t, _ in features]
        student_features = [s for _, s in features]
        for group in self.groups:
            try:
                self._group_values(group, teacher_features, student_features)
            except Exception as error:  # Whatever the loss raises, with shapes.
                shapes = [
                    (tuple(t.shape), tuple(s.shape)) for t, s in features[group.pairs]
                ]
                raise ValueError(
                    f"{type(group.loss).__name__} `{group.loss.name}` fails on "
                    f"the first batch of the {what}, with (teacher, student) "
                    f"features of shapes {shapes}: {error}"
                ) from error

    def check_spec(self, inputs_spec, what):
        """Prepares the pairs from a pipeline's inputs spec, for data whose
        first batch is not read (a `.cache()`). Refuses data that give no
        shapes when an adapter needs them."""
        needs_adapter = any(group.loss.needs_adapter for group in self.groups)
        if self.prepared or not needs_adapter:
            return  # Shapes are checked when the step is traced.
        rows = zero_rows(inputs_spec)
        if rows is None:
            raise ValueError(
                f"{self.loss_names()} needs the shapes of the features before "
                f"training, but the first batch of the {what} cannot be read "
                "ahead (a generator, or a `.cache()` pipeline without fixed "
                "shapes). Pass arrays, a PyDataset or a tf.data.Dataset, or "
                "build the student and the teacher with `keras.Input` of a "
                "fixed shape."
            )
        self.check(rows, what)

    def _eager_features(self, rows, check=True):
        """`[(teacher feature, student feature)]` of every pair, on `rows`."""
        _, teacher = self.run_teacher(rows, check)
        _, student = self.run_student(rows, False, check)
        return list(zip(teacher, student, strict=True))


def _run(model, taps, inputs, training, check=False):
    """Runs `model` and returns its outputs and the features of `taps`, read
    in the same forward pass."""
    layers = [tap.layer for tap in taps if tap.layer is not None]
    with _features.capture(layers) as recorded:
        outputs = model(inputs, training=training)
    return outputs, [tap.feature(recorded, inputs, check) for tap in taps]


def _model_inputs(model):
    """A model's one input (a `keras.Input`), or None."""
    shapes = _checks.input_shapes(model)
    return model.inputs[0] if shapes and len(shapes) == 1 else None


def zero_rows(spec):
    """Two rows of zeros for each input of `spec` (a structure of tensors
    or specs with a batch axis), or None unless every shape is fixed and
    numeric."""
    leaves = keras.tree.flatten(spec) if spec is not None else []

    def dtype(leaf):
        try:
            return np.dtype(getattr(leaf.dtype, "as_numpy_dtype", leaf.dtype))
        except TypeError:
            return None

    if not leaves or any(
        getattr(leaf, "shape", None) is None
        or None in tuple(leaf.shape)[1:]
        or dtype(leaf) is None
        or dtype(leaf).kind not in "biuf"
        for leaf in leaves
    ):
        return None
    return keras.tree.map_structure(
        lambda leaf: np.zeros([2, *tuple(leaf.shape)[1:]], dtype(leaf)), spec
    )
