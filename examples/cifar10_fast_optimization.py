"""Fast optimization on CIFAR-10 (FSP paper, table 2): a ResNet-26 student
that learns the flow of a trained ResNet-26 teacher for 21k iterations (FSP
stage) and then trains on the labels for 21k more, against the same network
trained normally for 21k and for 64k iterations.

    python examples/cifar10_fast_optimization.py --method teacher_64k --dataset npz:cifar10.npz --run_dir runs/fast/t64k
    python examples/cifar10_fast_optimization.py --method teacher_21k --dataset npz:cifar10.npz --run_dir runs/fast/t21k
    python examples/cifar10_fast_optimization.py --method fsp --teacher_weights runs/fast/t64k/teacher.weights.h5 \
        --dataset npz:cifar10.npz --run_dir runs/fast/fsp

The paper reports the average of 3 networks: run `--seed 0/1/2`. Data and
augmentation as `network_minimization.py`. `teacher_21k` uses He et al.'s
schedule compressed to 21k iterations (0.1 -> 0.01 -> 0.001 at 50% / 75%;
the paper does not state it); the FSP student's stage 2 the same.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py)

_O = common.FLAG_OPTIONS
common.define_flags("runs/cifar10_fast")
flags.DEFINE_enum("method", "fsp", ["teacher_21k", "teacher_64k", "fsp"], "What to train.", **_O)
flags.DEFINE_integer("depth", 26, "ResNet depth (6n+2) of teacher and student.", **_O)
flags.DEFINE_string("teacher_weights", None, "Teacher weights (.weights.h5), for fsp.", **_O)
FLAGS = flags.FLAGS


def run(f):
    """Trains what `f.method` says; returns the result (also `metrics.json`)."""
    import keras

    from keras_fsp.augment import PadCropFlip
    from keras_fsp.papers import cifar_resnet, recipes

    keras.utils.set_random_seed(f.seed)
    (x_train, y_train), (x_test, y_test) = common.load(f.dataset, "cifar10", f.smoke, examples=64)
    x_train, x_test = common.standardize(x_train, x_test)
    steps = max(1, len(x_train) // f.batch_size)
    scale = min(f.scale, 2 * steps / 64000) if f.smoke else f.scale
    kw = dict(augment=PadCropFlip(pad=4, flip=True, seed=f.seed), scale=scale)
    student = cifar_resnet(f.depth, name=f"resnet{f.depth}")
    if f.method == "teacher_64k":
        recipe = recipes.supervised(student, steps, name=f.method, **kw)
    elif f.method == "teacher_21k":
        recipe = recipes.supervised(student, steps, iterations=21000, name=f.method, **kw)
    else:
        teacher = cifar_resnet(f.depth, name=f"resnet{f.depth}_teacher")
        if f.teacher_weights:
            teacher.load_weights(f.teacher_weights)
        elif not f.smoke:
            raise app.UsageError("--teacher_weights (a teacher_64k run) is needed for fsp.")
        recipe = recipes.fsp_paper(teacher, student, steps, stage1_iterations=21000,
                                   stage2_iterations=21000, **kw)
    return common.train(recipe, (x_train, y_train), (x_test, y_test), f,
                        {"method": f.method, "depth": f.depth},
                        save_name="teacher" if f.method.startswith("teacher") else "student")


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    app.run(main)
