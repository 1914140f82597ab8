"""Transfer learning (FSP paper, table 4): a teacher trained on another task and
fine-tuned on CUB-200-2011 teaches a small student on the birds.

    # 1. a source-task teacher (here: ResNet-32 on CIFAR-100, examples/cifar100_...)
    # 2. fine-tune it on the birds, 3. the student alone and the FSP student
    python examples/cub200_transfer.py --method teacher_finetune \
        --source_weights runs/c100/teacher_seed0.weights.h5 --out_dir runs/cub
    python examples/cub200_transfer.py --method fsp \
        --teacher_weights runs/cub/teacher_finetune_seed0.weights.h5 --out_dir runs/cub
    python examples/cub200_transfer.py --method student_alone --out_dir runs/cub

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
common.define_run_flags("runs/cub200", batch_size=64)
flags.DEFINE_enum("method", "fsp", ["teacher_finetune", "student_alone", "fsp"],
                  "What to train.", **_O)
flags.DEFINE_integer("teacher_depth", 32, "Teacher ResNet depth (6n+2).", **_O)
flags.DEFINE_integer("student_depth", 20, "Student ResNet depth (6n+2), the paper's ResNet-20.", **_O)
flags.DEFINE_string("source_weights", None, "Teacher weights from the source task.", **_O)
flags.DEFINE_string("teacher_weights", None, "Fine-tuned teacher weights, for --method fsp.", **_O)
flags.DEFINE_integer("image_size", 64, "Images are resized to this square size.", **_O)
flags.DEFINE_string("tfds_data_dir", None, "tensorflow-datasets data_dir with caltech_birds2011.", **_O)
FLAGS = flags.FLAGS

NUM_CLASSES = 200


def load_cub(image_size, tfds_data_dir=None, smoke=False):
    """((x_train, y_train), (x_test, y_test)): uint8 square images, int labels."""
    import numpy as np

    if smoke:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (32, image_size, image_size, 3), dtype=np.uint8)
        y = rng.integers(0, NUM_CLASSES, 32)
        return (x, y), (x[:16], y[:16])
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


def _with_new_head(source, num_classes):
    """The source network's body under a fresh `num_classes`-way head."""
    import keras

    features = source.get_layer("pool").output
    logits = keras.layers.Dense(num_classes, kernel_initializer="he_normal",
                                kernel_regularizer=source.get_layer("logits").kernel_regularizer,
                                name="logits_birds")(features)
    return keras.Model(source.input, logits, name=f"{source.name}_birds")


def run(method="fsp", teacher_depth=32, student_depth=20, source_weights=None,
        teacher_weights=None, image_size=64, scale=1.0, batch_size=64, seed=0,
        tfds_data_dir=None, out_dir="runs/cub200", smoke=False, max_minutes=None):
    import keras

    from keras_fsp.papers import recipes
    from keras_fsp.augment import PadCropFlip
    from keras_fsp.papers import cifar_resnet

    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = load_cub(image_size, tfds_data_dir, smoke)
    norm = common.normalizer(x_train)
    x_train, x_test = norm(x_train), norm(x_test)
    steps = -(-len(x_train) // batch_size)
    if smoke:
        scale = min(scale, 2 * steps / 64000)
    augment = PadCropFlip(pad=image_size // 8, flip=True, seed=seed)
    shape = (image_size, image_size, 3)

    def teacher_net():
        # Same graph as the source network (whatever its class count), new head.
        source = cifar_resnet(teacher_depth, num_classes=100, input_shape=shape,
                              name=f"resnet{teacher_depth}")
        return source, _with_new_head(source, NUM_CLASSES)

    if method == "teacher_finetune":
        source, net = teacher_net()
        if source_weights:
            source.load_weights(source_weights)
        recipe = recipes.supervised(net, steps, augment=augment, scale=scale, name="teacher")
    else:
        net = cifar_resnet(student_depth, num_classes=NUM_CLASSES, input_shape=shape,
                           name=f"resnet{student_depth}")
        if method == "student_alone":
            recipe = recipes.student_alone(net, steps, augment=augment, scale=scale)
        else:
            _, teacher = teacher_net()
            if teacher_weights:
                teacher.load_weights(teacher_weights)
            elif not smoke:
                raise app.UsageError("--teacher_weights (a fine-tuned teacher) is needed for fsp.")
            recipe = recipes.fsp_paper(teacher, net, steps, augment=augment, scale=scale)
    fields = {"teacher_depth": teacher_depth, "student_depth": student_depth,
              "image_size": image_size, "scale": scale, "steps_per_epoch": steps,
              "source_weights": source_weights}
    return common.fit_and_report(recipe, net, (x_train, y_train), (x_test, y_test), out_dir,
                                 method, seed, fields, batch_size, max_minutes)


def main(_):
    run(FLAGS.method, FLAGS.teacher_depth, FLAGS.student_depth, FLAGS.source_weights,
        FLAGS.teacher_weights, FLAGS.image_size, FLAGS.scale, FLAGS.batch_size, FLAGS.seed,
        FLAGS.tfds_data_dir, FLAGS.out_dir, FLAGS.smoke, FLAGS.max_minutes)


if __name__ == "__main__":
    app.run(main)
