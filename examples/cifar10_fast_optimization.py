"""Fast optimization on CIFAR-10 (FSP paper, table 2): a ResNet-26 student
that learns the flow of a trained ResNet-26 teacher for 21k iterations (FSP
stage) and then trains on the labels for 21k more, against the same network
trained normally for 21k and for 64k iterations.

    # the teacher (64k iterations), the 21k baseline, then the FSP student
    python examples/cifar10_fast_optimization.py --method teacher_64k --out_dir runs/c10fast
    python examples/cifar10_fast_optimization.py --method teacher_21k --out_dir runs/c10fast
    python examples/cifar10_fast_optimization.py --method fsp \
        --teacher_weights runs/c10fast/teacher_64k_seed0.weights.h5 --out_dir runs/c10fast

The paper reports the average of 3 networks (and their ensemble): run
`--seed 0/1/2`. Data: the real CIFAR-10 of `../shared/data`, loaded with the
CIFAR-10 network-minimization example's `load_cifar10`, per-channel
normalisation, 4-pixel pad + random crop + flip inside the compiled step.
`teacher_21k` uses He et al.'s schedule compressed to 21k iterations
(0.1 -> 0.01 -> 0.001 at 50% / 75%; the paper does not state it). `--scale`
shrinks every iteration count; `--smoke` runs a seconds-long check on random
data. Writes `<method>_seed<seed>.json` (and `.weights.h5`) into `--out_dir`.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py)
from cifar10_network_minimization import load_cifar10  # noqa: E402  (same data path)

_O = common.FLAG_OPTIONS
common.define_run_flags("runs/cifar10_fast", data_file="cifar10.npz", resumable=True)
flags.DEFINE_enum("method", "fsp", ["teacher_21k", "teacher_64k", "fsp"], "What to train.", **_O)
flags.DEFINE_integer("depth", 26, "ResNet depth (6n+2) of teacher and student.", **_O)
flags.DEFINE_string("teacher_weights", None, "Teacher weights (.weights.h5), for fsp.", **_O)
common.define_stage1_flags()
FLAGS = flags.FLAGS


def run(method="fsp", depth=26, teacher_weights=None, scale=1.0, batch_size=128, seed=0,
        data_dir=".", out_dir="runs/cifar10_fast", smoke=False, max_minutes=None, tag="", resume=False,
        restore_kernel_norms=None, stage1_optimizer=None, stage1_clipnorm=None):
    import keras

    from keras_fsp.papers import recipes
    from keras_fsp.augment import PadCropFlip
    from keras_fsp.papers import cifar_resnet

    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test), genuine = load_cifar10(data_dir, smoke)
    if smoke:  # ResNet-26 is slow on a CPU: keep the check to one batch
        (x_train, y_train), (x_test, y_test) = (x_train[:64], y_train[:64]), (x_test[:32], y_test[:32])
    norm = common.normalizer(x_train)
    x_train, x_test = norm(x_train), norm(x_test)
    steps = -(-len(x_train) // batch_size)
    if smoke:
        scale = min(scale, 2 * steps / 64000)
    augment = PadCropFlip(pad=4, flip=True, seed=seed)

    student = cifar_resnet(depth, name=f"resnet{depth}")
    options = {}  # recipe options beyond the defaults, recorded in the result
    if method == "teacher_64k":
        recipe = recipes.supervised(student, steps, augment=augment, scale=scale, name=method)
    elif method == "teacher_21k":
        recipe = recipes.supervised(student, steps, iterations=21000, boundaries=(10500, 15750),
                                    augment=augment, scale=scale, name=method)
    elif method == "fsp":
        teacher = cifar_resnet(depth, name=f"resnet{depth}_teacher")
        if teacher_weights:
            teacher.load_weights(teacher_weights)
        elif not smoke:
            raise app.UsageError("--teacher_weights (a teacher_64k run) is needed for fsp.")
        options = common.stage1_options(restore_kernel_norms, stage1_optimizer, stage1_clipnorm)
        recipe = recipes.fsp_paper(teacher, student, steps, stage1_iterations=21000,
                                   stage2_iterations=21000, augment=augment, scale=scale,
                                   **options)
    else:
        raise ValueError(f"Unknown method {method!r}.")
    extra = {}
    if genuine is not None:
        images, labels, _ = genuine
        extra["genuine_subset"] = (norm(images), labels)
    return common.fit_and_report(
        recipe, student, (x_train, y_train), (x_test, y_test), out_dir, method, seed,
        {"depth": depth, "scale": scale, "steps_per_epoch": steps, "tag": tag,
         "teacher_weights": teacher_weights, "options": options},
        batch_size, max_minutes, extra, name=f"{method}{tag}_seed{seed}", resume=resume)


def main(_):
    run(FLAGS.method, FLAGS.depth, FLAGS.teacher_weights, FLAGS.scale, FLAGS.batch_size,
        FLAGS.seed, FLAGS.data_dir, FLAGS.out_dir, FLAGS.smoke, FLAGS.max_minutes,
        FLAGS.tag, FLAGS.resume, FLAGS.restore_kernel_norms, FLAGS.stage1_optimizer,
        FLAGS.stage1_clipnorm)


if __name__ == "__main__":
    app.run(main)
