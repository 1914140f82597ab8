"""Every private Keras (and tf.distribute) internal keras_fsp relies on, in one
place, each with the reason it is needed.

`tests/test_compat.py` checks each of them against the installed Keras, so a
release that changes one fails there, by name, rather than somewhere inside a
training step. setup.py pins the Keras minor version these were checked on.
"""

import sys
import weakref

import keras

#: The Keras versions whose internals this module was checked against.
TESTED_KERAS = ("3.15",)


def consumers(layer):
    """The operations that take `layer`'s output as input (in any model).

    Why: finding where a residual branch starts (a map used twice) and which
    kernels feed only batch normalisation needs the graph's edges, which
    Keras keeps in the private `_outbound_nodes`.
    """
    return [node.operation for node in getattr(layer, "_outbound_nodes", [])]


def is_graph_model(layer):
    """Whether `layer` is a functional model whose `call` runs its graph
    (Keras' own `Functional.call`, not overridden).

    Why: `keras_fsp.taps` traces through nested functional models (a keras-hub
    backbone in its classifier); only the private `Functional` class tells
    them from subclassed models, and a subclass overriding `call` may compute
    something else than its graph.
    """
    from keras.src.models.functional import Functional

    return isinstance(layer, Functional) and type(layer).call is Functional.call


def run_through_graph(model, inputs, operation_fn):
    """Runs a functional `model`'s graph on `inputs`, calling
    `operation_fn(layer)(*args, **kwargs)` at each node; returns its outputs.

    Why: tracing an outer model through a nested one's graph, so that one
    forward pass can tap the nested model's layers, is what Keras'
    `Functional.call` does with the private `_run_through_graph`.
    """
    return model._run_through_graph(inputs, operation_fn=operation_fn)


def sublayers(layer):
    """`layer` and every layer it holds, recursively.

    Why: finding the attention inside an opaque transformer block (a
    keras-hub `TransformerEncoder` is one layer of its backbone's graph)
    needs the layers it tracks, which Keras lists only with the private
    `_flatten_layers`. (An op of a functional graph, `keras.ops.ones_like`
    on a symbolic tensor, holds none.)
    """
    if not isinstance(layer, keras.layers.Layer):
        return [layer]
    return list(layer._flatten_layers(include_self=True, recursive=True))


def stacked_sublayers(layer):
    """The sublayers that `layer` applies one after another, each to the
    previous one's output, when it is known to be such a stack; else None.

    Why: keras-hub's `ViTEncoder` is one opaque layer of its backbone's
    graph holding every transformer block, so its blocks cannot be tapped.
    Its `call` is `dropout`, each of `encoder_layers`, then `layer_norm`
    (keras-hub 0.32); tracing that stack instead of the layer taps each
    block with the same weights and the same result.
    """
    # A ViTEncoder exists only once keras-hub is imported: never import it here.
    vit_layers = sys.modules.get("keras_hub.src.models.vit.vit_layers")
    if vit_layers is None or type(layer) is not vit_layers.ViTEncoder:
        return None
    return [layer.dropout, *layer.encoder_layers[:layer.num_layers], layer.layer_norm]


def frozen_function(concrete_function):
    """`concrete_function` (TensorFlow) with its variables and captured
    tensors made constants of its graph.

    Why: the ONNX export converts a frozen graph. tf2onnx's own
    `from_function` (which Keras' exporter uses) lists every captured
    tensor that is not a variable as one more model input (keras-hub's ViT
    captures its constant position ids); freezing with TensorFlow's private
    `convert_variables_to_constants_v2` first leaves only the real inputs.
    Keras' `patch_tf2onnx` (private) makes tf2onnx work on numpy 2.
    """
    from keras.src.export.tf2onnx_lib import patch_tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    patch_tf2onnx()
    return convert_variables_to_constants_v2(concrete_function, lower_control_flow=False,
                                             aggressive_inlining=True)


def regularization_loss(model):
    """The sum of `model.losses` (weight decay), scaled the way Keras scales
    them for the active distribution strategy.

    Why: a model that overrides `compute_loss` must add the regularization
    itself; Keras' own `compute_loss` does it through the private
    `_aggregate_additional_loss`, which divides by the replica count under
    `tf.distribute`.
    """
    losses = [model._aggregate_additional_loss(loss) for loss in model.losses]
    return keras.ops.sum(keras.ops.stack(losses)) if losses else 0.0


def compiled_metrics(model):
    """The container of the metrics given to `compile` (None before).

    Why: a stage that computes no logits (FSP, hint) has nothing to score, so
    the distiller hides these metrics from `model.metrics` in such stages.
    """
    return getattr(model, "_compile_metrics", None)


