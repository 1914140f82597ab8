"""A trained network scored on a test set."""

import numpy as np

from keras_fsp import taps


def accuracy_and_loss(model, x, y, batch_size=1000):
    """Test accuracy and mean cross-entropy of a model returning logits (or
    probabilities, from a final softmax)."""
    out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype="float64")
    y = np.asarray(y).reshape(-1)
    if taps.ends_in_softmax(model):
        log_probs = np.log(np.clip(out, 1e-30, 1.0))
    else:
        shifted = out - out.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {
        "accuracy": float(np.mean(np.argmax(out, axis=1) == y)),
        "loss": float(-np.mean(log_probs[np.arange(len(y)), y])),
        "errors": int(np.sum(np.argmax(out, axis=1) != y)),
        "examples": int(len(y)),
    }
