"""Networks of your own for the command line: `--teacher` and `--student`
take `file.py:function` (or `module:function`), called with the keyword
arguments it accepts among `input_shape` and `num_classes`:

    keras-fsp train-teacher --dataset digits --teacher examples/networks.py:small_cnn
    keras-fsp distill --dataset digits --teacher runs/train-teacher-digits \
        --student examples/networks.py:tiny_cnn --method kd

Any functional Keras model works; FSP, hints and attention transfer pair its
feature maps with the teacher's automatically (`keras_fsp.pairing`).
"""

import keras


def _cnn(input_shape, num_classes, widths, name):
    inputs = keras.Input(input_shape)
    x = inputs
    for i, width in enumerate(widths):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"section{i}")(x)
        if i < len(widths) - 1:
            x = keras.layers.MaxPooling2D(padding="same", name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="classifier")(x), name=name)


def small_cnn(input_shape, num_classes):
    """A teacher: three sections of 32, 64 and 128 channels."""
    return _cnn(input_shape, num_classes, (32, 64, 128), "small_cnn")


def tiny_cnn(input_shape, num_classes):
    """A student: the same sections with a quarter of the channels."""
    return _cnn(input_shape, num_classes, (8, 16, 32), "tiny_cnn")
