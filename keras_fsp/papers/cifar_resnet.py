"""The CIFAR ResNets of He et al. (2016), 6n+2 layers, used by the FSP papers."""

import keras
from keras import layers

STAGE_WIDTHS = (16, 32, 64)


def cifar_resnet(
    depth,
    num_classes=10,
    input_shape=(32, 32, 3),
    weight_decay=1e-4,
    width_multiplier=1,
    name=None,
):
    """A 6n+2-layer CIFAR ResNet (depth 8, 14, 20, 26, 32, 56, 110, ...).

    Three sections of n basic blocks with 16, 32 and 64 channels (32x32,
    16x16 and 8x8 maps on CIFAR), MSRA initialisation, 1x1 convolution
    shortcuts where the shape changes, global average pooling and a dense
    layer that returns logits.

    Named taps (the same names for every depth, so teacher and student pair
    up by name): `"stem"` (after the first conv, BN, ReLU), `"stage1"`,
    `"stage2"`, `"stage3"` (section outputs) and `"stage{s}_block{b}"`
    (each residual block's output), `"logits"`.

    Args:
        depth: total number of weighted layers, 6n+2.
        num_classes: number of logits.
        input_shape: `(height, width, channels)` of the (normalised) images.
        weight_decay: L2 weight decay on the conv and dense kernels, coupled
            as in the paper's SGD (adds `weight_decay * w` to the gradient).
            0 disables it.
        width_multiplier: multiplies the 16/32/64 channel counts.
        name: model name; default `"resnet{depth}"`.

    Returns:
        a functional `keras.Model` mapping images to logits.

    Example:

    >>> model = cifar_resnet(8)
    >>> model.get_layer("stage3").output.shape
    (None, 8, 8, 64)
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"depth must be 6n+2 with n >= 1 (8, 14, 20, 26, 32, 56, 110, ...); "
            f"got {depth!r}."
        )
    blocks = (depth - 2) // 6
    reg = keras.regularizers.L2(weight_decay / 2) if weight_decay else None

    def conv(filters, kernel, strides, name):
        return layers.Conv2D(
            filters,
            kernel,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=reg,
            name=name,
        )

    def bn(name):
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)

    inputs = keras.Input(input_shape, name="images")
    x = conv(STAGE_WIDTHS[0] * width_multiplier, 3, 1, "stem_conv")(inputs)
    x = bn("stem_bn")(x)
    x = layers.ReLU(name="stem")(x)
    for stage, base in enumerate(STAGE_WIDTHS, start=1):
        filters = base * width_multiplier
        for block in range(1, blocks + 1):
            prefix = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            y = conv(filters, 3, strides, f"{prefix}_conv1")(x)
            y = bn(f"{prefix}_bn1")(y)
            y = layers.ReLU(name=f"{prefix}_relu1")(y)
            y = conv(filters, 3, 1, f"{prefix}_conv2")(y)
            y = bn(f"{prefix}_bn2")(y)
            shortcut = x
            if strides != 1 or x.shape[-1] != filters:
                shortcut = conv(filters, 1, strides, f"{prefix}_shortcut_conv")(x)
                shortcut = bn(f"{prefix}_shortcut_bn")(shortcut)
            x = layers.Add(name=f"{prefix}_add")([shortcut, y])
            x = layers.ReLU(name=prefix)(x)
        # A named section boundary, the same for every depth.
        x = layers.Identity(name=f"stage{stage}")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    logits = layers.Dense(
        num_classes,
        kernel_initializer="he_normal",
        kernel_regularizer=reg,
        name="logits",
    )(x)
    return keras.Model(inputs, logits, name=name or f"resnet{depth}")


def with_new_head(model, num_classes, name=None):
    """A `cifar_resnet`'s body (shared, up to its pooled features) under a
    fresh `num_classes`-way head with the same regularisation: for fine-tuning
    on another task."""
    features = model.get_layer("pool").output
    head = model.get_layer("logits")
    logits = keras.layers.Dense(num_classes, kernel_initializer="he_normal",
                                kernel_regularizer=head.kernel_regularizer,
                                name=f"logits_{num_classes}")(features)
    return keras.Model(model.input, logits, name=name or f"{model.name}_{num_classes}way")


def block_names(model):
    """Names of the residual-block outputs of a `cifar_resnet`, in order."""
    return [
        layer.name
        for layer in model.layers
        if layer.name.startswith("stage") and layer.name.count("_") == 1
        and "_block" in layer.name
    ]


def _blocks_per_section(model):
    names = block_names(model)
    return sum(1 for n in names if n.startswith("stage1_"))


def dense_taps(model, points_per_section):
    """Evenly spaced taps inside each section of a `cifar_resnet`, for dense FSP.

    Positions are counted in half blocks: a block's first ReLU
    (`"stage{s}_block{b}_relu1"`) is half-way through it, its output
    (`"stage{s}_block{b}"`) at its end. Point `j` of `P` in a section of `B`
    blocks sits at `j * B / P` blocks, so a ResNet-8 (B = 1) with P = 2 taps
    the middle and the end of its one block per section, and a ResNet-26
    (B = 4) with P = 2 the outputs of blocks 2 and 4: the same relative
    depths.

    Returns:
        `["stem", section 1's P taps, section 2's P taps, section 3's P taps]`.

    Raises:
        ValueError: if `j * B / P` is not a whole or half block.
    """
    blocks = _blocks_per_section(model)
    taps = ["stem"]
    for stage in (1, 2, 3):
        for j in range(1, points_per_section + 1):
            halves = 2 * j * blocks / points_per_section
            if halves != int(halves):
                raise ValueError(
                    f"{points_per_section} taps per section do not fall on whole "
                    f"or half blocks of {model.name!r} ({blocks} blocks per section)."
                )
            halves = int(halves)
            block = (halves + 1) // 2
            suffix = "" if halves % 2 == 0 else "_relu1"
            taps.append(f"stage{stage}_block{block}{suffix}")
    return taps
