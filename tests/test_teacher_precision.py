"""The frozen teacher in a lower precision (keras_fsp.teacher_precision):
its outputs against numpy references of what it computes, its taps in every
term's reach, and the student untouched."""

import keras
import ml_dtypes
import numpy as np
import pytest
from keras import ops

from keras_fsp import FSPDistiller, taps, teacher_ensemble, teacher_in_precision
from keras_fsp.terms import HintTerm
from keras_fsp.teacher_precision import precision_of

# bfloat16 keeps 8 significant bits, float16 11: each rounding is within
# 2^-9 (2^-12) relative; a few layers of them, each error a fraction of the
# outputs' range, stay within a few units of that.
TOLERANCE = {"bfloat16": 2.0**-5, "float16": 2.0**-8}


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x)).astype("float32")


def _assert_close(got, expected, precision):
    """Within the precision's tolerance of the largest expected value."""
    error = np.abs(_numpy(got) - expected).max()
    assert error <= TOLERANCE[precision] * np.abs(expected).max(), error


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def _conv_net(name="conv_net"):
    """A convolution, a batch norm with its own statistics, a dense head."""
    x = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, name="conv")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    model = keras.Model(x, keras.layers.Dense(5, name="logits")(h), name=name)
    rng = np.random.default_rng(1)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.normal(size=4).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 4).astype("float32"))
    return model


def _conv_net_reference(model, x):
    """What `_conv_net` computes in inference mode, in numpy float32."""
    kernel, bias = (_numpy(v) for v in model.get_layer("conv").weights)
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # (b, 4, 4, c, 3, 3)
    h = np.einsum("bijcuv,uvcf->bijf", windows, kernel) + bias
    gamma, beta, mean, variance = (_numpy(v) for v in model.get_layer("bn").weights)
    h = (h - mean) / np.sqrt(variance + 1e-3) * gamma + beta
    h = np.maximum(h, 0.0).mean(axis=(1, 2))
    kernel, bias = (_numpy(v) for v in model.get_layer("logits").weights)
    return h @ kernel + bias


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_a_low_precision_teacher_computes_what_numpy_does_in_float32(precision):
    teacher = _conv_net()
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 2)).astype("float32")
    expected = _conv_net_reference(teacher, x)
    np.testing.assert_allclose(_numpy(teacher(x)), expected, rtol=1e-5, atol=1e-5)  # the reference

    low = teacher_in_precision(teacher, precision)
    got = low(x)
    assert _dtype(got) == precision
    _assert_close(got, expected, precision)
    # Weights stored in the precision, the batch norm's statistics in float32;
    # the names of the layers kept; frozen; the teacher given unchanged.
    stored = low.get_layer("conv").weights + low.get_layer("logits").weights
    assert {v.dtype for v in stored} == {precision}
    assert {v.dtype for v in low.get_layer("bn").weights} == {"float32"}
    assert low.get_layer("bn").compute_dtype == precision
    assert [layer.name for layer in low.layers] == [layer.name for layer in teacher.layers]
    assert not low.trainable and teacher.trainable
    assert {v.dtype for v in teacher.weights} == {"float32"}
    assert precision_of(low) == precision and precision_of(teacher) is None


def _mlp():
    x = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    return keras.Model(x, keras.layers.Dense(4, name="logits")(h), name="mlp")


def test_an_int8_teacher_quantizes_as_keras_int8_scheme_does_in_numpy():
    teacher = _mlp()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8)).astype("float32")
    low = teacher_in_precision(teacher, "int8")
    hidden = low.get_layer("hidden")
    assert hidden.quantization_mode == "int8" and low.get_layer("logits").quantization_mode is None

    # Weights: one abs-max scale per output channel, 127 / max |w|.
    kernel, bias = (_numpy(v) for v in teacher.get_layer("hidden").weights)
    scale = 127.0 / (np.abs(kernel).max(axis=0) + keras.config.epsilon())
    q_kernel = np.clip(np.round(kernel * scale), -127, 127).astype("int8")
    np.testing.assert_array_equal(ops.convert_to_numpy(hidden.kernel), q_kernel)
    np.testing.assert_allclose(_numpy(hidden.kernel_scale), scale, rtol=1e-6)

    # Inputs: quantized per row on the fly (in bfloat16, the layer's
    # compute dtype), an integer product, both scales divided out.
    x_low = x.astype(ml_dtypes.bfloat16).astype("float32")
    x_scale = 127.0 / (np.abs(x_low).max(axis=-1, keepdims=True) + keras.config.epsilon())
    q_x = np.clip(np.round(x_low * x_scale), -127, 127)
    h = np.maximum(q_x @ q_kernel.astype("float32") / (x_scale * scale) + bias, 0.0)
    # The logits' layer stays in bfloat16.
    head_kernel, head_bias = (_numpy(v) for v in teacher.get_layer("logits").weights)
    expected = h @ head_kernel + head_bias
    _assert_close(low(x), expected, "bfloat16")


