"""What the example scripts share: normalisation, training a recipe with a
wall-time guard, and writing `<method>_seed<seed>.json` and `.weights.h5`."""

import json
import os
import time


def normalizer(x_train):
    """Per-channel standardisation fitted on the training images."""
    channels = x_train.shape[-1]
    mean = x_train.reshape(-1, channels).mean(axis=0)
    std = x_train.reshape(-1, channels).std(axis=0)
    return lambda x: ((x.astype("float32") - mean) / std).astype("float32")


def fit_and_report(recipe, net, train, test, out_dir, method, seed, fields,
                   batch_size=128, max_minutes=None, extra_scores=None):
    """Compiles and fits `recipe`, scores `net` on `test`, writes the results.

    Args:
        recipe: a `keras_fsp.recipes.Recipe`.
        net: the network to score and save (the student, or the teacher).
        train, test: `(x, y)` arrays, already normalised.
        fields: extra entries of the result (the script's settings).
        max_minutes: stop after the epoch that passes this wall time; the
            result then says `completed: false`.
        extra_scores: `{name: (x, y)}` more test sets, e.g. exact pixels.

    Returns:
        the result dict (also written as `<out_dir>/<method>_seed<seed>.json`).
    """
    import keras

    recipe.compile(metrics=["accuracy"])
    start = time.time()

    class _Deadline(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if max_minutes and time.time() - start > 60 * max_minutes:
                self.model.stop_training = True

    history = recipe.fit(*train, batch_size=batch_size, validation_data=test,
                         validation_freq=max(1, recipe.epochs // 8),
                         callbacks=[_Deadline()], verbose=2)
    seconds = time.time() - start

    def accuracy(x, y):
        return float((net.predict(x, batch_size=1000, verbose=0).argmax(-1) == y).mean())

    epochs_run = len(history.history["loss"])
    result = {
        "method": method, "seed": seed, **fields, "epochs": recipe.epochs,
        "stage_epochs": {str(e): s.name for e, s in recipe.schedule.items()},
        "batch_size": batch_size, "train_seconds": round(seconds, 1),
        "test_accuracy": accuracy(*test),
        "epochs_run": epochs_run, "completed": epochs_run == recipe.epochs,
        "backend": keras.backend.backend(),
        "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
    }
    for name, (x, y) in (extra_scores or {}).items():
        result[f"{name}_accuracy"] = accuracy(x, y)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{method}_seed{seed}")
    net.save_weights(stem + ".weights.h5")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return result
