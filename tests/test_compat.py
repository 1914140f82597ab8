"""Every Keras internal keras_fsp uses (keras_fsp.compat) still behaves as
relied on: a Keras release that changes one fails here, by name."""

import keras
import numpy as np
import pytest

from keras_fsp import compat
from tests.helpers import data, h5_contents, small_pair


def test_keras_version_is_one_these_internals_were_checked_on():
    assert keras.__version__.rsplit(".", 1)[0] in compat.TESTED_KERAS, keras.__version__


def test_consumers_are_the_layers_using_an_output():
    inputs = keras.Input((4,))
    a = keras.layers.Dense(3, name="a")
    h = a(inputs)
    b, c = keras.layers.Dense(2, name="b"), keras.layers.Dense(2, name="c")
    keras.Model(inputs, keras.layers.Add()([b(h), c(h)]))
    assert sorted(op.name for op in compat.consumers(a)) == ["b", "c"]


def test_sublayers_are_the_layer_and_those_it_holds():
    block = keras.Sequential([keras.layers.Dense(2, name="inner")], name="block")
    names = [layer.name for layer in compat.sublayers(block)]
    assert names[0] == "block" and "inner" in names


def test_regularization_loss_sums_the_models_losses():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(
        2, kernel_regularizer=keras.regularizers.L2(0.5), kernel_initializer="ones")])
    # 0.5 * sum(1^2 over 6 weights) = 3
    assert float(keras.ops.convert_to_numpy(compat.regularization_loss(model))) == pytest.approx(3.0)


def test_compiled_metrics_and_optimizer_internals():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert compat.compiled_metrics(model) is None
    model.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)),
                  loss="mse", metrics=["mae"])
    assert compat.compiled_metrics(model) in model.metrics
    model.optimizer.build(model.trainable_variables)
    assert compat.optimizer_variable_count(model.optimizer) == 2
    assert isinstance(compat.learning_rate(model.optimizer), keras.optimizers.schedules.ExponentialDecay)


def test_flush_jax_state_writes_the_state_back():
    teacher, student = small_pair()
    student.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # On JAX the variables hold no values inside fit until the state is written back.
            compat.flush_jax_state(student)
            after = np.array(keras.ops.convert_to_numpy(student.trainable_variables[0]))
            seen.append((after, getattr(student, "_jax_state", None)))

    x, y = data(n=16)
    start = np.array(keras.ops.convert_to_numpy(student.trainable_variables[0]))
    student.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[Probe()])
    after, state = seen[0]
    assert state is None
    assert not np.array_equal(start, after)  # the trained values are in the variable


def test_distribution_helpers_without_a_strategy():
    assert compat.num_replicas() == 1
    assert compat.is_multi_worker(None) is False


def test_pass_inputs_unconverted():
    class Echo(keras.layers.Layer):
        def call(self, x):
            return x

    x = keras.ops.convert_to_tensor(np.ones((2,)), dtype="float16")
    assert keras.backend.standardize_dtype(Echo(dtype="float32")(x).dtype) == "float32"
    layer = Echo(dtype="float32")
    compat.pass_inputs_unconverted(layer)
    assert keras.backend.standardize_dtype(layer(x).dtype) == "float16"


def test_symbolic_build_builds_model_metrics_and_all():
    model = keras.Sequential([keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    assert not model.built
    compat.symbolic_build(model, (np.zeros((4, 5), "float32"), np.zeros((4, 3), "float32")))
    assert model.built and compat.compiled_metrics(model).built
    assert [tuple(v.shape) for v in model.weights] == [(5, 3), (3,)]


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="a JAX trainer internal")
def test_state_sharding_spec_has_one_sharding_per_variable():
    import jax

    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs two devices (tests/conftest.py makes two host devices on JAX)")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices[:2]))
    try:
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
        model.optimizer.build(model.trainable_variables)
        spec = compat.state_sharding_spec(model)
        assert [len(s) for s in spec] == [len(model.trainable_variables), len(model.non_trainable_variables),
                                         len(model.optimizer.variables), len(model.metrics_variables)]
    finally:
        keras.distribution.set_distribution(None)


def _nested():
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dense(3, name="d")(inner_in), name="inner")
    inputs = keras.Input((4,))
    return inner, keras.Model(inputs, keras.layers.Dense(2, name="head")(inner(inputs)))


