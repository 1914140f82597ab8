"""Named taps on functional models: one multi-output view per network, so one
forward pass yields the logits and every tapped feature map.

`LOGITS` names a network's output. It and every key keras_fsp adds start
with "/", which no layer name (nor a nested layer's path) can: a user's layer
called `logits` is tapped as any other. For a functional model whose last layer
applies a softmax (`keras.applications` models by default), the tapped
logits are the values *before* the softmax: distillation terms need logits,
and the softmax of probabilities is nearly uniform.

Nested functional models (a keras-hub backbone inside its
`ImageClassifier`, or `keras.Model(x, head(backbone(x)))`) are seen through:
the outer graph is traced once more through the nested model's own graph
(`graph`), so that its layers are tapped in the same single forward pass. A
layer of a nested model is named by its path, `"backbone/layer"` (the
nested model's name, then the layer's); a plain `"layer"` also finds it
when no other layer has that name. Nested models are traced through only
when their `call` is Keras' own (a subclass overriding `call` stays one
opaque layer), and a nested model trains or freezes as a whole in stages
that select trainable layers. A layer known to apply a stack of sublayers
one after another (keras-hub's `ViTEncoder`, `compat.stacked_sublayers`)
is traced as that stack, so that its blocks are tapped by path too
(`"backbone/vit_encoder/transformer_block_1"`; the stack's own name taps
its output).

A model's inputs are tapped by `input_key(name)` (`"/input/padding_mask"`):
what a term reads from the batch besides the features, e.g. a padding mask
(`keras_fsp.masks`).
"""

import difflib
import weakref
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_fsp import compat
from keras_fsp.finite import first_non_finite

LOGITS = "/logits"
_INPUT = "/input/"


def input_key(name):
    """The tap key of the model input called `name`."""
    return _INPUT + name


class Node(NamedTuple):
    """One layer call of a `Graph`."""

    layer: keras.layers.Layer
    inputs: tuple  # the symbolic tensors it was called on
    output: object  # its symbolic output
    top: keras.layers.Layer  # the layer of the model itself that holds it


class Graph:
    """A functional model's layers as one flat graph: `inputs`, the single
    `output`, and `nodes`, `{name: Node}` in graph order."""

    def __init__(self, model, inputs, output, nodes, aliases=None):
        self.model, self.inputs, self.output, self.nodes = model.name, inputs, output, nodes
        # (A Sequential model has no `input` structure until it is called.)
        structure = model.input if compat.is_graph_model(model) else inputs
        self.input_structure = (inputs[0] if len(inputs) == 1 and isinstance(structure, list)
                                else keras.tree.pack_sequence_as(structure, inputs))
        # A layer traced as its stack of sublayers: its name -> its last part's.
        self.aliases = aliases or {}
        self._producer = {id(n.output): name for name, n in nodes.items()}
        self._consumers = {name: [] for name in nodes}
        for name, node in nodes.items():
            for tensor in node.inputs:
                source = self._producer.get(id(tensor))
                if source is not None and name not in self._consumers[source]:
                    self._consumers[source].append(name)

    def producer(self, tensor):
        """The name of the node whose output `tensor` is (None for an input)."""
        return self._producer.get(id(tensor))

    def consumers(self, name):
        """The names of the nodes that take node `name`'s output as input."""
        return self._consumers[name]

    def resolve(self, name, role="model"):
        """The node name that `name` means: itself, or the path of the one
        nested layer of that name.

        Raises:
            ValueError: naming the closest layer names when there is no such
                layer, or the candidates when a plain name is ambiguous.
        """
        if name in self.nodes:
            return name
        if name in self.aliases:
            return self.aliases[name]
        matches = [self.aliases.get(n, n) for n in [*self.nodes, *self.aliases]
                   if n.rsplit("/", 1)[-1] == name]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ValueError(
                f"The {role} {self.model!r} has several layers named {name!r}: {matches}. "
                "Name one by its path."
            )
        names = list(self.nodes)
        close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.4)
        hint = (
            f" Closest layer names: {close}."
            if close
            else f" Its layers are: {names[:30]}{' ...' if len(names) > 30 else ''}."
        )
        raise ValueError(f"The {role} {self.model!r} has no layer named {name!r}.{hint}")

    def input_tensor(self, key, role="model"):
        """The input that the tap `key` (`input_key(name)`) names.

        Raises:
            ValueError: naming the model's inputs when none is called so.
        """
        name = key[len(_INPUT):]
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise ValueError(
            f"The {role} {self.model!r} has no input named {name!r}; its inputs are "
            f"{[t.name for t in self.inputs]}."
        )

    def tensor(self, name, role="model"):
        """The symbolic tensor of the tap `name`: a layer's output, or an
        input (`input_key`)."""
        if name.startswith(_INPUT):
            return self.input_tensor(name, role)
        return self.nodes[self.resolve(name, role)].output


