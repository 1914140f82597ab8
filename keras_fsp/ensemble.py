"""Several teachers as one: `teacher_ensemble([a, b])` is a functional Keras
model whose logits are the weighted mean of its members' logits.

    ensemble = teacher_ensemble([teacher_a, teacher_b], weights=[2, 1])
    distiller = FSPDistiller(ensemble, student)   # or FSPDistiller([a, b], student)

The ensemble is an ordinary teacher to the distiller and to every term:

- *Logits.* `EnsembleLogits` (a registered, serialisable layer) computes
  `sum_i w_i z_i / sum_i w_i` from the members' logits `z_i`; a member
  ending in a softmax contributes its log-probabilities, which differ from
  its logits by one constant per example, so every term on softmaxes of
  (tempered) logits sees the same thing. The soft targets at temperature T
  are then `softmax(sum_i w_i z_i / T) ∝ prod_i softmax(z_i / T)^(w_i /
  sum w)`: the normalised, weighted geometric mean of the members' tempered
  distributions, not the arithmetic mean of their probabilities (Hinton et
  al. 2015 allow either for an ensemble's soft targets; the geometric one
  keeps the ensemble a teacher of logits).
- *One forward pass.* The members are nested functional models of the
  ensemble, so one pass of the ensemble runs each member once on the
  batch; the distiller freezes the ensemble, and with it every member.
  Tap views compute only what is asked for: a stage tapping one member's
  features does not run the others.
- *Names.* A member's layers are named by their path, `"member/layer"`
  (`keras_fsp.taps`); a feature term names the member it taps by that path,
  e.g. `HintTerm("teacher_b/stage2", "stage2")`. Members keep their model
  names; a name taken by an earlier member (two `cifar_resnet(26)` are both
  called `"resnet26"`) becomes `"<name>_<index>"`. The user's model
  is not renamed: that member is a *view* of it (a functional model on the
  same graph, sharing its layers and weights, under the new name). A
  Sequential member is such a view too, so that its layers can be tapped.
- *Features.* Automatic pairing (`keras_fsp.pairing`: FSP sections, hint
  and attention layers, penultimate features) reads one member, the
  `features_from`-th (default the first), as if it were the teacher, with
  the ensemble's paths (`"teacher_a/stage1"`): `feature_graph` is what it
  reads.

Every member must be a functional (or Sequential) model with one input and
one output, all of the same input shape and class count; anything else is
refused with a one-line `ValueError` before any training.
"""

import math

import keras
from keras import ops

from keras_fsp import compat, taps


@keras.saving.register_keras_serializable(package="keras_fsp")
class EnsembleLogits(keras.layers.Layer):
    """The ensemble's output: the weighted mean of its members' logits.

    It also records the members' names (in input order) and which member's
    features stand for the ensemble in automatic pairing, so that both save
    with the model.

    Args:
        member_weights: one positive weight per member (normalised here).
        probabilities: per member, whether its output is a softmax (its
            log-probabilities are averaged then).
        members: the members' names in the ensemble, in input order.
        features_from: the index of the member automatic pairing reads.
    """

    def __init__(self, member_weights, probabilities, members, features_from=0, **kwargs):
        kwargs.setdefault("dtype", "float32")  # logits averaged in float32 under any policy
        super().__init__(**kwargs)
        self.member_weights = [float(w) for w in member_weights]
        self.probabilities = [bool(p) for p in probabilities]
        self.members = [str(m) for m in members]
        self.features_from = int(features_from)

    def call(self, inputs):
        total = sum(self.member_weights)
        mean = 0.0
        for x, weight, probabilities in zip(inputs, self.member_weights, self.probabilities):
            mean = mean + (weight / total) * taps.as_logits(ops.cast(x, "float32"), probabilities)
        return mean

    def compute_output_shape(self, input_shape):
        # Given, not traced: a tap view may be built inside a JAX train step.
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "member_weights": self.member_weights,
                "probabilities": self.probabilities, "members": self.members,
                "features_from": self.features_from}


def _check_weights(weights, n):
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"teacher_ensemble: {len(weights)} weights for {n} teachers; give one "
                         "per teacher (or none: equal weights).")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"teacher_ensemble: the weights must be positive finite numbers; got "
                         f"{weights}.")
    return weights


def _check_member(model, i):
    """Refuses a teacher that an ensemble cannot call on its shared input."""
    role = f"teacher {i}"
    taps.check_model(model, role)
    if not taps.is_functional(model):
        raise ValueError(
            f"teacher_ensemble: {role} {model.name!r} is a subclassed model; an ensemble calls "
            "functional (or Sequential) teachers built on an Input: wrap it, "
            "x = keras.Input(shape); keras.Model(x, model(x)).")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"teacher_ensemble: {role} {model.name!r} has {len(model.inputs)} "
                         f"inputs and {len(model.outputs)} outputs; each teacher takes one input "
                         "and gives one output, its logits.")


