"""Training-step time of the student alone and of each distillation stage.

    python benchmarks/step_times.py --teacher_depth 26 --student_depth 8 --batch_size 128

Times `fit` over random CIFAR-shaped arrays held in memory: one short `fit`
first (it traces/compiles the step), then a timed `fit` of `--steps` steps,
and prints milliseconds per step and images per second. `train_on_batch` is
not used: on JAX it syncs every variable, the teacher's too, at every call,
which `fit` does once per epoch. Runs on any Keras backend (KERAS_BACKEND).
"""

import json
import time

from absl import app, flags

flags.DEFINE_integer("teacher_depth", 26, "Teacher CIFAR ResNet depth.")
flags.DEFINE_integer("student_depth", 8, "Student CIFAR ResNet depth.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_list("stages", ["student_alone", "fsp", "kd", "task"], "What to time.")
flags.DEFINE_string("json_out", None, "Also write the results here.")
FLAGS = flags.FLAGS


def _time_fit(model, x, y, batch_size, warmup, steps):
    model.fit(x, y, batch_size=batch_size, steps_per_epoch=warmup, epochs=1,
              shuffle=False, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, steps_per_epoch=steps, epochs=1,
              shuffle=False, verbose=0)
    return (time.perf_counter() - start) / steps


def run(teacher_depth=26, student_depth=8, batch_size=128, warmup=3, steps=20,
        stages=("student_alone", "fsp", "kd", "task")):
    import keras
    import numpy as np

    from keras_fsp import FSPDistiller
    from keras_fsp.models import cifar_resnet

    rng = np.random.default_rng(0)
    n = batch_size * max(steps, warmup)
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n)
    results = []
    for name in stages:
        teacher = cifar_resnet(teacher_depth)
        student = cifar_resnet(student_depth)
        if name == "student_alone":
            model = student
            model.compile(
                optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        else:
            model = FSPDistiller(teacher, student, stage=name)
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        seconds = _time_fit(model, x, y, batch_size, warmup, steps)
        results.append({
            "name": name if name == "student_alone" else f"stage_{name}",
            "batch_size": batch_size,
            "ms_per_step": round(seconds * 1e3, 1),
            "images_per_sec": round(batch_size / seconds, 1),
        })
        print(f"{results[-1]['name']:>16}: {seconds * 1e3:8.1f} ms/step "
              f"{batch_size / seconds:9.1f} images/s", flush=True)
    return {"backend": keras.backend.backend(), "results": results}


def main(_):
    out = run(FLAGS.teacher_depth, FLAGS.student_depth, FLAGS.batch_size,
              FLAGS.warmup, FLAGS.steps, FLAGS.stages)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    app.run(main)
