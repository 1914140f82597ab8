"""The frozen teacher in a lower precision than the student.

    teacher = teacher_in_precision(teacher, "bfloat16")
    distiller = FSPDistiller(teacher, student)   # the student as it was

The teacher's forward pass is most of a distillation step's work on large
networks, and a frozen teacher needs neither float32 master weights nor
gradients. `teacher_in_precision` returns a frozen copy of it that computes
in a lower precision; the student keeps its own dtype policy, its float32
variables and its gradients.

- `"bfloat16"`, `"float16"`: every layer computes *and stores its weights*
  in that dtype (Keras' `"bfloat16"` policy, not `"mixed_bfloat16"`, whose
  float32 variables are cast at every step): the weights are cast once,
  here. `BatchNormalization` layers are the exception: they keep their
  moving mean and variance in float32 (the mixed policy) and output the
  low precision, because Keras normalises in float32 but reads the stored
  statistics in their own dtype, and a mean rounded to 8 bits loses what
  subtracting it should keep. Layer, group and RMS normalisations compute
  their statistics from the batch, in float32 (Keras upcasts them), and
  keep their scales in the low precision like any weight. float16 has
  the range of +-65504: a teacher whose activations go beyond it gives
  infinite outputs (`keras-fsp distill` refuses such a teacher; bfloat16,
  with float32's range, is the safer choice).
- `"int8"`: Keras' own `quantize("int8")` of the Dense, EinsumDense and
  Embedding layers (the work of a transformer; Keras quantizes no
  convolution): int8 weights with one abs-max scale per output channel, the
  inputs of each such layer quantized per row on the fly
  (`keras.quantizers.AbsMaxQuantizer`), an int8 matrix product; everything
  else in bfloat16 as above. The layers that compute the logits stay in
  bfloat16: they are a sliver of the work, and the soft targets come from
  them directly. A teacher with nothing else that Keras can quantize (a
  convolutional network) is refused: use `"bfloat16"` there.
- `None`, `"float32"`, or the precision the teacher is in already: the
  teacher itself.

float8 is not offered: Keras' `quantize("float8")` is a training-time
scheme (delayed scaling: each layer's scales follow the amax history that
its *training* steps record). A frozen teacher never trains, so its layers
would quantize with their initial, uncalibrated scales, and they keep their
full-precision kernels (the float8 casts happen at every call), so nothing
is stored smaller.

The copy has the teacher's architecture, layer names and paths (taps name
teacher layers by them, `keras_fsp.taps`), so every feature term, automatic
pairing, teacher caching (`keras_fsp.teacher_cache`) and `teacher_ensemble`
work with it as with the teacher; the teacher given is left unchanged (and
not frozen). Functional and Sequential teachers are copied (nested models
included); a subclassed one is refused.
"""

import keras

from keras_fsp import compat, taps
from keras_fsp.cloning import with_dtype_policies

PRECISIONS = ("bfloat16", "float16", "int8")
# Keras quantizes these layers (exactly these classes: `quantize` refuses
# their subclasses).
_QUANTIZABLE = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding,
                keras.layers.ReversibleEmbedding)


def precision_of(model):
    """The lower precision `model` stores its weights in: `"int8"` when a
    layer of it is quantized, `"bfloat16"` or `"float16"` when a layer
    keeps its weights in that dtype, else None (float32, and the mixed
    policies: float32 variables)."""
    layers = [layer for layer in compat.sublayers(model) if layer.weights]
    if any(getattr(layer.dtype_policy, "quantization_mode", None) for layer in layers):
        return "int8"
    stored = {layer.dtype_policy.variable_dtype for layer in layers}
    return next((p for p in ("bfloat16", "float16") if p in stored), None)


