"""Transfer learning (FSP paper, table 4): a teacher trained on another task and
fine-tuned on CUB-200-2011 teaches a small student on the birds.

    # 1. a source-task teacher (e.g. ResNet-32 on CIFAR-100, examples/network_minimization.py)
    # 2. fine-tune it on the birds, 3. the student alone and the FSP student
    python examples/cub200_transfer.py --method teacher_finetune \
        --source_weights runs/c100/teacher/teacher.weights.h5 --run_dir runs/cub/teacher
    python examples/cub200_transfer.py --method fsp \
        --teacher_weights runs/cub/teacher/teacher.weights.h5 --run_dir runs/cub/fsp
    python examples/cub200_transfer.py --method student_alone --run_dir runs/cub/alone

The paper used an ImageNet ResNet-34 (fine-tuned 77.72%) and a ResNet-20 student
(47.73% alone, 74.26% with FSP). ImageNet weights cannot be fetched here, so the
source task is whatever `--source_weights` was trained on (same architecture,
its head replaced by a 200-way one); with none, the teacher starts from scratch
(the paper's "teacher from scratch", 47.53%). Images come from tfds
`caltech_birds2011`, resized to `--image_size` (default 64) for the CIFAR-style
ResNets. `--smoke` runs seconds on random data.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py)

_O = common.FLAG_OPTIONS
common.define_flags("runs/cub200", batch_size=64)
flags.DEFINE_enum("method", "fsp", ["teacher_finetune", "student_alone", "fsp"],
                  "What to train.", **_O)
flags.DEFINE_integer("teacher_depth", 32, "Teacher ResNet depth (6n+2).", **_O)
flags.DEFINE_integer("student_depth", 20, "Student ResNet depth (6n+2), the paper's ResNet-20.", **_O)
flags.DEFINE_string("source_weights", None, "Teacher weights from the source task.", **_O)
flags.DEFINE_integer("source_classes", 100, "Classes of the source task's head.", **_O)
flags.DEFINE_string("teacher_weights", None, "Fine-tuned teacher weights, for --method fsp.", **_O)
flags.DEFINE_integer("image_size", 64, "Images are resized to this square size.", **_O)
flags.DEFINE_string("tfds_data_dir", None, "tensorflow-datasets data_dir with caltech_birds2011.", **_O)
FLAGS = flags.FLAGS

NUM_CLASSES = 200


def load_cub(image_size, tfds_data_dir=None, smoke=False):
    """((x_train, y_train), (x_test, y_test)): uint8 square images, int labels."""
    if smoke:
        return common.load(None, None, True, shape=(image_size, image_size, 3),
                           classes=NUM_CLASSES, examples=32)
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def arrays(split):
        try:
            ds = tfds.load("caltech_birds2011", split=split, data_dir=tfds_data_dir,
                           download=tfds_data_dir is None)
        except Exception as e:  # noqa: BLE001 - tfds raises many kinds when offline
            raise app.UsageError(
                f"caltech_birds2011 could not be loaded ({type(e).__name__}): it needs "
                "network access or a prepared --tfds_data_dir.") from None
        ds = ds.map(lambda ex: (tf.cast(tf.image.resize(ex["image"], (image_size, image_size)),
                                        tf.uint8), ex["label"]))
        xs, ys = zip(*tfds.as_numpy(ds))
        return np.stack(xs), np.asarray(ys, np.int64)

    return arrays("train"), arrays("test")


def run(f):
    """Trains what `f.method` says; returns the result (also `metrics.json`)."""
    import keras

    from keras_fsp.augment import PadCropFlip
    from keras_fsp.papers import cifar_resnet, recipes, with_new_head

    keras.utils.set_random_seed(f.seed)
    (x_train, y_train), (x_test, y_test) = load_cub(f.image_size, f.tfds_data_dir, f.smoke)
    x_train, x_test = common.standardize(x_train, x_test)
    steps = max(1, len(x_train) // f.batch_size)
    scale = min(f.scale, 2 * steps / 64000) if f.smoke else f.scale
    kw = dict(augment=PadCropFlip(pad=f.image_size // 8, flip=True, seed=f.seed), scale=scale)
    shape = (f.image_size, f.image_size, 3)

    def teacher_net():
        # Same graph as the source network (whatever its class count), new head.
        source = cifar_resnet(f.teacher_depth, num_classes=f.source_classes, input_shape=shape,
                              name=f"resnet{f.teacher_depth}")
        return source, with_new_head(source, NUM_CLASSES, name=f"{source.name}_birds")

    if f.method == "teacher_finetune":
        source, net = teacher_net()
        if f.source_weights:
            source.load_weights(f.source_weights)
        recipe = recipes.supervised(net, steps, name="teacher", **kw)
    else:
        net = cifar_resnet(f.student_depth, num_classes=NUM_CLASSES, input_shape=shape,
                           name=f"resnet{f.student_depth}")
        if f.method == "student_alone":
            recipe = recipes.student_alone(net, steps, **kw)
        else:
            _, teacher = teacher_net()
            if f.teacher_weights:
                teacher.load_weights(f.teacher_weights)
            elif not f.smoke:
                raise app.UsageError("--teacher_weights (a fine-tuned teacher) is needed for fsp.")
            recipe = recipes.fsp_paper(teacher, net, steps, **kw)
    return common.train(recipe, (x_train, y_train), (x_test, y_test), f,
                        {"method": f.method, "teacher_depth": f.teacher_depth,
                         "student_depth": f.student_depth, "image_size": f.image_size,
                         "source_weights": f.source_weights},
                        save_name="teacher" if f.method == "teacher_finetune" else "student")


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    app.run(main)