def optimizer_variable_count(optimizer):
    """How many trainable variables `optimizer` was built for.

    Why: a stage reusing an optimizer built for another set of variables
    fails deep inside `apply`; checking the count first gives a clear error.
    """
    return len(optimizer._trainable_variables)


def learning_rate(optimizer):
    """The optimizer's learning rate as given: a float variable or a
    `LearningRateSchedule` (the public `learning_rate` evaluates schedules)."""
    return optimizer._learning_rate


def flush_jax_state(model):
    """On JAX inside `fit`: writes the last step's state back into the
    model's variables and drops it, so that a stage switch changes the
    variable lists safely.

    Why: Keras' JAX `fit` keeps the state outside the variables between
    steps (`_jax_state`); if the new stage's first step fails, `fit`'s
    cleanup assigns that stale state to the new stage's variables and the
    shape error it raises hides the real one.
    """
    if getattr(model, "_jax_state", None) is not None:
        model.jax_state_sync()
        model._jax_state = None


def distribution_strategy(model):
    """The `tf.distribute` strategy the model was created under, or None."""
    return getattr(model, "_distribute_strategy", None)


def is_multi_worker(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy with several workers.

    Why: Keras 3 `fit` fails for any model with several workers
    (keras-team/keras#20585, tensorflow/tensorflow#72388); the distiller
    works around it only then.
    """
    if strategy is None or keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.extended._in_multi_worker_mode()
    )


def reducible_logs(model, logs):
    """A train or test step's `logs`, with one axis each under several
    `MultiWorkerMirroredStrategy` workers.

    Why: with several workers Keras reduces each step's logs with
    `strategy.reduce("MEAN", v, axis=0)`, which fails on scalars ("Invalid
    reduction dimension 0"); one axis, which the reduction removes, works
    around it (tensorflow/tensorflow#72388).
    """
    if not is_multi_worker(distribution_strategy(model)):
        return logs
    return {k: keras.ops.reshape(v, (1,)) for k, v in logs.items()}


def num_replicas():
    """Replicas of the enclosing `tf.distribute` strategy (1 elsewhere)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def _first_replica_batch(strategy, iterator):
    for _, _, it in iterator:
        return keras.tree.map_structure(
            lambda v: strategy.experimental_local_results(v)[0], next(it)
        )
    return None


class MultiWorkerBuild:
    """A `keras.Model` mixin: with several `MultiWorkerMirroredStrategy`
    workers, the model is built from this worker's first replica's share of
    the first batch.

    Why: Keras' TensorFlow trainer builds from the first distributed batch
    with `strategy.reduce("MEAN", ...)`, which fails on per-replica values
    with several workers (keras-team/keras#20585); this overrides the private
    `_maybe_symbolic_build` to build from one replica's batch instead.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = distribution_strategy(self)
        if iterator is not None and is_multi_worker(strategy):
            data_batch = _first_replica_batch(strategy, iterator)
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


def reattach_state_on_error(model, train_function):
    """Wraps a JAX train function `(state, data) -> (logs, state)` so that
    when it raises, the state it was given goes back into the model's
    variables; elsewhere returns it as it is.

    Why: Keras' JAX `fit` takes the values out of the model's variables
    (the private `_purge_model_variables` sets each `_value` to None) before
    the first step of an epoch and puts the step's results back afterwards.
    A step that raises (a shape error found while tracing) leaves them None:
    the teacher's and the student's `get_weights()` then fail.
    """
    if (keras.backend.backend() != "jax" or train_function is None
            or getattr(train_function, "reattaches_state", False)):
        return train_function

    def guarded(state, data):
        try:
            return train_function(state, data)
        except BaseException:
            groups = (model.trainable_variables, model.non_trainable_variables,
                      model.optimizer.variables, model.metrics_variables)
            for variables, values in zip(groups, state):
                for variable, value in zip(variables, values):
                    if variable._value is None:
                        variable._value = value
            raise

    guarded.reattaches_state = True
    return guarded


def pass_inputs_unconverted(layer):
    """Makes `layer` hand its inputs to `call` as given (no cast to its dtype
    policy), as a training step does.

    Why: a wrapper model around the teacher (teacher caching) must not cast
    the inputs before the teacher's own layers see them.
    """
    layer._convert_input_args = False


def without_fused_attention(layer):
    """Makes a `keras.layers.MultiHeadAttention` compute its attention with
    plain ops, never a fused (cuDNN flash) kernel; returns the layer.

    Why: a ViT-6x256 trained in `mixed_bfloat16` on an H200 (JAX) went from
    a finite, falling loss to NaN within one epoch, twice, with the fused
    kernel that Keras picks by default for bfloat16 on a GPU, and trained to
    the end twice without it. The layer's `flash_attention=False` does not
    turn the kernel off (`False or None` is None in its constructor), and
    the global switch would change the user's other layers. The setting is
    not saved: a ViT loaded from a `.keras` file picks the kernel again.
    """
    layer._flash_attention = False
    return layer


def keep_unsaved_settings(layer, copy):
    """`copy` (a layer made from `layer`'s config) with the settings of
    `layer` that its config does not hold; returns `copy`.

    Why: a copy of a network layer by layer (`keras_fsp.teacher_precision`)
    should compute as the original, but `without_fused_attention` sets the
    private `_flash_attention`, which no config saves.
    """
    if getattr(layer, "_flash_attention", None) is False and hasattr(copy, "_flash_attention"):
        without_fused_attention(copy)
    return copy


def state_sharding_spec(model):
    """The shardings of a JAX model's training state under a Keras
    distribution (what its compiled step must return).

    Why: a multi-step train function (`keras_fsp.jax_steps`) compiles its own
    step and must give it the same output shardings as Keras' own, which
    Keras computes in the private `_get_state_sharding_spec`.
    """
    return model._get_state_sharding_spec()


def symbolic_build(model, data_batch):
    """Builds the model, its compiled metrics and loss from one real batch
    (what Keras' `fit` does from the first batch of its iterator).

    Why: when a multi-step train function (`keras_fsp.jax_steps`) feeds
    Keras' loop block numbers instead of batches, the model must be built
    from a real batch beforehand, through the private `_symbolic_build`.
    """
    model._symbolic_build(data_batch=data_batch)


def weights_h5_bytes(model):
    """The bytes of the `.weights.h5` file `model.save_weights` would write.

    Why: `save_weights` only writes to a path, through h5py; on a full disk
    h5py fails inside HDF5 and the interpreter can segfault later, when the
    broken file object is freed. Keras' own writer into memory (the private
    `H5IOStore` over a `BytesIO`, as `.keras` archives use) lets the caller
    check the free space first and write the bytes with plain Python I/O.

    Keras' private `_save_state` finds what to write by walking every
    attribute of every layer (`dir` and `getattr`). Its result, which
    object saves itself under which group, is kept per model and replayed
    while the model's, its optimizer's and its metrics' variables are the
    same objects: each object's own `save_own_variables` into the same
    groups, in the same order, so the same file.
    """
    import io

    from keras.src.saving import saving_lib

    variables = _saved_variables(model)
    plan = _WRITE_PLANS.get(model)
    if (plan is None or not _same_objects(plan[0], variables)
            or (plan[1] is not None and any(saveable() is None for saveable, _, _ in plan[1]))):
        plan = (variables, _write_plan(model))
        _WRITE_PLANS[model] = plan
    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    try:
        if plan[1] is None:
            saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="",
                                   visited_saveables=set())
        else:
            for saveable, path, metadata in plan[1]:
                saveable().save_own_variables(store.make(path, metadata=metadata))
    finally:
        store.close()
    return buffer.getvalue()


# model -> (the variables its plan was made for, the plan: `(weak reference
# to the saveable, path, metadata)` per `make` call of Keras' walk, or None
# where it was not found). Weak, so that the plan does not keep its model.
_WRITE_PLANS = weakref.WeakKeyDictionary()


def _saved_variables(model):
    optimizer = getattr(model, "optimizer", None)
    return [*model.variables, *getattr(model, "metrics_variables", ()),
            *(optimizer.variables if optimizer is not None else ())]


def _same_objects(a, b):
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _write_plan(model):
    """Keras' walk of `model`, as `(weak reference to the saveable, path,
    metadata)` per group it makes, or None if the walk did not go as
    expected."""
    from keras.src.saving import saving_lib

    class Recorder(saving_lib.H5IOStore):  # `_save_state` accepts only its stores
        def __init__(self):  # no file
            self.mode, self.calls = "w", []

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            # The caller is `_save_state(saveable, ...)`, about to call
            # `saveable.save_own_variables(<this store>)`.
            saveable = sys._getframe(1).f_locals.get("saveable")
            self.calls.append((saveable, path, metadata))
            return {}  # what it writes is not kept

    recorder = Recorder()
    try:
        saving_lib._save_state(model, weights_store=recorder, assets_store=None, inner_path="",
                               visited_saveables=set())
    except Exception:  # a saveable that reads its store back: walk at every save
        return None
    if any(not hasattr(saveable, "save_own_variables") for saveable, _, _ in recorder.calls):
        return None
    return [(weakref.ref(saveable), path, metadata) for saveable, path, metadata in recorder.calls]
