"""Network minimization on CIFAR-100 (FSP paper, table 3; Yeo et al. 2018): a
ResNet-32 teacher, a ResNet-14 student trained alone or distilled with FSP,
dense FSP, FitNets or KD.

    # the teacher (64k iterations), then the students
    python examples/cifar100_network_minimization.py --method teacher --out_dir runs/c100
    python examples/cifar100_network_minimization.py --method fsp \
        --teacher_weights runs/c100/teacher_seed0.weights.h5 --out_dir runs/c100

Data: CIFAR-100 through tensorflow-datasets (`keras_fsp.apps.data.load_arrays
("cifar100")`): a prepared tfds folder (`--tfds_data_dir`, default tfds' own)
or network access to download it; offline and unprepared it stops with
`keras_fsp.apps.data.DatasetError` saying so. Per-channel normalisation, 4-pixel
pad + random crop + flip inside the compiled step. Schedules are the recipes'
defaults (FSP: 21k stage-1 + 64k stage-2 iterations; Yeo et al. ran 32k + 64k
on CIFAR-100: `--stage1_iterations 32000`). `--scale` shrinks every iteration
count of the schedules; `--smoke` runs a seconds-long check on random data with
100 classes. Writes `<method>_seed<seed>.json` (and `.weights.h5`) into
`--out_dir`.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py)

_O = common.FLAG_OPTIONS
common.define_run_flags("runs/cifar100")
flags.DEFINE_enum("method", "fsp", ["teacher", "student_alone", "fsp", "dense_fsp", "fitnet", "kd"],
                  "What to train.", **_O)
flags.DEFINE_integer("teacher_depth", 32, "Teacher ResNet depth (6n+2).", **_O)
flags.DEFINE_integer("student_depth", 14, "Student ResNet depth (6n+2).", **_O)
flags.DEFINE_string("teacher_weights", None, "Teacher weights (.weights.h5) for distillation.", **_O)
flags.DEFINE_integer("stage1_iterations", None, "fsp / dense_fsp: stage-1 iterations "
                     "(default the recipe's 21k).", **_O)
flags.DEFINE_string("tfds_data_dir", None, "tensorflow-datasets data_dir holding cifar100.", **_O)
FLAGS = flags.FLAGS

NUM_CLASSES = 100


def load_cifar100(tfds_data_dir=None, smoke=False):
    """((x_train, y_train), (x_test, y_test)): uint8 NHWC images, int labels."""
    import numpy as np

    if smoke:  # one batch; ResNets are slow on a CPU
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, NUM_CLASSES, 64)
        return (x, y), (x[:32], y[:32])
    from keras_fsp.apps import data

    train, test, info = data.load_arrays("cifar100", data_dir=tfds_data_dir)
    assert info["num_classes"] == NUM_CLASSES
    return train, test


def run(method="fsp", teacher_depth=32, student_depth=14, teacher_weights=None,
        stage1_iterations=None, scale=1.0, batch_size=128, seed=0, tfds_data_dir=None,
        out_dir="runs/cifar100", smoke=False, max_minutes=None):
    import keras

    from keras_fsp.papers import recipes
    from keras_fsp.augment import PadCropFlip
    from keras_fsp.papers import cifar_resnet

    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = load_cifar100(tfds_data_dir, smoke)
    norm = common.normalizer(x_train)
    x_train, x_test = norm(x_train), norm(x_test)
    steps = -(-len(x_train) // batch_size)
    if smoke:
        scale = min(scale, 2 * steps / 64000)
    augment = PadCropFlip(pad=4, flip=True, seed=seed)
    resnet = lambda d: cifar_resnet(d, num_classes=NUM_CLASSES, name=f"resnet{d}")  # noqa: E731

    if method == "teacher":
        net = resnet(teacher_depth)
        recipe = recipes.supervised(net, steps, augment=augment, scale=scale, name="teacher")
    else:
        student = resnet(student_depth)
        if method == "student_alone":
            recipe = recipes.student_alone(student, steps, augment=augment, scale=scale)
        else:
            teacher = resnet(teacher_depth)
            if teacher_weights:
                teacher.load_weights(teacher_weights)
            elif not smoke:
                raise app.UsageError("--teacher_weights is needed to distil.")
            maker = {"fsp": recipes.fsp_paper, "dense_fsp": recipes.dense_fsp,
                     "fitnet": recipes.fitnets, "kd": recipes.hinton_kd}[method]
            extra = {}
            if stage1_iterations and method in ("fsp", "dense_fsp"):
                extra["stage1_iterations"] = stage1_iterations
            recipe = maker(teacher, student, steps, augment=augment, scale=scale, **extra)
        net = recipe.student
    return common.fit_and_report(
        recipe, net, (x_train, y_train), (x_test, y_test), out_dir, method, seed,
        {"teacher_depth": teacher_depth, "student_depth": student_depth, "num_classes": NUM_CLASSES, "scale": scale, "steps_per_epoch": steps}, batch_size, max_minutes)


def main(_):
    run(FLAGS.method, FLAGS.teacher_depth, FLAGS.student_depth, FLAGS.teacher_weights,
        FLAGS.stage1_iterations, FLAGS.scale, FLAGS.batch_size, FLAGS.seed, FLAGS.tfds_data_dir,
        FLAGS.out_dir, FLAGS.smoke, FLAGS.max_minutes)


if __name__ == "__main__":
    app.run(main)