def test_is_graph_model_tells_functional_models_from_subclassed_ones():
    inner, outer = _nested()
    assert compat.is_graph_model(inner) and compat.is_graph_model(outer)

    class Overrides(keras.Model):
        def __init__(self):
            inputs = keras.Input((4,))
            super().__init__(inputs, keras.layers.Dense(2)(inputs))

        def call(self, x):
            return x

    assert not compat.is_graph_model(Overrides())
    assert not compat.is_graph_model(keras.layers.Dense(2))


def test_run_through_graph_calls_operation_fn_per_node():
    inner, outer = _nested()
    seen = []

    def operation_fn(layer):
        seen.append(layer.name)
        return layer

    x = np.ones((2, 4), "float32")
    out = compat.run_through_graph(outer, x, operation_fn)
    assert seen == ["inner", "head"]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), outer.predict(x, verbose=0), rtol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="Keras' JAX fit empties the variables")
def test_reattach_state_on_error_puts_the_given_state_back():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
        model.metrics_variables))
    for variable in model.trainable_variables:
        variable._value = None  # as Keras' fit leaves them before a step

    def fails(state, data):
        raise ValueError("a step that cannot be traced")

    with pytest.raises(ValueError, match="cannot be traced"):
        compat.reattach_state_on_error(model, fails)(state, None)
    assert [v.shape for v in model.get_weights()] == [(3, 2), (2,)]


def test_keep_unsaved_settings_carries_the_fused_attention_switch_to_a_copy():
    layer = compat.without_fused_attention(keras.layers.MultiHeadAttention(2, 4))
    assert layer._flash_attention is False
    copy = keras.layers.MultiHeadAttention.from_config(layer.get_config())
    assert copy._flash_attention is not False  # what the config loses
    assert compat.keep_unsaved_settings(layer, copy) is copy and copy._flash_attention is False
    dense = keras.layers.Dense(2, name="d")
    copy = compat.keep_unsaved_settings(dense, keras.layers.Dense.from_config(dense.get_config()))
    assert copy.get_config() == dense.get_config()


def _assert_same_h5(got, expected):
    assert list(got) == list(expected)
    for name, (values, attrs) in expected.items():
        assert got[name][1] == attrs, name
        if values is None:
            assert got[name][0] is None, name
        else:
            np.testing.assert_array_equal(got[name][0], values, err_msg=name)


def test_weights_h5_bytes_are_the_file_save_weights_writes_as_the_model_changes(tmp_path):
    from keras_fsp import FSPDistiller
    from keras_fsp.callbacks import StageSchedule
    from keras_fsp.terms import HintTerm

    teacher, student = small_pair()
    x, y = data(16)
    schedule = StageSchedule({0: "fsp", 1: "kd"}, verbose=0)
    for d in (FSPDistiller(teacher, student),
              FSPDistiller(teacher, student, terms=[HintTerm("stage2", "stage1")], stage="hint")):
        sizes = []
        # Compiled, trained (a stage switch within the fit), then compiled
        # again with an optimizer of more variables: a new plan.
        for step in ("sgd", "fit", "adam"):
            if step == "fit":
                d.fit(x, y, batch_size=8, epochs=2, verbose=0,
                      callbacks=[schedule] if d.stage.name == "fsp" else [])
            else:
                d.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9) if step == "sgd"
                          else keras.optimizers.Adam(1e-3))
            path = str(tmp_path / f"{step}.weights.h5")
            d.save_weights(path)
            written = compat.weights_h5_bytes(d)
            contents = h5_contents(written)
            _assert_same_h5(contents, h5_contents(path))
            assert compat._WRITE_PLANS[d][1] is not None  # the walk's plan was replayed
            assert compat.weights_h5_bytes(d) == written  # and is again
            sizes.append(len(contents))
        assert sizes[0] == sizes[1] < sizes[2]
