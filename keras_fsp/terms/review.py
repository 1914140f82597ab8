"""ReviewKD (Chen, Liu, Zhao & Jia, CVPR 2021, "Distilling Knowledge via
Knowledge Review"): the student's features of every level are fused from the
deepest level to the shallowest by attention-based fusion (ABF) modules, and
each fused map is compared with the teacher's map of the same level by the
hierarchical context loss (HCL). The maths, the ABF module and the term.

What follows is read from the authors' code (dvlab-research/ReviewKD,
`CIFAR-100/model/reviewkd.py` and `CIFAR-100/train.py`) and checked against
mdistiller's (megvii-research/mdistiller, `mdistiller/distillers/ReviewKD.py`,
`mdistiller/engine/cfg.py`, `configs/cifar100/reviewkd.yaml`):

- Levels: the student's stage outputs (after their ReLU, `feats`) and its
  pooled features as a 1x1 map, against the teacher's stage outputs
  *before* their last ReLU (`preact_feats[1:]`) and its pooled features;
  the stem is not a level (the CIFAR ResNets: 32x32, 16x16, 8x8 and 1x1,
  `shapes = [1, 8, 16, 32]`). The fused maps end in a batch norm, unbounded
  below, like the teacher's pre-activations.
- ABF, one per level, from the deepest: a 1x1 convolution (no bias) to
  `mid` channels + batch norm; at every level but the deepest, the deeper
  level's output (`mid` channels) is upsampled to this level's size by
  nearest-neighbour interpolation, a 1x1 convolution (with bias) of the two
  concatenated gives two attention maps through a sigmoid, and the fusion
  is `x * a_0 + residual * a_1`; that fusion (resized, nearest, to the
  teacher's size where the two differ, `out_shapes`) is the residual handed
  to the next shallower level, and a 3x3 convolution (padding 1, no bias) +
  batch norm takes it to the teacher's channel count: the level's output.
  `mid = min(512, channels of the student's deepest level)` (64 for the
  CIFAR ResNets, 256 for ResNet-8x4). The 1x1 and 3x3 kernels start from
  `kaiming_uniform_(a=1)` (uniform, limit `sqrt(3 / fan_in)`), the
  attention convolution from PyTorch's default (limit `1 / sqrt(fan_in)`,
  its bias too). The modules train in training mode: their batch norms
  normalise with the batch's statistics.
- HCL, per level: the mean squared difference over the whole map, plus the
  mean squared difference of both maps average-pooled adaptively to 4x4,
  2x2 and 1x1 weighted 1/2, 1/4, 1/8 (a pooling size is skipped when not
  smaller than the map's height, and the next one takes its weight), the
  sum divided by the weights' sum (1 + 1/2 + 1/4 + 1/8 for maps of 8x8 and
  larger, 1 for the 1x1 level); the levels' values are summed.
- Weights: cross-entropy 1.0 (`--ce-loss-weight`, `CE_WEIGHT`); ReviewKD
  (`--kd-loss-weight`, `REVIEWKD_WEIGHT`) 1.0 by default and for ResNet-110
  -> ResNet-32, 0.6 for ResNet-56 -> ResNet-20, 5.0 for the pairs of the
  WRN-40-2 and ResNet-32x4 teachers (`script/reviewKD.sh`; mdistiller's
  `configs/cifar100/reviewkd.yaml`, ResNet-32x4 -> ResNet-8x4, too) but 8.0
  for ShuffleNetV2; warmed up linearly over the first 20 of 240 epochs
  (`--kd-warm-up 20`, `WARMUP_EPOCHS`: `min(epoch / 20, 1)`; mdistiller
  counts epochs from 1, so its first epoch weighs 1/20, the authors' from
  0, whose first weighs 0). The authors' `--use-kl` adds Hinton's KD at
  T 4, weight 1.
- Training: SGD momentum 0.9 for 240 epochs, the learning rate divided by
  10 at epochs 150, 180 and 210: the authors' 0.1 at batch 128 (nesterov;
  0.02 for ShuffleNet and MobileNet students), mdistiller's 0.05 at batch
  64; weight decay 5e-4 on every parameter, the ABF modules' too.

keras_fsp's recipe (`keras_fsp.papers.recipes.review_kd`) keeps the
student's usual schedule and counts the 20 warm-up epochs in its own epochs,
as its other one-stage methods and DKD's warm-up do, and decays the ABF
kernels as its CIFAR ResNets decay theirs (`weight_decay`, 1e-4).
"""

