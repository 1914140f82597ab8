"""Features over positions: `(batch, positions..., channels)`, channels last.

A CNN's feature map has two position axes (height, width), a sequence
model's features one (tokens, time steps). FSP matrices, attention maps and
hints read features of any such rank; where two of them differ in their
numbers of positions, the larger is pooled down to the smaller over
non-overlapping groups of positions (`pooled_size`, `pool`): the papers'
pooling of maps, and for tokens the average of each group of consecutive
tokens (what one token of a coarser tokenisation stands for). Counts that
do not divide one another cannot be pooled so: that is an error.

Tokens paired with a map (a ViT with a CNN) are read as the grid of patches
they are, row by row (`token_grid`: 64 tokens beside a square map are 8 x 8)
and then pooled as maps are: a ViT's tokens of 4 x 4 patches of a 32 x 32
image line up with a CNN's 8 x 8 map, and its 16 x 16 and 32 x 32 maps are
pooled down to them. A count that makes no grid of the map's shape is an
error. Under a
padding mask (`keras_fsp.masks`) a group is pooled over its valid positions
only, and counts as valid if any of them is (`pool_mask`).
"""

import math

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
    if p1 is not None and p2 is not None and {len(p1), len(p2)} == {1, 2}:
        tokens, grid = (p1, p2) if len(p1) == 1 else (p2, p1)
        rows_cols = token_grid(tokens[0], grid)
        if rows_cols is None:
            raise ValueError(
                f"Cannot pair {tokens[0]} tokens with a map of {grid[0]} x {grid[1]} positions "
                f"in {what}: read as a grid of patches row by row, the tokens must form the "
                f"map's shape (for a square map, a square number of tokens); got shapes "
                f"{tuple(shape1)} and {tuple(shape2)}."
            )
        p1, p2 = (rows_cols, grid) if len(p1) == 1 else (grid, rows_cols)
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


def token_grid(count, shape):
    """`(rows, columns)`: `count` tokens read as a grid of the aspect ratio of
    a map of `shape` `(height, width)`; None where they make no such grid."""
    rows = max(1, round(math.sqrt(count * shape[0] / shape[1])))
    cols = count // rows
    if rows * cols != count or rows * shape[1] != cols * shape[0]:
        return None
    return rows, cols


def _as_grid(x, size, channels=True):
    """Tokens `x` `(batch, tokens[, c])` read as the grid (`token_grid`) of
    the 2-D position counts `size`; `x` itself when it has as many position
    axes as `size`."""
    rank = len(x.shape) - (2 if channels else 1)
    if rank >= len(size):
        return x
    grid = token_grid(x.shape[1], size)
    return ops.reshape(x, (-1, *grid, *x.shape[2:]))


def _groups(x, size):
    """`x` `(batch, positions..., c)` reshaped so that each axis is
    `(size, group)`, and the axes of the groups."""
    split = []  # each axis as (size, group)
    for n, s in zip(x.shape[1:-1], size):
        split += [s, n // s]
    return ops.reshape(x, (-1, *split, x.shape[-1])), tuple(range(2, 2 * len(size) + 1, 2))


def pool(x, size, pooling, mask=None):
    """Non-overlapping max or average pooling of `x` down to the position
    counts `size`, written as a reshape and a reduction: the same values as a
    pooling op, and on GPUs a much cheaper gradient than XLA's
    select-and-scatter.

    With `mask` (`(batch, positions...)`, 1 at valid positions, 0 at
    padding, at `x`'s positions), each group is pooled over its valid
    positions only (the largest or the mean of their values), so that
    padding never leaks into a group with a token; a group without a valid
    position is 0 (also at `x`'s own size: padded positions are 0).

    Tokens `(batch, tokens, c)` brought to a 2-D `size` are first read as
    their grid of patches (`token_grid`)."""
    x = _as_grid(x, size)
    mask = None if mask is None else _as_grid(mask, size, channels=False)
    counts = tuple(x.shape[1:-1])
    if mask is None:
        if counts == tuple(size):
            return x
        blocks, axes = _groups(x, size)
        reduce = ops.max if pooling == "max" else ops.mean
        return reduce(blocks, axis=axes)
    m = ops.expand_dims(ops.cast(mask, x.dtype), -1)
    if counts == tuple(size):
        return x * m
    blocks, axes = _groups(x, size)
    m, _ = _groups(m, size)
    if pooling == "max":
        valid = ops.max(m, axis=axes)
        return ops.where(valid > 0, ops.max(ops.where(m > 0, blocks, float("-inf")), axis=axes), 0.0)
    return ops.sum(blocks * m, axis=axes) / ops.maximum(ops.sum(m, axis=axes), 1.0)


def pool_mask(mask, size):
    """A padding mask `(batch, positions...)` brought to the position counts
    `size`: a group of positions is valid (1) if any of its positions is."""
    mask = _as_grid(mask, size, channels=False)
    if tuple(mask.shape[1:]) == tuple(size):
        return mask
    blocks, axes = _groups(ops.expand_dims(mask, -1), size)
    return ops.squeeze(ops.max(blocks, axis=axes), -1)
