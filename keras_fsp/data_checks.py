"""Checks of training data that cost a pass over the arrays before training
and a whole run when skipped: NaN/inf inputs make every loss NaN (and the
NaN stop blames the learning rate), and a label outside the model's classes
fails or, when the classes are counted from the labels, trains a model with
the wrong number of outputs.

`FSPDistiller.fit` checks the arrays it is given; the `keras-fsp` command
checks its dataset with `check_dataset`. Each raises a `ValueError` whose
one-line message names the array, the bad value and where it is. NumPy
only (no backend).
"""

import numpy as np

# Examples per block of the finite check: no copy of a whole uint8 dataset.
_CHUNK = 4096


def check_finite(x, what):
    """Raises `ValueError` when the float array `x` holds a NaN or inf."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return  # integer images cannot hold NaN
    bad, first = 0, None
    for start in range(0, len(x), _CHUNK):
        part = x[start:start + _CHUNK]
        finite = np.isfinite(part.reshape(len(part), -1)).all(axis=1)
        if not finite.all():
            bad += int((~finite).sum())
            first = start + int(np.argmin(finite)) if first is None else first
    if bad:
        raise ValueError(
            f"{what} holds NaN or inf values in {bad} example(s), the first at index {first}: "
            "every loss would be NaN; remove or repair those examples."
        )


def check_labels(y, num_classes, what):
    """Raises `ValueError` unless `y` holds integer labels in
    `[0, num_classes)`."""
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise ValueError(f"{what} must hold integer class labels; got {y.dtype} values.")
        y = y.astype("int64")
    outside = (y < 0) | (y >= num_classes)
    if outside.any():
        index = int(np.argmax(outside))
        raise ValueError(
            f"{what} has label {int(y[index])} at index {index} ({int(outside.sum())} label(s) "
            f"outside the model's {num_classes} classes, 0 to {num_classes - 1})."
        )


def check_dataset(train, test, num_classes):
    """The checks of a whole dataset before training: finite images,
    training labels in `[0, num_classes)`, at least two classes, and test
    labels that the training split has (a class never trained on cannot be
    scored fairly, and usually means the labels are numbered differently).

    Args:
        train, test: `(x, y)` arrays.
        num_classes: the model's number of classes.
    """
    (x_train, y_train), (x_test, y_test) = train, test
    check_finite(x_train, "x_train")
    check_finite(x_test, "x_test")
    check_labels(y_train, num_classes, "y_train")
    classes = np.unique(np.asarray(y_train).reshape(-1))
    if len(classes) < 2:
        raise ValueError(f"y_train holds a single class ({int(classes[0])}): a classifier "
                         "needs at least 2.")
    unseen = np.setdiff1d(np.unique(np.asarray(y_test).reshape(-1)), classes)
    if unseen.size:
        raise ValueError(
            f"y_test has label(s) {', '.join(str(int(c)) for c in unseen[:5])} that no training "
            "example has: the test labels must be among the training labels."
        )


# Inputs whose values reach this are not normalised (0-255 pixels, say).
UNNORMALISED = 20.0


def check_fit_arrays(num_classes, x, y, validation_data=None, sparse_labels=True):
    """The checks `FSPDistiller.fit` makes before training, for NumPy arrays
    only (datasets are not read ahead): finite inputs, a warning for inputs
    far outside a normalised range, integer labels in `[0, num_classes)`
    when the loss takes them (`sparse_labels`), one-hot labels refused then
    with the fix."""
    given = [("x", x, "y", y)]
    if isinstance(validation_data, tuple) and len(validation_data) >= 2:
        given.append(("validation x", validation_data[0], "validation y", validation_data[1]))
    for x_name, xs, y_name, ys in given:
        if isinstance(xs, np.ndarray):
            check_finite(xs, x_name)
            check_normalised(xs, x_name)
        if not (num_classes and isinstance(ys, np.ndarray) and sparse_labels):
            continue
        if ys.ndim == 2 and ys.shape[1] == num_classes and ys.shape[1] > 1:
            raise ValueError(
                f"{y_name} holds one-hot labels (shape {ys.shape}), but the student's loss takes "
                f"integer class labels: pass {y_name.split()[0]}.argmax(-1), or compile with "
                "loss=keras.losses.CategoricalCrossentropy(from_logits=True)."
            )
        if np.issubdtype(ys.dtype, np.integer):
            check_labels(ys, num_classes, y_name)


def check_normalised(x, what):
    """Warns when `x` (a float array; uint8 images always) reaches values far
    outside a normalised range: the networks and the FSP and hint losses
    expect standardised inputs, and 0-255 pixels make the losses huge."""
    import warnings

    x = np.asarray(x)
    if x.dtype == np.uint8:
        peak = 255.0
    elif np.issubdtype(x.dtype, np.floating) and x.size:
        peak = float(np.max(np.abs(x[: min(len(x), _CHUNK)])))
    else:
        return
    if peak >= UNNORMALISED:
        warnings.warn(
            f"{what}'s values reach {peak:g}: the networks expect normalised inputs (a mean of "
            "about 0 and a standard deviation of about 1 per channel); normalise them, e.g. "
            "keras_fsp.apps.data.normalize(x, mean, std) with the training set's channel "
            "statistics (keras_fsp.apps.data.channel_stats).", stacklevel=4)
