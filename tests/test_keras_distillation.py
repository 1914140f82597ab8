import keras
import numpy as np
import pytest

from keras_fsp import taps
from keras_fsp.terms import LOGITS
from keras_fsp.keras_distillation import (
    HintDistillation,
    SoftTargetDistillation,
    fsp_distillation_losses,
)
from tests import reference
from tests.helpers import data, small_pair

PAIRS = [("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")]


def test_fsp_and_soft_targets_in_keras_own_distiller():
    teacher, student = small_pair()
    x, y = data()
    names = ["stem", "stage1", "stage2", "stage3"]
    t = {k: keras.ops.convert_to_numpy(v) for k, v in taps.tap_model(teacher, names)(x, training=False).items()}
    # Keras' Distiller taps the student in a second pass, in training mode.
    s = {k: keras.ops.convert_to_numpy(v) for k, v in taps.tap_model(student, names)(x, training=True).items()}
    distiller = keras.distillation.Distiller(
        teacher, student,
        distillation_losses=fsp_distillation_losses(PAIRS) + [SoftTargetDistillation(temperature=2.0)],
        student_loss_weight=0.0,
    )
    distiller.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = distiller.compute_loss(x, y, distiller(x, training=False), training=False)
    expected = reference.fsp_loss(
        [reference.fsp(t[a], t[b]) for a, b in PAIRS],
        [reference.fsp(s[a], s[b]) for a, b in PAIRS],
    ) + reference.soft_target_loss(t[LOGITS], student.predict(x, verbose=0), 2.0)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(expected, rel=1e-4)
    history = distiller.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])


def test_hint_distillation_needs_equal_shapes():
    teacher, student = small_pair()
    distiller = keras.distillation.Distiller(
        teacher, student, distillation_losses=[HintDistillation("stage2", "stage1")]
    )
    distiller.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    with pytest.raises(ValueError, match="regressor"):
        distiller.compute_loss(x, y, distiller(x), training=True)


def test_a_distiller_with_keras_fsp_losses_round_trips_through_its_config():
    teacher, student = small_pair()
    losses = fsp_distillation_losses(PAIRS) + [SoftTargetDistillation(temperature=2.0),
                                               HintDistillation("stage2", "stage2")]
    distiller = keras.distillation.Distiller(teacher, student, distillation_losses=losses,
                                             student_loss_weight=0.5)
    distiller.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    config = keras.saving.serialize_keras_object(distiller)
    clone = keras.saving.deserialize_keras_object(config)  # no custom_objects needed
    clone.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clone.teacher.set_weights(teacher.get_weights())
    clone.student.set_weights(student.get_weights())
    x, y = data()
    ours = distiller.compute_loss(x, y, distiller(x, training=False), training=False)
    theirs = clone.compute_loss(x, y, clone(x, training=False), training=False)
    assert float(keras.ops.convert_to_numpy(theirs)) == pytest.approx(
        float(keras.ops.convert_to_numpy(ours)), rel=1e-5)
    assert float(keras.ops.convert_to_numpy(ours)) > 0
    # each pair loss reads the capture restored just before it
    pairs = [l for l in clone.distillation_losses if hasattr(l, "capture")]
    assert [p.capture.teacher_layer_name for p in pairs] == [a for a, _ in PAIRS]