def _check_alike(models):
    """Refuses teachers that do not take the same inputs or give the same
    number of classes (a dimension of None matches any)."""
    shape, classes = tuple(models[0].inputs[0].shape[1:]), models[0].outputs[0].shape[-1]
    for i, model in enumerate(models[1:], 1):
        other = tuple(model.inputs[0].shape[1:])
        if len(other) != len(shape) or any(a is not None and b is not None and a != b
                                           for a, b in zip(other, shape)):
            raise ValueError(
                f"teacher_ensemble: teacher {i} {model.name!r} takes inputs of shape {other} and "
                f"teacher 0 {models[0].name!r} {shape}: every teacher runs on the same batch.")
        other = model.outputs[0].shape[-1]
        if None not in (classes, other) and other != classes:
            raise ValueError(
                f"teacher_ensemble: teacher {i} {model.name!r} gives {other} classes and teacher "
                f"0 {models[0].name!r} {classes}: their logits are averaged class by class.")


def _member_name(model, i, taken):
    name = model.name
    if name in taken:
        name = f"{model.name}_{i}"
        while name in taken:
            name += "_"
    taken.add(name)
    return name


def _as_member(model, name):
    """`model` itself, or a view of it (its graph, layers and weights) named
    `name`; Sequential models are viewed too, so that taps see their layers."""
    if model.name == name and compat.is_graph_model(model):
        return model
    return keras.Model(model.inputs[0], model.outputs[0], name=name)


def teacher_ensemble(teachers, weights=None, features_from=0, name="teacher_ensemble"):
    """One functional teacher from several: its logits are the weighted mean
    of theirs (see the module's docstring).

    Args:
        teachers: trained functional (or Sequential) `keras.Model`s with one
            input each, all of the same input shape and class count,
            returning logits (or probabilities from a final softmax).
        weights: one positive weight per teacher; default equal.
        features_from: the index of the teacher whose features automatic
            pairing (FSP, hints, attention, relational terms) reads.
        name: the ensemble's name.

    Returns:
        a functional `keras.Model` (saved and loaded as any Keras model).

    Raises:
        ValueError: one line naming the teacher that cannot take part, or
            the bad weights or `features_from`.
    """
    teachers = list(teachers)
    if not teachers:
        raise ValueError("teacher_ensemble needs at least one teacher.")
    for i, model in enumerate(teachers):
        _check_member(model, i)
    _check_alike(teachers)
    weights = _check_weights(weights, len(teachers))
    if not (isinstance(features_from, int) and 0 <= features_from < len(teachers)):
        raise ValueError(f"teacher_ensemble: features_from={features_from!r} is no teacher's "
                         f"index; give 0 to {len(teachers) - 1}.")
    taken = set()
    members = [_as_member(m, _member_name(m, i, taken)) for i, m in enumerate(teachers)]
    first = teachers[0].inputs[0]
    x = keras.Input(batch_shape=first.shape, dtype=first.dtype, name=f"{name}_inputs")
    head = EnsembleLogits(weights, [taps.ends_in_softmax(m) for m in teachers],
                          [m.name for m in members], features_from, name=f"{name}_logits")
    return keras.Model(x, head([m(x) for m in members]), name=name)


def head(model):
    """The `EnsembleLogits` layer of an ensemble, or None for another model."""
    if not taps.is_functional(model):
        return None
    return next((layer for layer in model.layers if isinstance(layer, EnsembleLogits)), None)


def members(model):
    """The member models of an ensemble, in order (`[]` for another model)."""
    found = head(model)
    return [] if found is None else [model.get_layer(n) for n in found.members]


def feature_member(model):
    """`(member, path prefix)`: the model whose features stand for `model`
    and the prefix of its layers' paths in `model`; `(model, "")` for a
    model that is no ensemble."""
    found = head(model)
    if found is None:
        return model, ""
    name = found.members[found.features_from]
    return model.get_layer(name), f"{name}/"


def feature_graph(model, role="model"):
    """The graph automatic pairing reads (`keras_fsp.taps.Graph`): the
    model's own, or for an ensemble its feature member's, its layers named
    by their paths in the ensemble and its output the member's logits."""
    graph = taps.graph(model, role)
    found = head(model)
    if found is None:
        return graph
    member, prefix = feature_member(model)
    nodes = {n: node for n, node in graph.nodes.items() if n.startswith(prefix)}
    output = graph.nodes[found.name].inputs[found.features_from]
    return taps.Graph(member, graph.inputs, output, nodes)