# One graph per model: tracing through nested models calls their layers on
# new symbolic inputs, which should happen once, not per view.
_GRAPHS = weakref.WeakKeyDictionary()


def graph(model, role="model"):
    """The `Graph` of a functional `model`, nested functional models seen
    through (see the module's docstring).

    A model without nested ones is read as built (its layers' outputs). A
    model with some is traced again from new inputs of the same shapes:
    every layer is called once more on symbolic tensors (Keras keeps the
    first call as the layer's `output`, so the model itself is unchanged),
    and nested layers get the shapes of the outer model's inputs (a keras-hub
    backbone built for any image size gets the classifier's).
    """
    check_functional(model, role)
    if model not in _GRAPHS:
        nested = any(compat.is_graph_model(layer) or compat.stacked_sublayers(layer)
                     for layer in model.layers)
        _GRAPHS[model] = _traced(model) if nested else _as_built(model)
    return _GRAPHS[model]


def _as_built(model):
    nodes = {}
    for layer in model.layers:
        try:
            inputs = tuple(keras.tree.flatten(layer.input))
        except (AttributeError, ValueError):
            inputs = ()
        nodes[layer.name] = Node(layer, inputs, layer.output, layer)
    return Graph(model, list(model.inputs), model.outputs[0], nodes)


def _traced(model):
    nodes, aliases = {}, {}

    def recorded(layer, name, owner):
        def call(*args, **kwargs):
            output = layer(*args, **kwargs)
            given = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
            nodes.setdefault(name, Node(layer, tuple(given), output, owner))
            return output

        return call

    def trace(net, tensors, prefix, top):
        def operation_fn(layer):
            owner = top or layer
            if compat.is_graph_model(layer):
                # The nested model's call arguments other than its inputs
                # (training, mask) are the outer call's in a tap view.
                return lambda *args, **kwargs: trace(layer, args[0], f"{prefix}{layer.name}/", owner)
            stack = compat.stacked_sublayers(layer)
            if stack:
                path = f"{prefix}{layer.name}/"
                aliases[prefix + layer.name] = path + stack[-1].name

                def run_stack(x, **kwargs):
                    for part in stack:
                        x = recorded(part, path + part.name, owner)(x, **kwargs)
                    return x

                return run_stack
            return recorded(layer, prefix + layer.name, owner)

        return compat.run_through_graph(net, tensors, operation_fn)

    # New inputs of the same shapes, names and structure (a dict of token
    # ids and a padding mask is fed by name).
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name) for t in model.inputs]
    output = trace(model, inputs, "", None)
    return Graph(model, inputs, keras.tree.flatten(output)[0], nodes, aliases)


def get_layer(model, name, role="model"):
    """Returns `model`'s layer called `name` (a path for nested layers).

    Raises:
        ValueError: naming the closest layer names of the model when there is
            no such layer.
    """
    g = graph(model, role)
    return g.nodes[g.resolve(name, role)].layer


def is_functional(model):
    """Whether `model` is a functional (or Sequential) Keras model built on
    inputs, whose intermediate layers can be tapped."""
    if not isinstance(model, keras.Model):
        return False
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def check_model(model, role):
    """Raises unless `model` is a Keras model (any kind).

    Raises:
        ValueError: for anything else, e.g. a file path.
    """
    if isinstance(model, keras.Model):
        return
    if isinstance(model, str):
        raise ValueError(
            f"The {role} is the string {model!r}: pass a keras.Model, e.g. "
            f"keras.models.load_model({model!r})."
        )
    raise ValueError(f"The {role} must be a keras.Model; got {type(model).__name__}.")


