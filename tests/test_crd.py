"""CRD: the loss against a numpy reference, its FIFO queues (filled inside
the compiled step on both backends, scanned epochs too, with a teacher
cache), their checkpoint and resumption, per-replica queues under
tf.distribute, and the two methods of the table."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp import FSPDistiller, Stage, jax_steps
from keras_fsp.papers import methods
from keras_fsp.terms import CRDTerm
from keras_fsp.training import RunFolder
from tests import reference

RNG = np.random.default_rng(0)
BATCH, QUEUE, DIM = 8, 10, 4  # 3 batches fill the queue of 10 and wrap around


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _net(name, width, seed):
    """A tiny network whose penultimate features are `"features"` (no batch
    norm or dropout: training and inference give the same features)."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6,))
    f = keras.layers.Dense(width, activation="relu", name="features")(x)
    return keras.Model(x, keras.layers.Dense(3, name="logits")(f), name=name)


def _pair(seed=0):
    return _net("teacher", 7, seed), _net("student", 5, seed + 1)


def _data(n=3 * BATCH):
    rng = np.random.default_rng(1)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def _features(net, x):
    """A `_net`'s penultimate features in numpy (on JAX, running the layer
    op by op would compile each op)."""
    kernel, bias = (_np(w) for w in net.get_layer("features").weights)
    return np.maximum(x @ kernel + bias, 0.0)


def _embeddings(term, teacher_features, student_features):
    """The term's embeddings of the features, in numpy."""
    return tuple(reference.crd_embedding(f, *(_np(w) for w in layer.weights))
                 for f, layer in ((teacher_features, term.teacher_embedding),
                                  (student_features, term.student_embedding)))


