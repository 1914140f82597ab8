"""Network minimization on CIFAR-10 (FSP paper, table 3): a ResNet-26 teacher,
a ResNet-8 student trained alone or distilled with FSP, dense FSP, FitNets or KD.

    # the teacher (paper recipe: 64k iterations), then the students
    python examples/cifar10_network_minimization.py --method teacher --out_dir runs/c10
    python examples/cifar10_network_minimization.py --method fsp \
        --teacher_weights runs/c10/teacher_seed0.weights.h5 --out_dir runs/c10

Data: the real CIFAR-10 of `../shared/data` (`--data_dir`, the folder holding
its `datasets.py`), per-channel normalisation, 4-pixel pad + random crop +
flip inside the compiled step. `--scale` shrinks every iteration count of the
papers' schedules; `--smoke` runs a seconds-long check on random data.
Writes `<method>_seed<seed>.json` (and `.weights.h5`) into `--out_dir`.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py)

_O = common.FLAG_OPTIONS

common.define_run_flags("runs/cifar10", data_file="cifar10.npz", resumable=True)
flags.DEFINE_enum("method", "fsp", ["teacher", "student_alone", "fsp", "dense_fsp", "fitnet", "kd"],
                  "What to train.", **_O)
flags.DEFINE_integer("teacher_depth", 26, "Teacher ResNet depth (6n+2).", **_O)
flags.DEFINE_integer("student_depth", 8, "Student ResNet depth (6n+2).", **_O)
flags.DEFINE_string("teacher_weights", None, "Teacher weights (.weights.h5) for distillation.", **_O)
flags.DEFINE_bool("stage1_weight_decay", True, "fsp: weight decay during stage 1.", **_O)
common.define_stage1_flags()
flags.DEFINE_enum("fsp_pairs", "sections", ["sections", "consecutive"],
                  "fsp: each section's input/output (the paper) or consecutive section outputs.", **_O)
flags.DEFINE_enum("fsp_pooling", "max", ["max", "avg"], "fsp: pooling to the smaller map.", **_O)
flags.DEFINE_bool("device_data", True, "Keep the training set on the device "
                  "(keras_fsp.inputs.DeviceArrays) instead of feeding host arrays.", **_O)
flags.DEFINE_enum("dtype_policy", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                  "Keras dtype policy of teacher and student (mixed: float32 variables, "
                  "FSP matrices accumulated in float32).", **_O)
FLAGS = flags.FLAGS


def load_cifar10(data_dir, smoke=False):
    import numpy as np

    if smoke:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, 256)
        return (x, y), (x[:64], y[:64]), None
    sys.path.insert(0, os.path.abspath(data_dir))
    import datasets  # ../shared/data/datasets.py

    (x_train, y_train), (x_test, y_test) = datasets.load_cifar10()
    genuine = datasets.load_cifar10_genuine_test_subset()
    return (x_train, y_train), (x_test, y_test), genuine


def run(method="fsp", teacher_depth=26, student_depth=8, teacher_weights=None, scale=1.0,
        batch_size=128, seed=0, data_dir=".", out_dir="runs/cifar10", smoke=False,
        max_minutes=None, restore_kernel_norms=None, stage1_weight_decay=True,
        fsp_pairs="sections", fsp_pooling="max", device_data=True, tag="", resume=False,
        dtype_policy="float32", stage1_optimizer=None, stage1_clipnorm=None):
    import keras

    from keras_fsp.papers import recipes
    from keras_fsp.augment import PadCropFlip
    from keras_fsp.papers import cifar_resnet

    keras.utils.set_random_seed(seed)
    keras.config.set_dtype_policy(dtype_policy)
    (x_train, y_train), (x_test, y_test), genuine = load_cifar10(data_dir, smoke)
    norm = common.normalizer(x_train)
    x_train, x_test = norm(x_train), norm(x_test)
    steps = -(-len(x_train) // batch_size)  # batches per epoch, the last one partial
    if smoke:
        scale = min(scale, 2 * steps / 64000)
    augment = PadCropFlip(pad=4, flip=True, seed=seed)
    options = {}  # recipe options beyond the defaults, recorded in the result

    if method == "teacher":
        net = cifar_resnet(teacher_depth, name=f"resnet{teacher_depth}")
        recipe = recipes.supervised(net, steps, augment=augment, scale=scale, name="teacher")
    else:
        student = cifar_resnet(student_depth, name=f"resnet{student_depth}")
        if method == "student_alone":
            recipe = recipes.student_alone(student, steps, augment=augment, scale=scale)
        else:
            teacher = cifar_resnet(teacher_depth, name=f"resnet{teacher_depth}")
            if teacher_weights:
                teacher.load_weights(teacher_weights)
            elif not smoke:
                raise app.UsageError("--teacher_weights is needed to distil.")
            if method in ("fsp", "dense_fsp"):
                options.update(common.stage1_options(restore_kernel_norms, stage1_optimizer,
                                                     stage1_clipnorm))
            if method == "fsp":
                options.update(stage1_weight_decay=stage1_weight_decay, pairs=fsp_pairs,
                               pooling=fsp_pooling)
            maker = {"fsp": recipes.fsp_paper, "dense_fsp": recipes.dense_fsp,
                     "fitnet": recipes.fitnets, "kd": recipes.hinton_kd}[method]
            recipe = maker(teacher, student, steps, augment=augment, scale=scale, **options)
        net = recipe.student
    extra = {}
    if genuine is not None:
        images, labels, _ = genuine
        extra["genuine_subset"] = (norm(images), labels)
    return common.fit_and_report(
        recipe, net, (x_train, y_train), (x_test, y_test), out_dir, method, seed,
        {"scale": scale, "steps_per_epoch": steps, "tag": tag,
         "options": options, "dtype_policy": dtype_policy},
        batch_size, max_minutes, extra, device_data=device_data,
        name=f"{method}{tag}_seed{seed}", resume=resume)


def main(_):
    run(FLAGS.method, FLAGS.teacher_depth, FLAGS.student_depth, FLAGS.teacher_weights,
        FLAGS.scale, FLAGS.batch_size, FLAGS.seed, FLAGS.data_dir, FLAGS.out_dir, FLAGS.smoke,
        FLAGS.max_minutes, FLAGS.restore_kernel_norms, FLAGS.stage1_weight_decay,
        FLAGS.fsp_pairs, FLAGS.fsp_pooling, FLAGS.device_data, FLAGS.tag,
        FLAGS.resume, FLAGS.dtype_policy, FLAGS.stage1_optimizer, FLAGS.stage1_clipnorm)


if __name__ == "__main__":
    app.run(main)
