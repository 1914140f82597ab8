"""Batch normalisation with statistics per replica, for data parallelism on
JAX.

Under `keras.distribution.DataParallel` the batch is sharded over the
devices, and a `BatchNormalization` layer's mean and variance over the batch
become an all-reduce across them (synchronised batch norm): one small
all-reduce per layer, forward and backward, each on the critical path. A
ResNet-8 step has 32 of them and one for all the weight gradients. What
`tf.distribute` and PyTorch's DistributedDataParallel do by default is to
normalise each replica's examples with their own statistics.

`ReplicaBatchNormalization(groups=n)` does that without a `shard_map`: in
training it splits the batch into `n` equal consecutive groups (the shards
of `n` devices) and normalises each group with its own statistics, so the
partitioner finds nothing to reduce across devices. The moving statistics
take the mean of the groups' statistics. With `groups=1`, in inference and
for a batch that `groups` does not divide (a partial last batch), it is
`BatchNormalization`. `per_replica_batch_norm(model)` returns a copy of a
functional or Sequential model with every batch norm replaced.

The statistics come from `batch / groups` examples instead of `batch`, so
training differs numerically from synchronised batch norm (as it does
between one and several replicas of `tf.distribute`).
"""

import keras
from keras import ops

from keras_fsp import compat
from keras_fsp.cloning import rebuilt_copy


@keras.saving.register_keras_serializable("keras_fsp")
class ReplicaBatchNormalization(keras.layers.BatchNormalization):
    """`BatchNormalization` whose training statistics are computed over each
    of `groups` equal consecutive parts of the batch (the devices' shards
    under `DataParallel`)."""

    def __init__(self, groups=1, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"ReplicaBatchNormalization: groups must be a positive integer "
                             f"(the number of replicas); got {groups!r}.")
        if self.renorm:
            raise ValueError("ReplicaBatchNormalization does not support renorm=True: use "
                             "BatchNormalization for that layer.")
        self.groups = groups

    def build(self, input_shape):
        super().build(input_shape)
        if self.groups > 1 and self.axis not in (-1, len(input_shape) - 1):
            raise ValueError(f"ReplicaBatchNormalization normalises the last axis (channels "
                             f"last); this layer has axis={self.axis} for inputs of shape "
                             f"{tuple(input_shape)}.")

    def call(self, inputs, training=None, mask=None):
        batch = inputs.shape[0]
        if (self.groups == 1 or not (training and self.trainable) or mask is not None
                or batch is None or batch % self.groups):
            return super().call(inputs, training=training, mask=mask)
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        grouped = ops.reshape(x, (self.groups, batch // self.groups) + tuple(x.shape[1:]))
        axes = tuple(range(1, len(grouped.shape) - 1))
        mean, variance = ops.moments(grouped, axes=axes, keepdims=True)
        outputs = (grouped - mean) * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            outputs = outputs * ops.cast(self.gamma, x.dtype)
        if self.center:
            outputs = outputs + ops.cast(self.beta, x.dtype)
        channels = (-1,)
        for moving, value in ((self.moving_mean, mean), (self.moving_variance, variance)):
            value = ops.reshape(ops.mean(value, axis=0), channels)
            moving.assign(ops.cast(moving, x.dtype) * self.momentum + value * (1.0 - self.momentum))
        return ops.cast(ops.reshape(outputs, ops.shape(x)), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}


def replica_count():
    """Devices that the active `keras.distribution` splits the batch over
    (1 without one)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if batch_axis in mesh.axis_names:
        return mesh.shape[mesh.axis_names.index(batch_axis)]
    return len(mesh.devices.flatten())


def per_replica_batch_norm(model, groups=None):
    """A copy of `model` (functional or Sequential, nested models included)
    with its weights, every `BatchNormalization` replaced by a
    `ReplicaBatchNormalization(groups)`. `groups` defaults to the active
    `keras.distribution`'s number of batch shards; call it under that
    distribution, before building the distiller."""
    groups = replica_count() if groups is None else groups
    if not (isinstance(model, keras.Sequential) or compat.is_graph_model(model)):
        raise ValueError(f"per_replica_batch_norm copies functional and Sequential models; "
                         f"{type(model).__name__} is subclassed: construct its batch norms as "
                         f"keras_fsp.ReplicaBatchNormalization(groups={groups}) instead.")

    def clone(layer):
        config = layer.get_config()
        if type(layer) in (keras.layers.BatchNormalization, ReplicaBatchNormalization):
            config["groups"] = groups
            return ReplicaBatchNormalization.from_config(config)
        return layer.__class__.from_config(config)

    return rebuilt_copy(model, clone)
