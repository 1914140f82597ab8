"""Training-step time of the student alone and of each distillation stage.

    python benchmarks/step_times.py --teacher_depth 26 --student_depth 8 --batch_size 128
    python benchmarks/step_times.py --stages fsp,kd --cached_teacher --steps 10

Times `fit` over random CIFAR-shaped arrays held in memory: one short `fit`
first (it traces/compiles the step), then a timed `fit` of `--steps` steps,
and prints milliseconds per step and images per second. `train_on_batch` is
not used: on JAX it syncs every variable, the teacher's too, at every call,
which `fit` does once per epoch. Runs on any Keras backend (KERAS_BACKEND).

With `--cached_teacher`, each stage that uses the teacher is timed a second
time right after, fitting on `FSPDistiller.teacher_outputs` (the teacher's
targets computed once, not timed in the steps; its one-off cost is reported as
`teacher_cache_seconds`): results `stage_{name}_cached_teacher`.
"""

import json
import time

from absl import app, flags

flags.DEFINE_integer("teacher_depth", 26, "Teacher CIFAR ResNet depth.")
flags.DEFINE_integer("student_depth", 8, "Student CIFAR ResNet depth.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_list("stages", ["student_alone", "fsp", "kd", "task"],
                  "What to time: student_alone, a built-in stage (fsp, hint, kd, task) or "
                  "kd_fsp (KD plus the FSP term).")
flags.DEFINE_list("steps_per_execution", ["1"], "compile(steps_per_execution=...) values to time "
                  "(TensorFlow loops over them inside one graph call).")
flags.DEFINE_bool("cached_teacher", False,
                  "Also time each teacher stage on a teacher cache.")
flags.DEFINE_string("json_out", None, "Also write the results here.")
FLAGS = flags.FLAGS


def _time_fit(model, x, y, batch_size, warmup, steps):
    model.fit(x, y, batch_size=batch_size, steps_per_epoch=warmup, epochs=1,
              shuffle=False, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, steps_per_epoch=steps, epochs=1,
              shuffle=False, verbose=0)
    return (time.perf_counter() - start) / steps


def _result(name, batch_size, seconds, **extra):
    result = {
        "name": name,
        "batch_size": batch_size,
        "ms_per_step": round(seconds * 1e3, 1),
        "images_per_sec": round(batch_size / seconds, 1),
        **extra,
    }
    print(f"{name:>28}: {seconds * 1e3:8.1f} ms/step "
          f"{batch_size / seconds:9.1f} images/s", flush=True)
    return result


def run(teacher_depth=26, student_depth=8, batch_size=128, warmup=3, steps=20,
        stages=("student_alone", "fsp", "kd", "task"), cached_teacher=False,
        steps_per_execution=(1,)):
    import keras
    import numpy as np

    from keras_fsp import FSPDistiller, Stage
    from keras_fsp.papers import cifar_resnet

    # KD with the FSP term added: what the FSP matrices cost on top of a KD step.
    KD_FSP = Stage("kd_fsp", {"kd": 0.9, "task": 0.1, "fsp": 1e-3})
    rng = np.random.default_rng(0)
    n = batch_size * max(steps, warmup)
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n)
    def distiller(name, spe=1):
        model = FSPDistiller(cifar_resnet(teacher_depth), cifar_resnet(student_depth),
                             stages={"kd_fsp": KD_FSP}, stage=name)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), steps_per_execution=spe)
        return model

    results = []
    for name in stages:
        for spe in steps_per_execution:
            suffix = "" if spe == 1 else f"_spe{spe}"
            if name == "student_alone":
                model = cifar_resnet(student_depth)
                model.compile(
                    optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    steps_per_execution=spe,
                )
                seconds = _time_fit(model, x, y, batch_size, warmup, steps)
                results.append(_result(name + suffix, batch_size, seconds))
                continue
            model = distiller(name, spe)
            seconds = _time_fit(model, x, y, batch_size, warmup, steps)
            results.append(_result(f"stage_{name}{suffix}", batch_size, seconds))
        if name == "student_alone":
            continue
        if cached_teacher and any(t.uses_teacher for t in model.active_terms()):
            model = distiller(name)
            start = time.perf_counter()
            cache = model.teacher_outputs(x, batch_size=batch_size)
            cache_seconds = time.perf_counter() - start
            seconds = _time_fit(model, {"inputs": x, "teacher": cache}, y,
                                batch_size, warmup, steps)
            results.append(_result(
                f"stage_{name}_cached_teacher", batch_size, seconds,
                teacher_cache_seconds=round(cache_seconds, 2),
                teacher_cache_examples=len(x),
            ))
    return {"backend": keras.backend.backend(), "results": results}


def main(_):
    out = run(FLAGS.teacher_depth, FLAGS.student_depth, FLAGS.batch_size,
              FLAGS.warmup, FLAGS.steps, FLAGS.stages, FLAGS.cached_teacher,
              [int(s) for s in FLAGS.steps_per_execution])
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    app.run(main)