def check_functional(model, role, why="its intermediate layers are tapped"):
    """Raises unless `model` is functional with a single output.

    Raises:
        ValueError: saying what is wrong and why a functional model is needed.
    """
    check_model(model, role)
    if not is_functional(model):
        raise ValueError(
            f"The {role} {model.name!r} is a subclassed model: {why}, which needs a "
            "functional (or Sequential) Keras model built on an Input. Stages whose terms "
            "read only the logits accept any model."
        )
    if len(model.outputs) != 1:
        raise ValueError(
            f"The {role} {model.name!r} has {len(model.outputs)} outputs; keras_fsp "
            "expects one output, the logits."
        )


def check_networks(teacher, student):
    """Refuses a teacher and student that cannot be distilled, before any
    training: something other than Keras models, one model as both, a
    student with nothing to train, and input shapes that differ (a
    dimension of None matches any): the teacher runs on exactly the
    student's batches."""
    check_model(teacher, "teacher")
    check_model(student, "student")
    if teacher is student:
        raise ValueError(
            "The teacher and the student are the same model object: freezing the teacher "
            "would freeze the student. Pass a separate student (e.g. "
            "keras.models.clone_model(teacher) for self-distillation)."
        )
    bad = first_non_finite(teacher.weights) if teacher.built else None
    if bad is not None:
        raise ValueError(
            f"The teacher {teacher.name!r} has a weight that is NaN or infinite ({bad}): its "
            "weights are damaged; load them again from an intact file."
        )
    if student.built and not student.trainable_weights:
        raise ValueError(
            f"The student {student.name!r} has no trainable weights: every layer of it is "
            "frozen (a clone of a frozen teacher keeps its layers' trainable=False). Unfreeze "
            "them before distilling into it: for layer in student.layers: layer.trainable = True."
        )
    shapes = [tuple(m.inputs[0].shape[1:]) if is_functional(m) and len(m.inputs) == 1
              else None for m in (teacher, student)]
    if None in shapes:
        return  # subclassed networks: their shapes are known once called
    t, s = shapes
    if len(t) != len(s) or any(a is not None and b is not None and a != b for a, b in zip(t, s)):
        raise ValueError(
            f"The teacher takes inputs of shape {t} and the student {s}: the teacher runs on "
            "the student's batches, so the shapes must agree."
        )


def _last_node(model):
    g = graph(model)
    return g.nodes.get(g.producer(g.output))


def is_softmax(layer):
    """Whether `layer` applies a softmax (a Softmax layer, or one with a
    softmax activation)."""
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"


class _DenseLogits(keras.layers.Layer):
    """A softmax Dense layer's pre-activation, sharing its weights."""

    def __init__(self, dense, **kwargs):
        super().__init__(name=f"{dense.name}_logits", **kwargs)
        self._dense = [dense]  # a list: not tracked, the model owns the layer

    def call(self, x):
        dense = self._dense[0]
        z = ops.matmul(x, ops.cast(dense.kernel, x.dtype))
        if dense.use_bias:
            z = z + ops.cast(dense.bias, x.dtype)
        return z

    def compute_output_shape(self, input_shape):
        # Given, not traced: the view may be built inside a JAX train step,
        # where tracing `call` symbolically fails.
        return tuple(input_shape[:-1]) + (self._dense[0].units,)


def ends_in_softmax(model):
    """Whether a functional `model`'s output is a softmax (probabilities)."""
    if not is_functional(model):
        return False
    node = _last_node(model)
    return node is not None and is_softmax(node.layer)


def as_logits(outputs, probabilities):
    """A network's `outputs` as logits: log-probabilities when they are
    `probabilities` (the softmax of log p is p)."""
    if not probabilities:
        return outputs
    return ops.log(ops.clip(ops.cast(outputs, "float32"), 1e-30, 1.0))