import keras
import numpy as np
from keras import ops

from keras_fsp import pairing, taps
from keras_fsp.terms.base import DistillationTerm, announce, register_term

#: The sizes HCL pools each level to (the authors' `[4, 2, 1]`).
HCL_SIZES = (4, 2, 1)


def as_map(features):
    """Pooled features `(batch, channels)` as a 1x1 map; maps as they are."""
    return features[:, None, None, :] if len(features.shape) == 2 else features


def nearest_resize(x, size):
    """`x` `(batch, h, w, c)` resized to `size` by nearest neighbour, as
    PyTorch's `interpolate(mode="nearest")`: output row `i` is input row
    `floor(i * h / size[0])` (an integer upsampling repeats each row)."""
    for axis, n in ((1, size[0]), (2, size[1])):
        length = x.shape[axis]
        if length != n:
            index = np.minimum(np.floor(np.arange(n) * (length / n)), length - 1).astype("int32")
            x = ops.take(x, index, axis=axis)
    return x


def _adaptive_average(length, size):
    """`(size, length)` matrix averaging the bins of PyTorch's adaptive
    average pooling: bin `i` spans `floor(i * length / size)` to
    `ceil((i + 1) * length / size)`."""
    m = np.zeros((size, length), "float32")
    for i in range(size):
        start, end = (i * length) // size, -((-(i + 1) * length) // size)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_average_pool(x, size):
    """`x` `(batch, h, w, c)` average-pooled adaptively to `(size, size)`
    (PyTorch's `adaptive_avg_pool2d`), for any `h` and `w`."""
    rows = ops.convert_to_tensor(_adaptive_average(x.shape[1], size), x.dtype)
    cols = ops.convert_to_tensor(_adaptive_average(x.shape[2], size), x.dtype)
    return ops.einsum("jw,biwc->bijc", cols, ops.einsum("ih,bhwc->biwc", rows, x))


def hierarchical_context_loss(student, teacher, sizes=HCL_SIZES):
    """HCL per example, `(batch,)`: over the levels (lists of maps `(batch,
    h, w, c)`, the two of a level of one shape), the mean squared difference
    plus those of the maps adaptively average-pooled to each of `sizes`
    smaller than `h`, weighted 1/2, 1/4, ... in turn, divided by the sum of
    the weights (1 for the whole map). Summed over the levels; the
    distiller's mean over the batch is then the authors' `mse_loss`."""
    total = 0.0
    for s, t in zip(student, teacher):
        # Pooling is linear: pooling the difference once is pooling both.
        d = ops.cast(s, "float32") - ops.cast(t, "float32")
        loss, weight, weights = ops.mean(ops.square(d), axis=(1, 2, 3)), 1.0, 1.0
        for size in sizes:
            if size >= d.shape[1]:
                continue
            weight /= 2.0
            pooled = adaptive_average_pool(d, size)
            loss = loss + weight * ops.mean(ops.square(pooled), axis=(1, 2, 3))
            weights += weight
        total = total + loss / weights
    return total


def _batch_norm(name):
    # PyTorch's BatchNorm2d: momentum 0.1 of the new statistics, epsilon 1e-5.
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def _kaiming_uniform_a1():
    # PyTorch's kaiming_uniform_(a=1): gain 1, limit sqrt(3 / fan_in).
    return keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")


