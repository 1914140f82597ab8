"""The plain path: `FSPDistiller(teacher, student)`, `compile()`, `fit()`
trains a classifier better than the same student trained alone."""

import keras
import numpy as np
import pytest

import keras_fsp
from keras_fsp.papers import cifar_resnet

pytest.importorskip("sklearn")
# The stage's logic is the same on every backend (its terms are tested on
# both); one backend proves the outcome.
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="the outcome is checked in the TensorFlow suite")


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def test_the_default_stage_beats_the_student_alone_on_digits():
    from keras_fsp.apps import data

    (x, y), (x_test, y_test), info = data.load_arrays("digits")
    x, x_test = (data.normalize(v, info["mean"], info["std"]) for v in (x, x_test))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    keras.utils.set_random_seed(0)
    teacher = cifar_resnet(14, input_shape=(8, 8, 1))
    teacher.compile(keras.optimizers.Adam(1e-3), loss)
    teacher.fit(x, y, epochs=8, batch_size=64, verbose=0)
    assert _accuracy(teacher, x_test, y_test) > 0.95
    # The students see 200 labelled images; the teacher knows all 1,297.
    few = slice(0, 200)
    keras.utils.set_random_seed(1)
    alone = cifar_resnet(8, input_shape=(8, 8, 1))
    alone.compile(keras.optimizers.Adam(1e-3), loss)
    alone.fit(x[few], y[few], epochs=25, batch_size=50, verbose=0)
    keras.utils.set_random_seed(1)
    student = cifar_resnet(8, input_shape=(8, 8, 1))
    distiller = keras_fsp.FSPDistiller(teacher, student)
    assert distiller.stage.name == "kd"
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    distiller.fit(x[few], y[few], epochs=25, batch_size=50, verbose=0)
    alone_accuracy, distilled = _accuracy(alone, x_test, y_test), _accuracy(student, x_test, y_test)
    print(f"alone {alone_accuracy:.3f}, distilled {distilled:.3f}")  # for the record (-s)
    assert distilled >= alone_accuracy + 0.006, (alone_accuracy, distilled)  # 3 of 500 images