def _compute(term, student, teacher):
    """`term.compute` on numpy features, its queue updates kept; on JAX in
    one compiled function (op by op, each op compiles on its own)."""
    def run():
        return term.compute({"features": student}, {"features": teacher}, None)

    if keras.backend.backend() != "jax":
        return _np(run())
    import jax

    variables = term.variables

    def stateless(values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
            value = run()
        return value, [scope.get_current_value(v) for v in variables]

    value, values = jax.jit(stateless)([v.value for v in variables])
    for variable, new in zip(variables, values):
        variable.assign(new)
    return _np(value)


def _queue_state(term):
    return [_np(v) for v in (term.teacher_queue, term.student_queue, term.queue_pointer,
                             term.queue_filled)]


def test_crd_equals_numpy_reference_on_the_filled_slots_and_its_queue_wraps_around():
    teacher, student = _pair()
    term = CRDTerm(queue_size=QUEUE, embedding_dim=DIM, temperature=0.5)
    FSPDistiller(teacher, student, terms=[term], stages={"crd": Stage("crd", {"crd": 1.0})},
                 stage="crd")
    assert term.layers == ("features", "features")
    queues = [RNG.normal(size=(QUEUE, DIM)) for _ in range(2)]
    queues = [(q / np.linalg.norm(q, axis=1, keepdims=True)).astype("float32") for q in queues]
    # Slots 0-6 filled, the next to write is 7 (slots 7-9 hold garbage that
    # must not count): a batch of 4 writes slots 7, 8, 9 and 0.
    for q in queues:
        q[7:] = 50.0
    for variable, value in zip((term.teacher_queue, term.student_queue, term.queue_pointer,
                                term.queue_filled), (*queues, 7, 7)):
        variable.assign(value)
    ft = RNG.normal(size=(4, 7)).astype("float32")
    fs = RNG.normal(size=(4, 5)).astype("float32")
    t, s = _embeddings(term, ft, fs)
    got = _compute(term, fs, ft)
    valid = np.arange(QUEUE) < 7
    expected = 0.8 * reference.crd_loss(t, s, queues[0][valid], queues[1][valid], temperature=0.5)
    assert got.shape == (4,)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    teacher_queue, student_queue, pointer, filled = _queue_state(term)
    assert (int(pointer), int(filled)) == (1, 10)
    order = [7, 8, 9, 0]
    np.testing.assert_allclose(teacher_queue[order], t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(student_queue[order], s, rtol=1e-5, atol=1e-6)
    untouched = [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(teacher_queue[untouched], queues[0][untouched])
    # Now every slot counts (the queue is full).
    full = _compute(term, fs, ft)
    np.testing.assert_allclose(full, 0.8 * reference.crd_loss(t, s, teacher_queue, student_queue,
                                                             temperature=0.5), rtol=1e-4)
    # A batch larger than the queue leaves its last 10, as one by one would.
    term.queue_pointer.assign(3)
    ft, fs = RNG.normal(size=(13, 7)).astype("float32"), RNG.normal(size=(13, 5)).astype("float32")
    _compute(term, fs, ft)
    t, _ = _embeddings(term, ft, fs)
    teacher_queue, _, pointer, _ = _queue_state(term)
    slots = (6 + np.arange(10)) % QUEUE  # example k would go to (3 + k) % 10: 3-12 to 6, ..., 5
    np.testing.assert_allclose(teacher_queue[slots], t[3:], rtol=1e-5, atol=1e-6)
    assert int(pointer) == 16 % QUEUE
    term.queue_filled.assign(0)  # an empty queue, the first step's: no negatives, 0
    assert np.all(_compute(term, fs, ft) == 0.0)


def _crd_recipe(method="crd-kd", seed=0, **kwargs):
    return methods.get(method).build(*_pair(seed), steps_per_epoch=3, scale=1e-4,
                                     queue_size=QUEUE, embedding_dim=DIM, **kwargs)


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_after_training_steps_the_queues_hold_the_last_embeddings(steps_per_execution, monkeypatch):
    # The queues are assigned inside compute_loss: on JAX they reach the
    # model only as the step's non-trainable updates (Keras' trainer), also
    # through keras_fsp's scanned steps (steps_per_execution 3). A learning
    # rate of 0 keeps the embeddings what they were at every step; the
    # teacher is cached (its target is the penultimate features).
    monkeypatch.setattr(jax_steps, "ON_CPU", True)
    recipe = _crd_recipe("crd", lr=0.0)
    recipe.compile(steps_per_execution=steps_per_execution)
    d, term = recipe.model, recipe.model.terms["crd"]
    assert jax_steps.applies(d) == (keras.backend.backend() == "jax" and steps_per_execution > 1)
    assert term.target_shapes(d.teacher) == {"features": (7,)}  # what a cache holds
    x, y = _data()
    cache = {"features": _features(d.teacher, x).astype("float32")}
    history = d.fit({"inputs": x, "teacher": cache}, y, batch_size=BATCH, epochs=1, shuffle=False,
                    verbose=0, callbacks=recipe.callbacks).history
    assert np.isfinite(history["loss"][0]) and history["crd_loss"][0] > 0
    t, s = _embeddings(term, cache["features"], _features(recipe.student, x))
    teacher_queue, student_queue, pointer, filled = _queue_state(term)
    assert (int(pointer), int(filled)) == (len(x) % QUEUE, QUEUE)
    # slot (pointer + j) % QUEUE holds the j-th of the last QUEUE embeddings
    slots = (int(pointer) + np.arange(QUEUE)) % QUEUE
    np.testing.assert_allclose(teacher_queue[slots], t[-QUEUE:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(student_queue[slots], s[-QUEUE:], rtol=1e-4, atol=1e-5)


def test_the_methods_train_both_embeddings_and_a_checkpoint_restores_the_queues(tmp_path):
    teacher, student = _pair()
    alone = methods.get("crd").build(teacher, student, steps_per_epoch=10)
    assert alone.schedule[0].terms == {"crd": 1.0, "task": 1.0}
    term = alone.model.terms["crd"]  # RepDistiller's -b 0.8 --feat_dim 128 --nce_t 0.07 --nce_k 16384
    assert (term.beta, term.embedding_dim, term.temperature, term.queue_size) == (0.8, 128, 0.07, 16384)
    with_kd = methods.get("crd-kd").build(teacher, student, steps_per_epoch=10, temperature=2.0)
    assert with_kd.schedule[0].terms == {"crd": 1.0, "task": 1.0, "kd": 1.0}  # -r 1 -a 1
    assert with_kd.model.terms["kd"].temperature == 2.0 and with_kd.name == "crd-kd"
    assert methods.get("crd").options == () and methods.get("crd-kd").options == ("temperature",)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(term))
    assert isinstance(clone, CRDTerm) and clone.get_config() == term.get_config()
    with pytest.raises(ValueError, match=r"temperature > 0"):
        CRDTerm(temperature=0.0)

    recipe = _crd_recipe("crd")
    recipe.compile()
    term = recipe.model.terms["crd"]
    before = [_np(w) for w in term.trainable_weights]
    assert len(before) == 4  # the student's and the teacher's embedding
    x, y = _data()
    history = recipe.model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                               callbacks=recipe.callbacks).history
    assert np.isfinite(history["loss"][0]) and history["crd_loss"][0] > 0
    assert all(np.abs(a - _np(b)).max() > 0 for a, b in zip(before, term.trainable_weights))
    # The run folder's checkpoint, restored into a new distiller (other
    # initial weights, empty queues) as a resumed run does.
    checkpoints = RunFolder(tmp_path).checkpoints()
    checkpoints.save(recipe.model, 1)
    saved = _queue_state(term) + [_np(w) for w in term.weights]
    assert int(saved[2]) == 3 * BATCH % QUEUE and int(saved[3]) == QUEUE
    resumed = _crd_recipe("crd", seed=5)
    resumed.compile()
    assert checkpoints.restore(resumed.model) == 1
    restored = resumed.model.terms["crd"]
    for a, b in zip(saved, _queue_state(restored) + [_np(w) for w in restored.weights]):
        np.testing.assert_array_equal(a, b)


def test_under_mirrored_strategy_each_replica_keeps_its_own_queue(mirrored_strategy, tmp_path):
    with mirrored_strategy.scope():
        teacher, student = _pair()
        term = CRDTerm(queue_size=QUEUE, embedding_dim=DIM)
        d = FSPDistiller(teacher, student, terms=[term],
                         stages={"crd": Stage("crd", {"crd": 1.0, "task": 1.0})}, stage="crd")
        d.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    x, y = _data()
    d.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    replicas = mirrored_strategy.experimental_local_results
    # 3 steps of 4 examples per replica
    assert [int(_np(p)) for p in replicas(term.queue_pointer.value)] == [2, 2]
    first, second = (_np(q) for q in replicas(term.student_queue.value))
    assert np.abs(first - second).max() > 1e-3  # each replica's own share of the batches
    d.save_weights(tmp_path / "d.weights.h5")
    d.load_weights(tmp_path / "d.weights.h5")  # a checkpoint holds the first replica's
    for queue in replicas(term.student_queue.value):
        np.testing.assert_array_equal(_np(queue), first)
