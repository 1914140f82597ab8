"""Any functional Keras CNN as teacher or student: keras.applications and
keras-hub models paired automatically (nested models seen through), and
logits-only stages with subclassed and Sequential networks."""

import keras
import numpy as np
import pytest

import keras_fsp
from keras_fsp import FSPDistiller, pairing, taps
from keras_fsp.callbacks import StageSchedule
from keras_fsp.papers import cifar_resnet
from keras_fsp.terms import LOGITS, FSPTerm

SHAPE = (32, 32, 3)
apps = keras.applications


def _images(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + SHAPE).astype("float32"), rng.integers(0, 10, n)


def _backbone(name="backbone", depth=8, width=1):
    """A CIFAR ResNet without its head, for any image size."""
    full = cifar_resnet(depth, input_shape=(None, None, 3), width_multiplier=width, name=f"{name}_full")
    return keras.Model(full.inputs, full.get_layer("stage3").output, name=name)


def _classifier(backbone, name="classifier"):
    inputs = keras.Input(SHAPE)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(pooled), name=name)


# ----------------------------------------------------------- nested models


def test_nested_model_is_tapped_through_in_one_pass():
    model = _classifier(_backbone())
    g = taps.graph(model)
    assert list(g.nodes)[:3] == ["backbone/stem_conv", "backbone/stem_bn", "backbone/stem"]
    assert list(g.nodes)[-2:] == ["pool", "head"]
    # The nested layers get the outer input's shape (the backbone takes any size).
    assert taps.output_shape(model, "backbone/stage2") == (None, 16, 16, 32)
    assert taps.output_shape(model, "stage2") == (None, 16, 16, 32)  # plain when unique
    assert model.get_layer("backbone").get_layer("stage2").output.shape[1] is None  # unchanged
    view = taps.tap_model(model, ["backbone/stem", "stage3"])
    x, _ = _images(4)
    out = view(x, training=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out[LOGITS]), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)
    assert sorted(out) == sorted(["backbone/stem", LOGITS, "stage3"])
    assert {id(v) for v in view.weights} <= {id(v) for v in model.weights}
    assert taps.layers_up_to(model, ["stage2"]) == [model.get_layer("backbone")]


def test_nested_pairs_use_paths_and_equal_the_flat_models():
    flat = cifar_resnet(8, input_shape=SHAPE)
    nested = _classifier(_backbone())
    t_pairs, s_pairs = pairing.matched_section_pairs(flat, nested)
    assert t_pairs == [("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")]
    assert s_pairs == [(f"backbone/{a}", f"backbone/{b}") for a, b in t_pairs]


def test_ambiguous_and_unknown_names():
    inputs = keras.Input(SHAPE)
    a, b = _backbone("a"), _backbone("b")
    merged = keras.layers.Concatenate()([a(inputs), b(inputs)])
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(merged)))
    assert taps.output_shape(model, "b/stage3") == (None, 8, 8, 64)
    with pytest.raises(ValueError, match=r"several layers named 'stage3': \['a/stage3', 'b/stage3'\]"):
        taps.output_shape(model, "stage3")
    with pytest.raises(ValueError, match=r"no layer named 'a/stage_3'.*Closest layer names: \['a/stage3'"):
        taps.tap_model(model, ["a/stage_3"])


def test_fsp_stage_trains_a_nested_student():
    teacher = cifar_resnet(14, input_shape=SHAPE, name="teacher")
    student = _classifier(_backbone(width=2))
    d = FSPDistiller(teacher, student, stage="fsp")
    assert sorted(d.terms["fsp"].projections) == [f"backbone/{n}" for n in ("stage1", "stage2", "stage3", "stem")]
    d.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    before = keras.ops.convert_to_numpy(student.get_layer("backbone").get_layer("stem_conv").kernel)
    x, y = _images(32)
    losses = d.fit(x, y, batch_size=16, epochs=2, verbose=0).history["fsp_loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    after = keras.ops.convert_to_numpy(student.get_layer("backbone").get_layer("stem_conv").kernel)
    assert not np.array_equal(before, after)  # the nested backbone trained
    assert student.get_layer("head").trainable  # and the head is handed back trainable


# ------------------------------------------------------------------ pairing


def test_section_ends_skip_the_next_blocks_expansion_and_padding():
    # A stride-2 inverted residual block (MobileNetV2, EfficientNet) starts
    # with a 1x1 expansion at the old size: the section ends before it.
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="block0")(x)
    x = keras.layers.BatchNormalization(name="block0_bn")(x)
    x = keras.layers.Conv2D(48, 1, name="expand")(x)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.ReLU(name="expand_relu")(x)
    x = keras.layers.ZeroPadding2D(name="pad")(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, name="down")(x)
    x = keras.layers.Conv2D(16, 1, name="project")(x)
    out = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, out)
    assert pairing.section_ends(model) == {(32, 32): "block0_bn", (16, 16): "project"}
    assert pairing.section_start(model) == "stem_relu"


