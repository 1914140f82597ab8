"""Features over positions: `(batch, positions..., channels)`, channels last.

A CNN's feature map has two position axes (height, width), a sequence
model's features one (tokens, time steps). FSP matrices, attention maps and
hints read features of any such rank; where two of them differ in their
numbers of positions, the larger is pooled down to the smaller over
non-overlapping groups of positions (`pooled_size`, `pool`): the papers'
pooling of maps, and for tokens the average of each group of consecutive
tokens (what one token of a coarser tokenisation stands for). Counts that
do not divide one another cannot be pooled so: that is an error.
"""

from keras import ops


def positions_of(shape):
    """The position counts of a features' `shape`, `shape[1:-1]`; `None`
    when it has no position axis or one of unknown size."""
    shape = tuple(shape)
    if len(shape) < 3 or any(d is None for d in shape[1:-1]):
        return None
    return shape[1:-1]


def pooled_size(shape1, shape2, what="an FSP matrix"):
    """The position counts two features are brought to for `what`: the
    smaller of the two.

    Args:
        shape1: shape `(batch, positions..., m)` (batch may be None).
        shape2: shape `(batch, positions..., n)`, as many position axes.
        what: what the two are paired in, for error messages.

    Returns:
        a tuple, the smaller position counts.

    Raises:
        ValueError: if a shape has no position axis or one of unknown size,
            the ranks differ, or the larger is not an integer multiple of the
            smaller in every position axis.
    """
    p1, p2 = positions_of(shape1), positions_of(shape2)
    if p1 is None or p2 is None or len(p1) != len(p2):
        raise ValueError(
            f"{what[0].upper()}{what[1:]} needs channels-last feature maps or sequences of a "
            "known size, of one rank: (batch, height, width, channels) or (batch, steps, "
            f"channels); got shapes {tuple(shape1)} and {tuple(shape2)}."
        )
    if p1 == p2:
        return p1
    big, small = (p1, p2) if p1[0] >= p2[0] else (p2, p1)
    if any(b < s or b % s for b, s in zip(big, small)):
        axes = "height and width" if len(big) == 2 else "every position axis"
        raise ValueError(
            f"Cannot pair feature maps of shapes {tuple(shape1)} and {tuple(shape2)} in "
            f"{what}: the larger must be an integer multiple of the smaller in {axes}, so "
            "that pooling can bring it down. Tap layers whose sizes divide one another."
        )
    return small


def pool(x, size, pooling):
    """Non-overlapping max or average pooling of `x` down to the position
    counts `size`, written as a reshape and a reduction: the same values as a
    pooling op, and on GPUs a much cheaper gradient than XLA's
    select-and-scatter."""
    counts = tuple(x.shape[1:-1])
    if counts == tuple(size):
        return x
    split = []  # each axis as (size, group)
    for n, s in zip(counts, size):
        split += [s, n // s]
    blocks = ops.reshape(x, (-1, *split, x.shape[-1]))
    reduce = ops.max if pooling == "max" else ops.mean
    return reduce(blocks, axis=tuple(range(2, 2 * len(size) + 1, 2)))