def _logits_layers(model):
    """The layers that compute `model`'s logits: those with weights first
    reached going back from its output (an ensemble: each member's)."""
    g = taps.graph(model, "teacher")
    found, todo, seen = set(), [g.output], set()
    while todo:
        name = g.producer(todo.pop())
        if name is None or name in seen:
            continue
        seen.add(name)
        node = g.nodes[name]
        if node.layer.weights:
            found.add(id(node.layer))
        else:
            todo.extend(node.inputs)
    return found


def _quantizable(model):
    """The layers the int8 teacher quantizes: those Keras can, but the
    logits' own."""
    head = _logits_layers(model)
    return [layer for layer in compat.sublayers(model)
            if type(layer) in _QUANTIZABLE and id(layer) not in head]


def _built_as(precision):
    """How to make a teacher in `precision` without this module."""
    if precision == "int8":
        return ("build it under keras.config.set_dtype_policy('mixed_bfloat16'), load its "
                "weights and call its quantize('int8')")
    return f"build it under keras.config.set_dtype_policy({precision!r}) and load its weights"


def _copy(model, compute, precision, quantized=()):
    """`model` rebuilt with `compute` as every layer's dtype policy (its
    weights cast once); the batch normalisations, and the layers that are or
    hold one of `quantized` (so that their kernels are quantized from
    float32, their scales and biases kept in it), under the mixed policy:
    float32 variables."""
    mixed, quantized = f"mixed_{compute}", {id(layer) for layer in quantized}

    def policy_of(layer):
        keep = isinstance(layer, keras.layers.BatchNormalization) or any(
            id(sub) in quantized for sub in compat.sublayers(layer))
        return mixed if keep else compute

    try:
        return with_dtype_policies(model, policy_of)
    except ValueError as e:
        raise ValueError(f"the teacher {model.name!r} cannot be copied into {precision}: {e}; "
                         f"{_built_as(precision)} instead.") from None


def teacher_in_precision(teacher, precision):
    """The frozen `teacher` computing in `precision` (see the module's
    docstring).

    Args:
        teacher: a functional or Sequential `keras.Model` (an ensemble of
            `keras_fsp.teacher_ensemble` too).
        precision: `"bfloat16"`, `"float16"`, `"int8"`, or `None` /
            `"float32"` for the teacher as it is.

    Returns:
        a frozen copy of `teacher` with its layer names and weights (the
        teacher itself for None, "float32", or the precision it is in).

    Raises:
        ValueError: one line, for another precision, a subclassed teacher,
            a teacher stored in another lower precision already, or int8
            for a teacher with no layer but its logits' that Keras can
            quantize.
    """
    if precision in (None, "float32"):
        return teacher
    if precision not in PRECISIONS:
        raise ValueError(f"teacher precision {precision!r}: choose one of "
                         f"{', '.join(PRECISIONS)}, or None for the teacher as it is.")
    taps.check_model(teacher, "teacher")
    if not (isinstance(teacher, keras.Sequential) or compat.is_graph_model(teacher)):
        raise ValueError(
            f"the teacher {teacher.name!r} is a subclassed model, which cannot be copied layer "
            f"by layer into {precision}: {_built_as(precision)} instead.")
    current = precision_of(teacher)
    if current == precision:
        return teacher
    if current is not None:
        raise ValueError(f"the teacher {teacher.name!r} stores its weights in {current} "
                         f"already: make the {precision} one from the float32 teacher.")
    if precision == "int8":
        quantized = _quantizable(teacher)
        if not quantized:
            raise ValueError(
                f"the teacher {teacher.name!r} has no layer that Keras quantizes to int8 (Dense, "
                "EinsumDense, Embedding) but the one computing its logits: its convolutions "
                "would stay in bfloat16, so use 'bfloat16' for it.")
        copy = _copy(teacher, "bfloat16", precision, quantized)
        chosen = {id(layer) for layer in _quantizable(copy)}
        copy.quantize("int8", filters=lambda layer: id(layer) in chosen)
    else:
        copy = _copy(teacher, precision, precision)
    copy.trainable = False
    return copy