def logits_tensor(model):
    """The symbolic logits of a functional model (in its `graph`): its
    output, or, when its last layer applies a softmax, the values that go
    into it.

    Raises:
        ValueError: for a softmax layer whose input cannot be recovered.
    """
    node = _last_node(model)
    if node is None or not is_softmax(node.layer):
        return graph(model).output
    layer = node.layer
    if isinstance(layer, (keras.layers.Softmax, keras.layers.Activation)):
        return node.inputs[0]
    if isinstance(layer, keras.layers.Dense):
        return _DenseLogits(layer)(node.inputs[0])
    raise ValueError(
        f"{model.name!r} ends in a softmax inside layer {layer.name!r} "
        f"({type(layer).__name__}); distillation needs logits: build it with "
        "classifier_activation=None (keras.applications) or without the final "
        "softmax."
    )


def tap_model(model, layer_names, include_logits=True, role="model"):
    """A view of `model` whose output is a dict of tapped tensors.

    The view shares the model's layers and weights: calling it is one forward
    pass that returns `{LOGITS: ..., name: feature_map, ...}`. Only the part
    of the graph needed for the requested outputs is computed. A model whose
    nested models have layers of one name (an ensemble of two teachers of
    one architecture) is viewed nested model by nested model.

    Args:
        model: a functional or Sequential `keras.Model` with one output.
        layer_names: names of the layers whose outputs to tap (`LOGITS` may
            be among them; paths for layers of nested models).
        include_logits: whether to include the logits (as `LOGITS`).
        role: word used in error messages ("teacher", "student").

    Returns:
        a `keras.Model` with dict outputs, keyed by the names as given.

    Example:

    >>> from keras_fsp.papers import cifar_resnet
    >>> view = tap_model(cifar_resnet(8), ["stage1", "stage2"])
    >>> sorted(view.output)
    ['/logits', 'stage1', 'stage2']
    """
    g = graph(model, role)
    names = list(layer_names)
    include_logits = include_logits or LOGITS in names
    if _names_repeat(g):
        return _nested_view(model, names, include_logits, role)
    outputs = {}
    if include_logits:
        outputs[LOGITS] = logits_tensor(model)
    for name in names:
        if name == LOGITS:
            continue
        outputs[name] = g.output if name == _OUTPUT else g.tensor(name, role)
    if not outputs:
        raise ValueError("tap_model needs at least one output.")
    return keras.Model(g.input_structure, outputs, name=f"{model.name}_taps")


# A nested model's view also gives its own output, which the outer graph
# goes on from (for a model ending in a softmax, not its logits).
_OUTPUT = "/output"


def _names_repeat(g):
    """Whether two layers of the graph have one name (in nested models)."""
    layers = {id(node.layer): node.layer.name for node in g.nodes.values()}
    return len(set(layers.values())) < len(layers)


def _nested_view(model, names, include_logits, role):
    """`tap_model` of a model whose nested models have layers of one name
    (two teachers of one architecture in an ensemble): Keras refuses a
    graph holding both, so each nested model that holds taps gets a view of
    its own, called where the nested model is; the rest runs as it is."""
    g = graph(model, role)
    if include_logits and ends_in_softmax(model):
        raise ValueError(
            f"The {role} {model.name!r} ends in a softmax and holds nested models with layers of "
            "one name: its logits cannot be tapped; build it without the final softmax.")
    paths = {name: g.resolve(name, role) for name in names if name not in (LOGITS, _OUTPUT)}
    inside = {}  # nested model's name -> {tap: its path in the nested model}
    for name, path in paths.items():
        top = g.nodes[path].top
        if path != top.name:
            inside.setdefault(top.name, {})[name] = path[len(top.name) + 1:]
    outputs = {}

    def operation_fn(layer):
        wanted = inside.get(layer.name)
        if wanted is None:
            def call(*args, **kwargs):
                output = layer(*args, **kwargs)
                outputs.update({n: output for n, path in paths.items() if path == layer.name})
                return output

            return call
        view = tap_model(layer, [*wanted.values(), _OUTPUT], include_logits=False, role=role)

        def call_view(*args, **kwargs):
            found = view(args[0])  # training: the outer view's, as for every layer in it
            outputs.update({n: found[path] for n, path in wanted.items()})
            return found[_OUTPUT]

        return call_view

    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in model.inputs]
    output = keras.tree.flatten(compat.run_through_graph(model, inputs, operation_fn))[0]
    if include_logits:
        outputs[LOGITS] = output
    if _OUTPUT in names:
        outputs[_OUTPUT] = output
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs,
                       name=f"{model.name}_taps")