class AttentionBasedFusion(keras.layers.Layer):
    """One ABF module (see the module's docstring): a student map `(batch,
    h, w, c_in)` and the deeper level's fusion -> this level's output
    `(batch, H, W, out_channels)` (`(H, W)`, the teacher's size) and its
    fusion `(batch, H, W, mid_channels)`.

    Args:
        mid_channels: the width of the fusions.
        out_channels: the teacher's channel count at this level.
        out_size: `(H, W)`, the teacher's map size at this level.
        fuse: whether a deeper level's fusion comes in (all but the deepest).
        weight_decay: L2 decay of the convolutions' kernels (coupled as the
            CIFAR ResNets', `weight_decay / 2 * ||w||^2`); 0 for none.
    """

    def __init__(self, mid_channels, out_channels, out_size, fuse, weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        self.out_size = tuple(out_size)
        reg = keras.regularizers.L2(weight_decay / 2) if weight_decay else None
        self.conv1 = keras.layers.Conv2D(mid_channels, 1, use_bias=False, kernel_regularizer=reg,
                                         kernel_initializer=_kaiming_uniform_a1(),
                                         name=f"{self.name}_conv1")
        self.bn1 = _batch_norm(f"{self.name}_bn1")
        self.attention = None
        if fuse:
            fan_in = 2 * mid_channels
            self.attention = keras.layers.Conv2D(
                2, 1, activation="sigmoid", kernel_regularizer=reg,
                kernel_initializer=keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"),
                bias_initializer=keras.initializers.RandomUniform(-fan_in ** -0.5, fan_in ** -0.5),
                name=f"{self.name}_attention")
        self.conv2 = keras.layers.Conv2D(out_channels, 3, padding="same", use_bias=False,
                                         kernel_regularizer=reg,
                                         kernel_initializer=_kaiming_uniform_a1(),
                                         name=f"{self.name}_conv2")
        self.bn2 = _batch_norm(f"{self.name}_bn2")

    def build(self, input_shape):
        mid, (h, w) = self.conv1.filters, input_shape[1:3]
        self.conv1.build(input_shape)
        self.bn1.build((None, h, w, mid))
        if self.attention is not None:
            self.attention.build((None, h, w, 2 * mid))
        self.conv2.build((None, *self.out_size, mid))
        self.bn2.build((None, *self.out_size, self.conv2.filters))
        self.built = True

    def call(self, x, residual=None, training=None):
        x = self.bn1(self.conv1(x), training=training)
        if self.attention is not None:
            residual = nearest_resize(residual, x.shape[1:3])
            a = self.attention(ops.concatenate([x, residual], axis=-1))
            x = x * a[..., :1] + residual * a[..., 1:]
        x = nearest_resize(x, self.out_size)
        return self.bn2(self.conv2(x), training=training), x


@register_term("reviewkd")
class ReviewKDTerm(DistillationTerm):
    """`beta * hierarchical_context_loss` between the teacher's maps and the
    student's maps fused by ABF modules (`AttentionBasedFusion`, one per
    level, owned by the term and trained with it), one value per example;
    the labels are the stage's `"task"` term.

    The ABF modules are built when the distiller configures the term, so
    they are in the distiller's weights, saved files and checkpoints from
    the start. They run in training mode (batch statistics; their moving
    statistics are kept but never used). The teacher's target is its raw
    taps, so a teacher cache holds them and the modules still train.

    Args:
        pairs: `[(teacher layer, student layer), ...]`, from the shallowest
            level to the deepest (each a map `(batch, h, w, c)` or pooled
            features `(batch, c)`, a 1x1 map; the teacher's size and
            channels may differ from the student's), or `"auto"`: the
            section ends the two networks share
            (`keras_fsp.pairing.matched_section_ends`), the teacher's before
            their last activation (`preactivation`), then (`pooled`) both
            networks' penultimate features: the authors' levels. Resolved
            when the distiller configures the term, then logged once per
            process.
        beta: the term's own weight (the authors' `--kd-loss-weight`).
        pooled: with `"auto"`, whether the penultimate features are the
            deepest level.
        preactivation: with `"auto"`, whether the teacher's maps are taken
            before their last activation (`keras_fsp.pairing.preactivation`).
        mid_channels: the fusions' width; `None`: `min(max_mid_channels,
            channels of the student's deepest level)`.
        max_mid_channels: see `mid_channels` (512).
        sizes: HCL's pooling sizes (`HCL_SIZES`).
        weight_decay: L2 decay of the ABF kernels (1e-4: keras_fsp's CIFAR
            ResNets'; the authors decay everything at 5e-4); 0 for none.
        name: the term's name in stages (default `"reviewkd"`).
    """

    def __init__(self, pairs="auto", beta=1.0, pooled=True, preactivation=True, mid_channels=None,
                 max_mid_channels=512, sizes=HCL_SIZES, weight_decay=1e-4, name="reviewkd",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if isinstance(pairs, str) and pairs != "auto":
            raise ValueError(
                f"pairs must be 'auto' or a list of (teacher, student) layers; got {pairs!r}.")
        self.pairs = pairs if isinstance(pairs, str) else [tuple(p) for p in pairs]
        self.beta, self.pooled, self.preactivation = float(beta), bool(pooled), bool(preactivation)
        self.mid_channels = None if mid_channels is None else int(mid_channels)
        self.max_mid_channels = int(max_mid_channels)
        self.sizes = tuple(int(s) for s in sizes)
        self.weight_decay = float(weight_decay)
        self.fusions = []

    def _auto_pairs(self, teacher, student):
        pairs = pairing.matched_section_ends(teacher, student)
        if self.preactivation:
            pairs = [(pairing.preactivation(teacher, t, "teacher"), s) for t, s in pairs]
        if self.pooled:
            pairs.append((pairing.penultimate(teacher, "teacher"),
                          pairing.penultimate(student, "student")))
        return pairs

    def _map_shape(self, model, name, role):
        shape = taps.output_shape(model, name, role)
        if len(shape) not in (2, 4) or None in shape[1:]:
            raise ValueError(
                f"ReviewKD fuses feature maps (batch, height, width, channels) or pooled features "
                f"(batch, channels) of fixed size, but the {role}'s layer {name!r} gives {shape}. "
                "Name other layers: ReviewKDTerm(pairs=[(teacher_layer, student_layer), ...])."
            )
        return (shape[0], 1, 1, shape[1]) if len(shape) == 2 else tuple(shape)

    def configure(self, teacher, student):
        """Resolves `"auto"` pairs, checks the taps and builds one ABF
        module per level (the deepest without fusion)."""
        auto = self.pairs == "auto"
        if auto:
            self.pairs = self._auto_pairs(teacher, student)
        if not self.pairs or any(len(p) != 2 for p in self.pairs):
            raise ValueError(
                f"ReviewKD needs (teacher_layer, student_layer) pairs; got {self.pairs!r}.")
        self.teacher_taps = tuple(dict.fromkeys(t for t, _ in self.pairs))
        self.student_taps = tuple(dict.fromkeys(s for _, s in self.pairs))
        t_shapes = [self._map_shape(teacher, t, "teacher") for t, _ in self.pairs]
        s_shapes = [self._map_shape(student, s, "student") for _, s in self.pairs]
        mid = self.mid_channels or min(self.max_mid_channels, s_shapes[-1][-1])
        self.fusions = []
        for i, (t_shape, s_shape) in enumerate(zip(t_shapes, s_shapes)):
            fusion = AttentionBasedFusion(mid, t_shape[-1], t_shape[1:3],
                                          fuse=i < len(self.pairs) - 1,
                                          weight_decay=self.weight_decay,
                                          name=f"{self.name}_abf{i + 1}")
            fusion.build(s_shape)
            self.fusions.append(fusion)
        if auto:
            announce(f"keras_fsp: {teacher.name} -> {student.name}, {self.describe()}")

    def fuse(self, features, training=True):
        """The ABF outputs of the student's maps `features` (one per level,
        shallowest first), deepest first in the computation, shallowest
        first in the returned list."""
        outputs, residual = [], None
        for x, fusion in reversed(list(zip(features, self.fusions))):
            out, residual = fusion(as_map(x), residual, training=training)
            outputs.insert(0, out)
        return outputs

    def compute(self, student, teacher, y_true):
        fused = self.fuse([student[s] for _, s in self.pairs])
        targets = [as_map(teacher[t]) for t, _ in self.pairs]
        return self.beta * hierarchical_context_loss(fused, targets, self.sizes)

    def describe(self):
        if self.pairs == "auto":
            return f"{self.name}: pairs 'auto' (not resolved yet)"
        mid = self.fusions[0].conv1.filters if self.fusions else "?"
        return (f"{self.name}: levels (teacher, student) {self.pairs}, fused at {mid} channels, "
                f"beta {self.beta:g}")

    def get_config(self):
        return {**super().get_config(), "pairs": self.pairs, "beta": self.beta,
                "pooled": self.pooled, "preactivation": self.preactivation,
                "mid_channels": self.mid_channels, "max_mid_channels": self.max_mid_channels,
                "sizes": list(self.sizes), "weight_decay": self.weight_decay}
