"""One whole paper-schedule distillation, timed end to end, and where its
time goes.

    KERAS_BACKEND=jax python benchmarks/paper_schedule.py --dataset npz:cifar10.npz \
        --teacher results/teachers/cifar10_resnet26_seed0.weights.h5 --method fsp \
        --json_out benchmarks/results/gpu-h200-paper-schedule-fsp.json

Runs `keras-fsp distill` in this process, exactly as the command line does
(the same flags; `--flags` adds more, e.g. `--flags=--dtype_policy=mixed_bfloat16`),
and records:

- `seconds_end_to_end`: from this script's start (Python imports included)
  to the run's end (its result files written);
- `phases`: imports, everything before `fit` (`before_fit`: the data, the
  networks, the teacher's weights), `fit`, and after `fit` (scoring,
  exports);
- `compile`: JAX's tracing, lowering and XLA compilation seconds per
  function (`jax.monitoring`), and how much of it fell inside `fit`;
- `epochs`: per epoch of `fit`, the device's time (from the dispatch of the
  epoch's compiled loop to its logs arriving on the host, compilation
  included in a stage's first epoch) and the host's time between two epochs
  (the device idle meanwhile: callbacks, validation, checkpoints, the next
  dispatch), summed and split by stage; `callbacks`: seconds spent in each
  callback's epoch-end hook, and in validation.
"""

import time

STARTED = time.time()

import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():  # only when run: the module is also imported by the tests
    flags.DEFINE_string("dataset", "npz:cifar10.npz", "The data (keras-fsp --dataset).")
    flags.DEFINE_string("teacher", None, "The teacher (keras-fsp --teacher).")
    flags.DEFINE_string("method", "fsp", "keras-fsp --method.")
    flags.DEFINE_list("flags", [], "More keras-fsp flags, e.g. --dtype_policy=mixed_bfloat16.")
    flags.DEFINE_string("model_dir", None, "The run's folder (default: a temporary one, deleted).")
    flags.DEFINE_string("json_out", None, "Write the results here.")


