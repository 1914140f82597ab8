import keras
import numpy as np
import pytest

from keras_fsp import pairing, taps
from keras_fsp.terms import LOGITS
from keras_fsp.papers import block_names, cifar_resnet


@pytest.mark.parametrize("depth,params", [(20, 0.27e6), (56, 0.85e6)])
def test_cifar_resnet_matches_he_et_al_sizes(depth, params):
    # He et al. 2016, table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters
    # (option A shortcuts; our two 1x1 projections add ~3k).
    model = cifar_resnet(depth)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert trainable == pytest.approx(params, rel=0.03)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D) and "shortcut" not in l.name]
    assert len(convs) + 1 == depth  # 6n+1 convolutions + the dense layer


def test_named_section_boundaries_and_blocks():
    model = cifar_resnet(14)
    shapes = {n: tuple(model.get_layer(n).output.shape) for n in ("stem", "stage1", "stage2", "stage3")}
    assert shapes == {
        "stem": (None, 32, 32, 16), "stage1": (None, 32, 32, 16),
        "stage2": (None, 16, 16, 32), "stage3": (None, 8, 8, 64),
    }
    assert block_names(model) == [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2)]


@pytest.mark.parametrize("depth", [7, 9, 0, "8"])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth)


@pytest.mark.parametrize("depth", [8, 26])
def test_section_pairs_are_each_sections_input_and_output(depth):
    assert pairing.section_pairs(cifar_resnet(depth)) == [
        ("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")
    ]


def test_section_pairs_of_a_plain_cnn():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="c3")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="c4")(x)
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, out)
    assert pairing.section_pairs(model) == [("c1", "c2"), ("c2", "c4")]


def test_tap_model_is_one_pass_over_shared_weights():
    model = cifar_resnet(8, input_shape=(16, 16, 3))
    view = taps.tap_model(model, ["stem", "stage2"])
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    out = view(x, training=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out[LOGITS]), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    stem = keras.Model(model.inputs, model.get_layer("stem").output)(x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out["stem"]), keras.ops.convert_to_numpy(stem), rtol=1e-6)
    assert {id(v) for v in view.weights} <= {id(v) for v in model.weights}


def test_wrong_layer_name_lists_the_closest_names():
    model = cifar_resnet(8)
    with pytest.raises(ValueError, match=r"no layer named 'stage_2'.*Closest layer names: \['stage2'"):
        taps.tap_model(model, ["stage_2"], role="student")


def test_subclassed_model_is_rejected():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(ValueError, match="functional"):
        taps.tap_model(Net(), ["dense"], role="teacher")