def test_unresolvable_mismatch_lists_both_networks_candidates():
    teacher = cifar_resnet(8, input_shape=SHAPE, name="teacher")
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, name="valid")(inputs)  # 30x30: no size in common
    student = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x)),
                          name="odd")
    with pytest.raises(ValueError, match=r"share no section size.*teacher 'teacher': stage1 \(None, 32, 32, 16\), "
                                         r"stage2 \(None, 16, 16, 32\).*student 'odd': valid \(None, 30, 30, 8\)"):
        pairing.matched_section_ends(teacher, student)
    with pytest.raises(ValueError, match=r"FSP pair mismatch.*Candidate taps.*teacher 'teacher'.*student 'wide'"):
        FSPDistiller(teacher, cifar_resnet(8, input_shape=SHAPE, width_multiplier=2, name="wide"),
                     terms=[FSPTerm(projection=False)])


def test_the_pairing_is_logged_once_and_nothing_printed(capsys, caplog):
    teacher = cifar_resnet(14, input_shape=SHAPE, name="printed_teacher")
    student = cifar_resnet(8, input_shape=SHAPE, width_multiplier=2, name="printed_student")
    with caplog.at_level("INFO", logger="keras_fsp"):
        FSPDistiller(teacher, student, stage="fsp")
    logged = caplog.text
    assert "keras_fsp: printed_teacher -> printed_student, fsp: 3 FSP pairs" in logged
    assert "1x1 projection of the student's 'stage3': 128 -> 64 channels" in logged
    assert capsys.readouterr().out == ""
    caplog.clear()
    with caplog.at_level("INFO", logger="keras_fsp"):
        FSPDistiller(teacher, student, stage="fsp")
    assert caplog.text == ""


# --------------------------------------------- logits: softmax, subclassed


class SubclassedNet(keras.Model):
    """A subclassed CNN, built on its first call."""

    def __init__(self, softmax=False, **kwargs):
        super().__init__(**kwargs)
        self.softmax = softmax
        self.conv = keras.layers.Conv2D(8, 3)
        self.bn = keras.layers.BatchNormalization()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(10)

    def call(self, x, training=None):
        z = self.dense(self.pool(keras.ops.relu(self.bn(self.conv(x), training=training))))
        return keras.ops.softmax(z) if self.softmax else z


def _sequential():
    return keras.Sequential([keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(10)])


@pytest.mark.parametrize("kind", ["subclassed_student", "subclassed_teacher", "sequential_both"])
def test_kd_trains_subclassed_and_sequential_networks(kind):
    functional = cifar_resnet(8, input_shape=SHAPE)
    teacher, student = {
        "subclassed_student": (functional, SubclassedNet()),
        "subclassed_teacher": (SubclassedNet(), functional),
        "sequential_both": (_sequential(), _sequential()),
    }[kind]
    d = FSPDistiller(teacher, student)
    assert d.stage.name == "kd"  # the default
    d.compile(optimizer=keras.optimizers.SGD(0.05))
    x, y = _images(32)
    history = d.fit(x, y, batch_size=16, epochs=3, verbose=0).history
    assert np.all(np.isfinite(history["loss"])) and history["loss"][-1] < history["loss"][0]
    assert d.predict(x[:2], verbose=0).shape == (2, 10)


def test_a_subclassed_network_returning_probabilities_is_refused():
    d = FSPDistiller(SubclassedNet(softmax=True, name="probs"), cifar_resnet(8, input_shape=SHAPE), stage="kd")
    d.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"teacher 'probs' returns probabilities.*classifier_activation=None"):
        d.fit(*_images(16), epochs=1, verbose=0)


