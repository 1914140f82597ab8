"""Transfer learning on data that ships with CIFAR-10 (the FSP paper's third
experiment, table 4, redesigned): can a student learn from a teacher trained
on a *different* task?

The paper's teacher was trained on ImageNet and its student learned CUB-200
birds. Here the teacher (ResNet-26) learns six CIFAR-10 classes (airplane,
automobile, bird, cat, deer, dog; all 30,000 of their training images), and
the student (ResNet-8) learns the other four (frog, horse, ship, truck) from
a small labelled set: `--per_class` images each (500: 2,000 in all), tested
on their 4,000 test images. Compared, all on the same 2,000 images:

- `student_alone`: the student from scratch;
- `teacher_finetuned`: the teacher's network with a new 4-way head, all of it
  fine-tuned (learning rate 0.01);
- `fitnet`: the hint stage (teacher's `stage2` -> student's `stage2`, with a
  regressor), then the task (the teacher's logits mean nothing here: no KD);
- `fsp`: the FSP stage (the sections' flow), then the task;
- `at`: attention transfer on the sections' outputs with the task loss.

    python examples/cifar10_transfer.py --method teacher --dataset npz:cifar10.npz --run_dir runs/transfer/teacher
    python examples/cifar10_transfer.py --method fsp --teacher_weights runs/transfer/teacher/teacher.weights.h5 \
        --dataset npz:cifar10.npz --run_dir runs/transfer/fsp-seed0

`keras-fsp reproduce cifar10-transfer` runs the whole table. Schedules: the
teacher 32k iterations (0.1 -> 0.01 -> 0.001 at 50% / 75%); every student
4,000 task iterations on the small set (the same steps), after 1,300 of FSP
(21k : 64k, as in the paper) or 2,200 of hints (35k : 64k). The small set
takes the first `--per_class` training images of each class (the same for
every seed). Data: CIFAR-10 as `npz:PATH` or tensorflow-datasets' `cifar10`;
per-channel standardisation fitted on the teacher's training images, 4-pixel
pad + crop + flip inside the step.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py)

_O = common.FLAG_OPTIONS
common.define_flags("runs/cifar10_transfer")
flags.DEFINE_enum("method", "fsp", ["teacher", "student_alone", "teacher_finetuned", "fitnet",
                                    "fsp", "at"], "What to train.", **_O)
flags.DEFINE_string("teacher_weights", None, "The source-task teacher (.weights.h5).", **_O)
flags.DEFINE_integer("per_class", 500, "Labelled images per target class.", **_O)
flags.DEFINE_integer("teacher_depth", 26, "Teacher ResNet depth (6n+2).", **_O)
flags.DEFINE_integer("student_depth", 8, "Student ResNet depth (6n+2).", **_O)
FLAGS = flags.FLAGS

SOURCE_CLASSES = (0, 1, 2, 3, 4, 5)
TARGET_CLASSES = (6, 7, 8, 9)
TEACHER_ITERATIONS = 32000
TASK_ITERATIONS = 4000


def split(x_train, y_train, x_test, y_test, per_class):
    """`(source train, source test, target's small train, target test)`,
    each `(x, y)` with the labels renumbered from 0 within its task."""
    import numpy as np

    remap = np.full(10, -1)
    remap[list(SOURCE_CLASSES)] = np.arange(len(SOURCE_CLASSES))
    remap[list(TARGET_CLASSES)] = np.arange(len(TARGET_CLASSES))

    def take(x, y, index):
        return x[index], remap[y[index]].astype("int32")

    small = np.concatenate([np.flatnonzero(y_train == c)[:per_class] for c in TARGET_CLASSES])
    return (take(x_train, y_train, np.isin(y_train, SOURCE_CLASSES)),
            take(x_test, y_test, np.isin(y_test, SOURCE_CLASSES)),
            take(x_train, y_train, small),
            take(x_test, y_test, np.isin(y_test, TARGET_CLASSES)))


def run(f):
    """Trains what `f.method` says; returns the result (also `metrics.json`)."""
    import keras

    from keras_fsp.augment import PadCropFlip
    from keras_fsp.papers import cifar_resnet, recipes, with_new_head

    keras.utils.set_random_seed(f.seed)
    (x_train, y_train), (x_test, y_test) = common.load(f.dataset, "cifar10", f.smoke,
                                                       examples=512)
    source, source_test, small, test = split(x_train, y_train, x_test, y_test,
                                             min(f.per_class, 16) if f.smoke else f.per_class)
    # Standardised with the source task's statistics: the data the teacher knows.
    x_source, x_source_test, x_small, x_test = common.standardize(
        source[0], source_test[0], small[0], test[0])
    augment = PadCropFlip(pad=4, flip=True, seed=f.seed)
    scale = f.scale * (0.002 if f.smoke else 1.0)
    n_source, n_target = len(SOURCE_CLASSES), len(TARGET_CLASSES)

    def teacher_net():
        return cifar_resnet(f.teacher_depth, num_classes=n_source, name=f"resnet{f.teacher_depth}")

    if f.method == "teacher":
        net = teacher_net()
        steps = len(x_source) // f.batch_size
        recipe = recipes.supervised(net, steps, iterations=TEACHER_ITERATIONS, augment=augment,
                                    scale=scale, name="teacher")
        return common.train(recipe, (x_source, source[1]), (x_source_test, source_test[1]), f,
                            {"method": "teacher", "classes": list(SOURCE_CLASSES)},
                            save_name="teacher")
    teacher = teacher_net()
    if f.teacher_weights:
        teacher.load_weights(f.teacher_weights)
    elif not f.smoke:
        raise app.UsageError("--teacher_weights (the source-task teacher) is needed.")
    steps = max(1, len(x_small) // f.batch_size)
    kw = dict(augment=augment, scale=scale)
    if f.method == "teacher_finetuned":
        net = with_new_head(teacher, n_target, name="teacher_finetuned")
        recipe = recipes.supervised(net, steps, iterations=TASK_ITERATIONS,
                                    rates=(0.01, 0.001, 0.0001), name="teacher_finetuned", **kw)
    else:
        net = cifar_resnet(f.student_depth, num_classes=n_target, name=f"resnet{f.student_depth}")
        if f.method == "student_alone":
            recipe = recipes.student_alone(net, steps, iterations=TASK_ITERATIONS, **kw)
        elif f.method == "fsp":
            recipe = recipes.fsp_paper(teacher, net, steps, stage1_iterations=TASK_ITERATIONS * 21 // 64,
                                       stage2_iterations=TASK_ITERATIONS, **kw)
        elif f.method == "fitnet":
            recipe = recipes.fitnets(teacher, net, steps, stage1_iterations=TASK_ITERATIONS * 35 // 64,
                                     stage2_iterations=TASK_ITERATIONS, stage2="task", **kw)
        else:
            recipe = recipes.attention_transfer(teacher, net, steps, iterations=TASK_ITERATIONS, **kw)
    return common.train(recipe, (x_small, small[1]), (x_test, test[1]), f,
                        {"method": f.method, "per_class": f.per_class,
                         "source_classes": list(SOURCE_CLASSES),
                         "target_classes": list(TARGET_CLASSES)})


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    app.run(main)
