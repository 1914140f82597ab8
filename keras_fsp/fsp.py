"""The FSP matrix ("flow of solution procedure"), eq. (1) of Yim et al. 2017.

Backend-agnostic: written with `keras.ops` only.
"""

from keras import ops

from keras_fsp import taps

POOLING_MODES = ("max", "avg")


def pooled_spatial_size(shape1, shape2):
    """Checks that two feature-map shapes can form an FSP matrix.

    Args:
        shape1: shape `(batch, h1, w1, m)` of the first map (batch may be None).
        shape2: shape `(batch, h2, w2, n)` of the second map.

    Returns:
        `(h, w)`, the spatial size both maps are brought to: the smaller one.

    Raises:
        ValueError: if a shape is not 4-D, a spatial size is unknown, or the
            larger map is not an integer multiple of the smaller in both axes.
    """
    for shape in (shape1, shape2):
        if len(shape) != 4 or shape[1] is None or shape[2] is None:
            raise ValueError(
                "FSP matrices need channels-last feature maps with a known "
                f"spatial size, (batch, height, width, channels); got shapes "
                f"{tuple(shape1)} and {tuple(shape2)}."
            )
    (h1, w1), (h2, w2) = tuple(shape1[1:3]), tuple(shape2[1:3])
    if (h1, w1) == (h2, w2):
        return h1, w1
    big, small = ((h1, w1), (h2, w2)) if h1 >= h2 else ((h2, w2), (h1, w1))
    if (
        big[1] < small[1]
        or big[0] % small[0]
        or big[1] % small[1]
    ):
        raise ValueError(
            "Cannot pair feature maps of shapes "
            f"{tuple(shape1)} and {tuple(shape2)} in an FSP matrix: the larger "
            "spatial size must be an integer multiple of the smaller in both "
            "height and width, so that pooling can bring it down."
        )
    return small


def _pool_to(x, size, pooling):
    """Non-overlapping max or average pooling of `x` down to `size`, written
    as a reshape and a reduction: the same values as a pooling op, and on
    GPUs a much cheaper gradient than XLA's select-and-scatter."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    rh, rw = h // size[0], w // size[1]
    blocks = ops.reshape(x, (-1, size[0], rh, size[1], rw, x.shape[-1]))
    reduce = ops.max if pooling == "max" else ops.mean
    return reduce(blocks, axis=(2, 4))


def fsp_matrix(f1, f2, pooling="max"):
    """FSP matrix between two feature maps of one network.

    `G[b, i, j] = sum_{s,t} f1[b, s, t, i] * f2[b, s, t, j] / (h * w)`.

    When the spatial sizes differ, the larger map is pooled down to the
    smaller one first (max pooling, as in the paper; `"avg"` is the variant
    some PyTorch toolkits use). The product is accumulated in float32 and the
    result is float32 whatever the input dtype (float16/bfloat16 sums of
    h*w products lose too much precision).

    Args:
        f1: tensor `(batch, h1, w1, m)`, the earlier feature map.
        f2: tensor `(batch, h2, w2, n)`, the later feature map.
        pooling: `"max"` (default, the paper) or `"avg"`.

    Returns:
        float32 tensor `(batch, m, n)`.

    Example:

    >>> import numpy as np
    >>> g = fsp_matrix(np.ones((2, 8, 8, 3)), np.ones((2, 4, 4, 5)))
    >>> tuple(g.shape)
    (2, 3, 5)
    """
    if pooling not in POOLING_MODES:
        raise ValueError(
            f"pooling must be one of {POOLING_MODES}; got {pooling!r}."
        )
    f1 = ops.convert_to_tensor(f1)
    f2 = ops.convert_to_tensor(f2)
    size = pooled_spatial_size(f1.shape, f2.shape)
    # Pool in the input dtype (max pooling is exact), then accumulate in f32.
    f1 = ops.cast(_pool_to(f1, size, pooling), "float32")
    f2 = ops.cast(_pool_to(f2, size, pooling), "float32")
    g = ops.einsum("bhwm,bhwn->bmn", f1, f2)
    return g / float(size[0] * size[1])



def fsp_matrices(features, pairs, pooling="max", projections=None):
    """FSP matrices of the layer `pairs` from a dict `{layer: feature map}`;
    `projections` (`{layer: layer}`) map some of the maps first."""
    out = []
    for a, b in pairs:
        fa, fb = features[a], features[b]
        if projections:
            fa = projections[a](fa) if a in projections else fa
            fb = projections[b](fb) if b in projections else fb
        out.append(fsp_matrix(fa, fb, pooling=pooling))
    return out


def fsp_matrices_of(model, pairs, x, pooling="max", projections=None, role="model"):
    """FSP matrices of a functional `model` for its layer `pairs` on `x`
    (inference mode), as numpy arrays `(batch, m, n)`, one per pair."""
    names = list(dict.fromkeys(n for p in pairs for n in p))
    features = taps.tap_model(model, names, include_logits=False, role=role)(x, training=False)
    return [ops.convert_to_numpy(g) for g in fsp_matrices(features, pairs, pooling, projections)]