@pytest.mark.large
def test_kd_of_a_softmax_teacher_equals_its_logits_twin():
    kwargs = dict(weights=None, input_shape=SHAPE, classes=10, alpha=0.35)
    logits = apps.MobileNetV2(classifier_activation=None, name="logits_teacher", **kwargs)
    softmax = apps.MobileNetV2(classifier_activation="softmax", name="softmax_teacher", **kwargs)
    softmax.set_weights(logits.get_weights())
    x, y = _images(16)
    losses = []
    for teacher in (logits, softmax):
        keras.utils.set_random_seed(0)
        d = FSPDistiller(teacher, cifar_resnet(8, input_shape=SHAPE), stage="kd")
        d.compile(optimizer=keras.optimizers.SGD(0.0))
        losses.append(d.fit(x, y, batch_size=16, epochs=1, verbose=0).history["kd_loss"][0])
    assert np.isfinite(losses[0]) and losses[1] == pytest.approx(losses[0], rel=1e-5)


# ------------------------------------------------------- the family pairs


# The pairing is backend-independent and the TensorFlow suite trains these
# pairs; on JAX (CPU) a DenseNet-121 step compiles for over a minute, and the
# JAX suite trains nested and keras-hub networks below and above.
family_pair = pytest.mark.skipif(keras.backend.backend() == "jax",
                                 reason="trained in the TensorFlow suite (see above)")


def _distil_and_export(teacher, student, tmp_path):
    """`fsp` (two whole-batch steps) then `kd` (three), then the student's
    `.keras` export reloaded: returns the distiller and the history."""
    for layer in student.layers:  # EfficientNet's stochastic depth: its noise
        if isinstance(layer, keras.layers.Dropout):  # would hide a 2-epoch trend
            layer.rate = 0.0
    d = FSPDistiller(teacher, student)
    d.compile(optimizer=keras.optimizers.SGD(0.002))  # plain descent: monotone at this rate
    x, y = _images(32)
    # Whole-batch steps: batch-norm statistics of small batches make a few
    # steps of an EfficientNet's kd loss noisy.
    history = d.fit(x, y, batch_size=len(x), epochs=5, shuffle=False, verbose=0,
                    callbacks=[StageSchedule({0: "fsp", 2: "kd"}, verbose=0)]).history
    print({k: np.round(v, 3).tolist() for k, v in history.items()})  # for the record (-s)
    for key, epochs in (("fsp_loss", 2), ("kd_loss", 3)):
        losses = history[key]
        assert len(losses) == epochs and np.all(np.isfinite(losses)), (key, losses)
        # Falling: below where it started (a step may overshoot on these
        # untrained networks).
        assert min(losses[1:]) < losses[0], (key, losses)
    path = keras_fsp.export_student(d, str(tmp_path / "student.keras"), format="keras")
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), student.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-4)
    return d, history


def _pairs(d):
    fsp = d.terms["fsp"]
    return list(zip(fsp.pairs, fsp.student_pairs))


@pytest.mark.large
@family_pair
def test_resnet50_to_mobilenetv2(tmp_path):
    teacher = apps.ResNet50(weights=None, input_shape=SHAPE, classes=10, classifier_activation=None)
    student = apps.MobileNetV2(weights=None, input_shape=SHAPE, classes=10, alpha=0.35,
                               classifier_activation=None)
    ends = [("conv1_relu", "expanded_conv_project_BN"), ("conv2_block3_out", "block_2_add"),
            ("conv3_block4_out", "block_5_add"), ("conv4_block6_out", "block_12_add"),
            ("conv5_block3_out", "block_16_project_BN")]
    assert pairing.matched_section_ends(teacher, student) == ends
    d, _ = _distil_and_export(teacher, student, tmp_path)
    assert _pairs(d) == [((a[0], b[0]), (a[1], b[1])) for a, b in zip(ends[:-1], ends[1:])]
    assert "block_16_project_BN" in d.terms["fsp"].projections  # 112 -> 2048 channels


