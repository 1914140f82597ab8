"""Vision Transformers for small images (Dosovitskiy et al., ICLR 2021).

Patches of `patch_size` pixels are embedded by a strided convolution, their
`(height / patch, width / patch)` grid is flattened row by row into tokens,
a learned position embedding (`PositionEmbedding`) is added, and `depth`
pre-norm encoder blocks (multi-head self-attention, then a GELU MLP, each
as a residual) follow; a final layer normalisation, the mean over the
tokens (no class token: every token is a position of the image, which FSP
matrices and attention maps over tokens read) and a dense layer give the
logits. A saved ViT loads with `keras.models.load_model` once `keras_fsp`
is imported (for `PositionEmbedding`); its SavedModel, LiteRT and ONNX
exports need nothing of keras_fsp.

Named taps: `"tokens"` (the embedded patches with their positions, the
stem's output), `"block{i}"` (each block's output, from 1), `"norm"`,
`"pool"`, `"logits"`. `keras_fsp.pairing` finds the blocks by their
attention, so FSP, hints and attention transfer pair two ViTs (or a ViT
with any transformer) by depth with no layer named.
"""

import keras
from keras import layers

from keras_fsp import compat


@keras.saving.register_keras_serializable(package="keras_fsp")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector to each position of `(batch, positions,
    channels)` tokens (initialised from N(0, 0.02^2), as ViT's)."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=tuple(input_shape[1:]), name="embeddings",
            initializer=keras.initializers.RandomNormal(stddev=0.02))

    def call(self, inputs):
        return inputs + keras.ops.cast(self.embeddings, inputs.dtype)


def cifar_vit(depth=6, width=256, heads=4, mlp_ratio=2, patch_size=4, num_classes=10,
              input_shape=(32, 32, 3), dropout=0.0, name=None):
    """A ViT for CIFAR-sized images.

    Args:
        depth: encoder blocks.
        width: token channels (a multiple of `heads`).
        heads: attention heads.
        mlp_ratio: the MLP's hidden width over `width`.
        patch_size: pixels per patch side; must divide the image's height
            and width.
        num_classes: number of logits.
        input_shape: `(height, width, channels)` of the (normalised) images.
        dropout: dropout of the attention weights and after the MLP.
        name: model name; default `"vit{depth}x{width}"`.

    Returns:
        a functional `keras.Model` mapping images to logits.

    Example:

    >>> model = cifar_vit(depth=2, width=32, heads=2)
    >>> model.get_layer("block2").output.shape
    (None, 64, 32)
    """
    h, w = int(input_shape[0]), int(input_shape[1])
    if depth < 1 or width < 1 or heads < 1 or width % heads:
        raise ValueError(f"need depth >= 1 and a width that heads divide; got depth {depth}, "
                         f"width {width}, heads {heads}.")
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the image's height and width "
                         f"{(h, w)}.")
    tokens = (h // patch_size) * (w // patch_size)
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(width, patch_size, strides=patch_size, name="patches")(inputs)
    x = layers.Reshape((tokens, width), name="patch_tokens")(x)
    x = PositionEmbedding(name="tokens")(x)
    for i in range(1, depth + 1):
        y = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_attention_norm")(x)
        attention = compat.without_fused_attention(layers.MultiHeadAttention(
            heads, width // heads, dropout=dropout, name=f"block{i}_attention"))
        y = attention(y, y)
        x = layers.Add(name=f"block{i}_attention_residual")([x, y])
        y = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_mlp_norm")(x)
        y = layers.Dense(width * mlp_ratio, activation="gelu", name=f"block{i}_mlp_hidden")(y)
        y = layers.Dense(width, name=f"block{i}_mlp_output")(y)
        if dropout:
            y = layers.Dropout(dropout, name=f"block{i}_mlp_dropout")(y)
        x = layers.Add(name=f"block{i}")([x, y])
    x = layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name or f"vit{depth}x{width}")


def vit_teacher(input_shape=(32, 32, 3), num_classes=10):
    """The ViT teacher of the results tables: 6 blocks of width 256 (3.2M
    weights), patch 4. For `--teacher keras_fsp.papers.vit:vit_teacher`."""
    return cifar_vit(6, 256, 4, 2, 4, num_classes, input_shape)


def vit_student(input_shape=(32, 32, 3), num_classes=10):
    """The ViT student of the results tables: 4 blocks of width 128 (0.55M
    weights), patch 4. For `--student keras_fsp.papers.vit:vit_student`."""
    return cifar_vit(4, 128, 4, 2, 4, num_classes, input_shape)