class Timeline:
    """Time stamps of `fit`'s epochs and the time spent in callbacks."""

    def __init__(self):
        self.epochs = []  # per epoch: dispatch, logs, end, stage
        self.seconds = collections.defaultdict(float)  # by name: callbacks, setup steps
        self.fit = [None, None]

    def callback(self):
        import keras

        timeline = self

        class Stamps(keras.callbacks.Callback):
            # Last in the list: its batch-begin hook runs just before a
            # dispatch (one per epoch in the scanned loop); Keras turns the
            # logs into numbers (waiting for the device) before any
            # batch-end hook runs.
            def on_epoch_begin(self, epoch, logs=None):
                timeline.epochs.append({})

            def on_train_batch_begin(self, batch, logs=None):
                timeline.epochs[-1].setdefault("dispatch", time.perf_counter())

            def on_train_batch_end(self, batch, logs=None):
                timeline.epochs[-1]["logs"] = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                stage = getattr(getattr(self.model, "stage", None), "name", None)
                timeline.epochs[-1].update(end=time.perf_counter(), stage=stage,
                                           validated="val_loss" in (logs or {}))

        return Stamps()

    def timed(self, name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return wrapper

    def summary(self):
        epochs = self.epochs
        rows = []
        for i, e in enumerate(epochs):
            following = epochs[i + 1]["dispatch"] if i + 1 < len(epochs) else self.fit[1]
            rows.append({"stage": e.get("stage"), "validated": e.get("validated", False),
                         "device": e["logs"] - e["dispatch"], "host": following - e["logs"]})
        by_stage = {}
        for stage in dict.fromkeys(r["stage"] for r in rows):
            mine = [r for r in rows if r["stage"] == stage]
            device = sorted(r["device"] for r in mine[1:])  # the first one compiles
            plain = sorted(r["host"] for r in mine if not r["validated"])
            by_stage[stage] = {
                "epochs": len(mine),
                "device_seconds": round(sum(r["device"] for r in mine), 2),
                "host_seconds": round(sum(r["host"] for r in mine), 2),
                "first_epoch_device_seconds": round(mine[0]["device"], 2),
                "median_epoch_device_seconds": round(device[len(device) // 2], 4) if device else None,
                "median_host_seconds_between_epochs": round(plain[len(plain) // 2], 4) if plain else None,
            }
        return {
            "epochs": len(rows),
            "device_seconds": round(sum(r["device"] for r in rows), 2),
            "host_seconds": round(sum(r["host"] for r in rows), 2),
            "before_first_dispatch_seconds": round(epochs[0]["dispatch"] - self.fit[0], 2) if epochs else None,
            "by_stage": by_stage,
            "callbacks": {k: round(v, 2) for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])},
        }


def main(_):
    import jax
    import keras

    from keras_fsp import FSPDistiller
    from keras_fsp.apps import cli, commands, networks

    phases = {"imports": time.time() - STARTED}
    compile_seconds = collections.defaultdict(float)
    compile_spans = []

    def on_span(event, start, end, **kwargs):
        if event.startswith("/jax/core/compile/"):
            name = kwargs.get("fun_name", "?")
            compile_seconds[name] += end - start
            compile_spans.append((start, end))

    jax.monitoring.register_event_time_span_listener(on_span)
    timeline = Timeline()
    original_fit = FSPDistiller.fit

    def fit(self, *args, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        for c in callbacks:
            c.on_epoch_end = timeline.timed(type(c).__name__, c.on_epoch_end)
        callbacks.append(timeline.callback())
        self.evaluate = timeline.timed("validation", self.evaluate)
        timeline.fit[0] = time.perf_counter()
        phases["before_fit"] = time.time() - STARTED - phases["imports"]
        try:
            return original_fit(self, *args, callbacks=callbacks, **kwargs)
        finally:
            timeline.fit[1] = time.perf_counter()
            phases["fit_end"] = time.time()

    FSPDistiller.fit = fit
    # What comes before fit, by function of the command line.
    setup = Timeline()
    timed = {(commands, "load_data"): "data",
             (networks, "load_teacher"): "teacher (built and loaded)",
             (networks, "resnet"): "networks built (teacher and student)",
             (commands, "_recipe"): "distiller and stages"}
    patched = {(module, name): getattr(module, name) for module, name in timed}
    for (module, name), function in patched.items():
        setattr(module, name, setup.timed(timed[module, name], function))
    model_dir = FLAGS.model_dir or tempfile.mkdtemp(prefix="paper-schedule-")
    argv = ["keras-fsp", "distill", f"--method={FLAGS.method}", f"--dataset={FLAGS.dataset}",
            f"--model_dir={model_dir}", "--verbose=0", "--overwrite", *FLAGS.flags]
    if FLAGS.teacher:
        argv.append(f"--teacher={FLAGS.teacher}")
    try:
        result = cli.run(argv)
    finally:
        FSPDistiller.fit = original_fit
        for (module, name), function in patched.items():
            setattr(module, name, function)
        if FLAGS.model_dir is None:
            shutil.rmtree(model_dir, ignore_errors=True)
    ended = time.time()
    fit_start = phases["fit_end"] - (timeline.fit[1] - timeline.fit[0])
    phases["fit"] = timeline.fit[1] - timeline.fit[0]
    phases["after_fit"] = ended - phases.pop("fit_end")
    in_fit = sum(min(e, phases["fit"] + fit_start) - max(s, fit_start)
                 for s, e in compile_spans if e > fit_start and s < fit_start + phases["fit"])
    out = {
        "device": jax.devices()[0].device_kind,
        "keras": keras.__version__,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": "keras-fsp " + " ".join(a for a in argv[1:] if not a.startswith("--model_dir")),
        "seconds_end_to_end": round(ended - STARTED, 1),
        "test_accuracy": result["test_accuracy"],
        "epochs": result["epochs_done"],
        "steps_per_epoch": result["steps_per_epoch"],
        "stages": result["stages"],
        "phases": {k: round(v, 2) for k, v in phases.items()},
        "before_fit": {k: round(v, 2) for k, v in setup.seconds.items()},
        "compile_seconds": {k: round(v, 2) for k, v in
                            sorted(compile_seconds.items(), key=lambda kv: -kv[1]) if v >= 0.05},
        "compile_seconds_total": round(sum(compile_seconds.values()), 2),
        "compile_seconds_in_fit": round(in_fit, 2),
        "fit": timeline.summary(),
    }
    print(json.dumps(out, indent=1), flush=True)
    if FLAGS.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
        with open(FLAGS.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