def _operations(model):
    """`model`'s layers and, recursively, those of the models among them."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _operations(layer)


def layers_up_to(model, names, role="model"):
    """The layers of `model` itself (`model.layers`; a nested model is one
    of them) that compute the taps `names`."""
    view = tap_model(model, names, include_logits=False, role=role)
    needed = {id(layer) for layer in _operations(view)}
    return list({id(node.top): node.top for node in graph(model, role).nodes.values()
                 if id(node.layer) in needed}.values())


def top_level_layer(model, name, role="model"):
    """The layer of `model` itself that holds the layer `name` (itself, or
    the nested model it is in)."""
    g = graph(model, role)
    return g.nodes[g.resolve(name, role)].top


def output_shape(model, name, role="model"):
    """Static output shape of the layer `name` of `model` (or of the input
    `input_key(name)`)."""
    return tuple(graph(model, role).tensor(name, role).shape)


def tap_shape(model, name, role="model"):
    """Static shape of a tap (`LOGITS`: the model's output)."""
    if name == LOGITS:
        return tuple(graph(model).output.shape) if is_functional(model) else (None, None)
    return output_shape(model, name, role)


def check_outputs_logits(networks, x, examples=8):
    """Runs each network that is not functional once on the first examples
    of `x`: builds it if it is not built yet, and refuses one that returns
    probabilities (a functional network's softmax is found in its graph and
    tapped before; a subclassed one's cannot be).

    Args:
        networks: `{role: keras.Model}`.
        x: the training inputs: an array, or a `tf.data.Dataset` or
            `keras.utils.PyDataset` of `(x, ...)` batches (other sources,
            e.g. generators, are not read: nothing is checked).
        examples: how many examples to run.

    Returns:
        whether a network was built here (its variables are new).

    Raises:
        ValueError: for a network whose outputs are non-negative rows that
            sum to 1.
    """
    todo = {role: m for role, m in networks.items() if not is_functional(m)}
    batch = _first_examples(x, examples) if todo else None
    if batch is None:
        return False
    built = False
    for role, model in todo.items():
        built = built or not model.built
        out = ops.convert_to_numpy(model(batch, training=False)).astype("float64")
        if out.ndim == 2 and out.shape[-1] > 1 and out.min() >= 0 and np.allclose(out.sum(-1), 1.0, atol=1e-3):
            raise ValueError(
                f"The {role} {model.name!r} returns probabilities (its outputs are non-negative "
                "and sum to 1 per example); distillation needs logits: build it with "
                "classifier_activation=None (keras.applications) or drop its final softmax."
            )
    return built


def _first_examples(x, n):
    if isinstance(x, dict) or x is None:
        return None
    if hasattr(x, "take") and hasattr(x, "element_spec"):  # a tf.data.Dataset
        x = next(x.take(1).as_numpy_iterator(), None)
    elif isinstance(x, keras.utils.PyDataset):
        x = x[0]
    if isinstance(x, (tuple, list)):
        x = x[0] if x else None
    return x[:n] if hasattr(x, "shape") and len(x.shape) else None


class Views:
    """Cache of tap views, not tracked by Keras (the views share the
    networks' layers, which are tracked already)."""

    def __init__(self):
        self._cache = {}

    def run(self, model, names, inputs, training, role):
        """`{tap: tensor}` of one forward pass of `model` on `inputs`.

        A subclassed model can only give its output (`LOGITS`).
        """
        names = tuple(dict.fromkeys(names))
        if not is_functional(model):
            if names != (LOGITS,):
                check_functional(model, role)
            return {LOGITS: model(inputs, training=training)}
        key = (id(model), names)
        if key not in self._cache:
            self._cache[key] = tap_model(model, names, include_logits=False, role=role)
        return self._cache[key](inputs, training=training)