@pytest.mark.large
@family_pair
def test_a_student_with_a_layer_called_logits_distils_in_every_stage(tmp_path):
    # MobileNetV3Small's last convolution is named "logits" (a 1x1 map at
    # this size, paired with ResNet50's last section): keras_fsp's own keys
    # start with "/", so it is tapped like any other layer.
    teacher = apps.ResNet50(weights=None, input_shape=SHAPE, classes=10, classifier_activation=None)
    student = apps.MobileNetV3Small(weights=None, input_shape=SHAPE, classes=10, minimalistic=True,
                                    classifier_activation=None, include_preprocessing=False)
    d, _ = _distil_and_export(teacher, student, tmp_path)
    assert "logits" in {name for pair in d.terms["fsp"].student_pairs for name in pair}
    stages = {"at": keras_fsp.Stage("at", {"attention": 1.0, "task": 1.0})}
    hint = keras_fsp.terms.HintTerm("conv5_block3_out", "logits")  # (1, 1, 2048) <- (1, 1, 10)
    for model in (FSPDistiller(teacher, student, stages=stages, stage="at"),
                  FSPDistiller(teacher, student, terms=[hint], stage="hint")):
        model.compile(optimizer=keras.optimizers.SGD(0.001))
        history = model.fit(*_images(16), batch_size=16, epochs=1, verbose=0).history
        assert history and all(np.isfinite(v[0]) for v in history.values()), history
    assert hint.regressor is not None


@pytest.mark.large
@family_pair
def test_resnet50_to_a_cifar_resnet(tmp_path):
    teacher = apps.ResNet50(weights=None, input_shape=SHAPE, classes=10, classifier_activation=None)
    student = cifar_resnet(8, input_shape=SHAPE)
    # ResNet-50 halves 32x32 twice before its first stage; the CIFAR ResNet
    # keeps it: they share the 16x16 and 8x8 sections.
    assert pairing.matched_section_ends(teacher, student) == [
        ("conv1_relu", "stage2"), ("conv2_block3_out", "stage3")]
    d, _ = _distil_and_export(teacher, student, tmp_path)
    assert _pairs(d) == [(("conv1_relu", "conv2_block3_out"), ("stage2", "stage3"))]


@pytest.mark.large
@family_pair
def test_densenet121_to_efficientnetb0(tmp_path):
    teacher = apps.DenseNet121(weights=None, input_shape=SHAPE, classes=10, classifier_activation=None)
    student = apps.EfficientNetB0(weights=None, input_shape=SHAPE, classes=10, classifier_activation=None)
    ends = [("conv1_relu", "block1a_project_bn"), ("conv2_block6_concat", "block2b_add"),
            ("conv3_block12_concat", "block3b_add"), ("conv4_block24_concat", "block5c_add"),
            ("relu", "block7a_project_bn")]
    assert pairing.matched_section_ends(teacher, student) == ends
    d, _ = _distil_and_export(teacher, student, tmp_path)
    assert _pairs(d) == [((a[0], b[0]), (a[1], b[1])) for a, b in zip(ends[:-1], ends[1:])]


@pytest.mark.large
def test_keras_hub_resnets(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")

    def backbone(blocks, image_shape):
        return keras_hub.models.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64, 64],
            stackwise_num_blocks=blocks, stackwise_num_strides=[1, 2, 2], block_type="basic_block",
            image_shape=image_shape,
        )

    # A keras-hub classifier (the backbone nested in it) teaches a functional
    # model around a backbone built for any image size.
    teacher = keras_hub.models.ResNetImageClassifier(backbone=backbone([2, 2, 2], SHAPE), num_classes=10)
    inner = backbone([1, 1, 1], (None, None, 3))
    inputs = keras.Input(SHAPE)
    pooled = keras.layers.GlobalAveragePooling2D()(inner(inputs))
    student = keras.Model(inputs, keras.layers.Dense(10)(pooled), name="hub_student")
    t, s = teacher.backbone.name, inner.name
    assert pairing.matched_section_ends(teacher, student) == [
        (f"{t}/{n}", f"{s}/{m}") for n, m in [("conv1_relu", "conv1_relu"),
                                              ("stack0_block1_out", "stack0_block0_out"),
                                              ("stack1_block1_out", "stack1_block0_out"),
                                              ("stack2_block1_out", "stack2_block0_out")]]
    d, _ = _distil_and_export(teacher, student, tmp_path)
    assert len(_pairs(d)) == 3 and not d.terms["fsp"].projections
