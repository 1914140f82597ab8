"""Network minimization (FSP paper, table 3; Yeo et al. 2018): a large CIFAR
ResNet teacher, a small student trained alone or distilled with any of
keras_fsp's methods.

    # CIFAR-10, ResNet-26 -> ResNet-8 (the paper's): the teacher, then the students
    python examples/network_minimization.py --method teacher --dataset npz:cifar10.npz --run_dir runs/c10/teacher
    python examples/network_minimization.py --method fsp --teacher_weights runs/c10/teacher/teacher.weights.h5 \
        --dataset npz:cifar10.npz --run_dir runs/c10/fsp-seed0
    # CIFAR-100, ResNet-32 -> ResNet-14
    python examples/network_minimization.py --dataset cifar100 --teacher_depth 32 --student_depth 14 ...

Data: `npz:PATH` (arrays `x_train, y_train, x_test, y_test`) or a
tensorflow-datasets name (`cifar10`, the default, or `cifar100`: a prepared
tfds folder or network access); per-channel standardisation, 4-pixel pad +
random crop + flip inside the compiled step. Methods: `teacher` and every
method of `keras_fsp.papers.methods` (`none`, the student alone; `kd`,
`fitnet`, `fsp`, `dense-fsp`, `at`, `dkd`, `fsp-kd`, `dense-fsp-kd`, `at-kd`),
with the papers' schedules (FSP: 21k stage-1 + 64k stage-2 iterations; Yeo
et al. ran 32k + 64k on CIFAR-100: `--stage1_iterations 32000`).
`keras-fsp distill` runs the same trainings from the command line, and
`keras-fsp reproduce cifar10-resnet26-to-resnet8` a whole results table.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py)

_O = common.FLAG_OPTIONS
common.define_flags("runs/network_minimization")
flags.DEFINE_string("method", "fsp", "teacher, or a method of keras_fsp.papers.methods "
                    "(none: the student alone).", **_O)
flags.DEFINE_integer("teacher_depth", 26, "Teacher ResNet depth (6n+2).", **_O)
flags.DEFINE_integer("student_depth", 8, "Student ResNet depth (6n+2).", **_O)
flags.DEFINE_string("teacher_weights", None, "Teacher weights (.weights.h5) for distillation.", **_O)
flags.DEFINE_integer("stage1_iterations", None, "fsp / dense-fsp (and their -kd): stage-1 "
                     "iterations (default the recipe's 21k).", **_O)
flags.DEFINE_enum("dtype_policy", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                  "Keras dtype policy of teacher and student (FSP matrices stay float32).", **_O)
FLAGS = flags.FLAGS


def run(f):
    """Trains what `f.method` says; returns the result (also `metrics.json`)."""
    import keras
    import numpy as np

    from keras_fsp.augment import PadCropFlip
    from keras_fsp.papers import cifar_resnet, methods, recipes

    keras.utils.set_random_seed(f.seed)
    keras.config.set_dtype_policy(f.dtype_policy)
    (x_train, y_train), (x_test, y_test) = common.load(f.dataset, "cifar10", f.smoke, examples=64)
    x_train, x_test = common.standardize(x_train, x_test)
    classes = int(max(np.max(y_train), np.max(y_test))) + 1
    steps = max(1, len(x_train) // f.batch_size)
    scale = min(f.scale, 2 * steps / 64000) if f.smoke else f.scale
    kw = dict(augment=PadCropFlip(pad=4, flip=True, seed=f.seed), scale=scale)

    def resnet(depth, name):
        return cifar_resnet(depth, num_classes=classes, name=name)

    if f.method == "teacher":
        recipe = recipes.supervised(resnet(f.teacher_depth, "teacher"), steps, name="teacher", **kw)
    else:
        method = methods.get(f.method)
        teacher = resnet(f.teacher_depth, "teacher") if method.uses_teacher else None
        if teacher is not None and f.teacher_weights:
            teacher.load_weights(f.teacher_weights)
        elif teacher is not None and not f.smoke:
            raise app.UsageError("--teacher_weights is needed to distil.")
        if f.stage1_iterations and f.method in ("fsp", "dense-fsp", "fsp-kd", "dense-fsp-kd"):
            kw["stage1_iterations"] = f.stage1_iterations
        recipe = method.build(teacher, resnet(f.student_depth, "student"), steps, **kw)
    return common.train(recipe, (x_train, y_train), (x_test, y_test), f,
                        {"method": f.method, "teacher_depth": f.teacher_depth,
                         "student_depth": f.student_depth, "dtype_policy": f.dtype_policy},
                        save_name="teacher" if f.method == "teacher" else "student",
                        record_kernel_norms=f.method != "teacher")


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    app.run(main)