def test_refusals_say_what_to_use():
    cnn = _conv_net("cnn")
    with pytest.raises(ValueError, match=r"'cnn' has no layer that Keras quantizes to int8 .* "
                                         r"use 'bfloat16' for it"):
        teacher_in_precision(cnn, "int8")
    with pytest.raises(ValueError, match="choose one of bfloat16, float16, int8"):
        teacher_in_precision(cnn, "float8")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    sub(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match=r"'sub' is a subclassed model.*set_dtype_policy"
                                         r"\('mixed_bfloat16'\).*quantize\('int8'\)"):
        teacher_in_precision(sub, "int8")

    class Unrebuildable(keras.layers.Layer):  # its config holds what its constructor refuses
        def get_config(self):
            return {**super().get_config(), "derived": 1}

        def call(self, x):
            return x

    x = keras.Input((4,))
    odd = keras.Model(x, keras.layers.Dense(2)(Unrebuildable(name="odd")(x)), name="odd_net")
    with pytest.raises(ValueError, match=r"'odd_net' cannot be copied into bfloat16: its layer "
                                         r"'odd' \(Unrebuildable\) does not rebuild from its own"):
        teacher_in_precision(odd, "bfloat16")
    low = teacher_in_precision(_mlp(), "float16")
    with pytest.raises(ValueError, match="stores its weights in float16 already"):
        teacher_in_precision(low, "int8")
    # The teacher itself: no precision, float32, or the one it is in.
    assert teacher_in_precision(cnn, None) is cnn and teacher_in_precision(cnn, "float32") is cnn
    assert teacher_in_precision(low, "float16") is low


def test_feature_terms_tap_a_bfloat16_teacher_and_the_student_stays_float32():
    low = teacher_in_precision(_conv_net("teacher"), "bfloat16")
    student = _conv_net("student")
    d = FSPDistiller(low, student, terms=[HintTerm("relu", "relu")], stage="hint")
    d.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6, 6, 2)).astype("float32"), rng.integers(0, 5, 8)
    assert _dtype(taps.tap_model(d.teacher, ["relu"])(x)["relu"]) == "bfloat16"

    before = _numpy(student.get_layer("conv").kernel)
    history = d.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["hint_loss"][0])
    assert {v.dtype for v in student.weights} == {"float32"}
    assert {v.dtype for v in d.optimizer.variables if "momentum" in v.path} == {"float32"}
    assert not np.array_equal(_numpy(student.get_layer("conv").kernel), before)  # it trained

    # Teacher caching: the cache holds the bfloat16 teacher's targets, and a
    # fit on it trains without running the teacher.
    cache = d.teacher_outputs(x, stage=["hint", "kd"])
    _assert_close(cache[taps.LOGITS], _numpy(d.teacher(x)), "bfloat16")
    d.set_stage("kd")
    history = d.fit({"inputs": x, "teacher": cache}, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["kd_loss"][0])


def test_ensembles_of_low_precision_teachers_keep_their_paths():
    a, b = _conv_net(), _conv_net()  # one name: "conv_net" and "conv_net_1" in the ensemble
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
    # Low-precision members, and the low-precision copy of an ensemble.
    of_low = teacher_ensemble([teacher_in_precision(m, "bfloat16") for m in (a, b)])
    low = teacher_in_precision(teacher_ensemble([a, b]), "bfloat16")
    expected = (_numpy(a(x)) + _numpy(b(x))) / 2
    for ensemble in (of_low, low):
        assert precision_of(ensemble) == "bfloat16"
        out = taps.tap_model(ensemble, ["conv_net/relu", "conv_net_1/relu"])(x)
        assert _dtype(out["conv_net_1/relu"]) == "bfloat16"
        _assert_close(out[taps.LOGITS], expected, "bfloat16")


def _token_net(name):
    """Tokens through the layers Keras quantizes (what a transformer's work is)."""
    x = keras.Input((4, 8))
    h = keras.layers.EinsumDense("btc,cd->btd", (None, 8), bias_axes="d", name="mix")(x)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Dense(8, activation="relu", name="block")(h)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(5, name="logits")(h), name=name)


def test_an_int8_teacher_of_tokens_teaches_hints():
    teacher = teacher_in_precision(_token_net("teacher"), "int8")
    modes = {n: teacher.get_layer(n).quantization_mode for n in ("mix", "block", "logits")}
    assert modes == {"mix": "int8", "block": "int8", "logits": None}
    assert teacher.get_layer("mix").kernel.dtype == "int8"
    d = FSPDistiller(teacher, _token_net("student"), terms=[HintTerm("block", "block")],
                     stage="hint")
    d.compile(optimizer=keras.optimizers.SGD(1e-3))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4, 8)).astype("float32"), rng.integers(0, 5, 8)
    history = d.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["hint_loss"][0])


def test_the_command_line_refuses_a_bad_teacher_precision_in_one_line(tmp_path):
    pytest.importorskip("sklearn")  # the digits data set
    from keras_fsp.apps import cli

    x = keras.Input((8, 8, 1))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="conv")(x))
    path = tmp_path / "cnn.keras"
    keras.Model(x, keras.layers.Dense(10, name="logits")(h), name="cnn").save(path)
    model_dir = tmp_path / "run"
    distill = ["keras-fsp", "distill", "--dataset=digits", "--method=kd", f"--teacher={path}",
               f"--model_dir={model_dir}"]
    cases = {
        "--teacher_precision=float8": "flag --teacher_precision=float8: value should be one of "
                                      "<bfloat16|float16|int8>",
        "--teacher_precision=int8": f"--teacher_precision int8 (--teacher {path}): the teacher "
                                    "'cnn' has no layer that Keras quantizes to int8",
    }
    for flag, expected in cases.items():
        with pytest.raises(cli.CLIError) as error:
            cli.run([*distill, flag])
        assert expected in error.value.message and "\n" not in error.value.message
        assert error.value.code == 2
    assert not model_dir.exists()
