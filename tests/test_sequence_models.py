"""FSP, hints and attention transfer over sequences `(batch, steps,
channels)`: the maths against numpy references, the automatic pairing of
transformers (by blocks) and Conv1D networks (by length), and both kinds
trained in the built-in stages with no layer named."""

import keras
import numpy as np
import pytest
from keras import layers, ops

from keras_fsp import FSPDistiller, pairing, taps, terms
from keras_fsp.terms import FSPTerm, HintTerm
from tests import reference
from tests.helpers import small_pair

RNG = np.random.default_rng(0)


def _np(x):
    return ops.convert_to_numpy(x)


class NumpyNormal(keras.initializers.Initializer):
    """LeCun-normal weights drawn by numpy: on JAX, Keras' random
    initializers compile once per weight shape, which would cost these tests
    most of their time."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def __call__(self, shape, dtype=None):
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return self.rng.normal(0.0, fan_in ** -0.5, shape).astype(dtype or "float32")


def transformer(depth, dim, name, pre_norm=True, steps=8, vocab=40):
    """A tiny functional Transformer classifier over token ids; block `i`'s
    residual adds are `block{i}_add1` (attention) and `block{i}_add2`."""
    init = NumpyNormal(depth * dim)
    tokens = keras.Input((steps,), dtype="int32")
    x = layers.Embedding(vocab, dim, embeddings_initializer=init, name="embed")(tokens)
    for i in range(depth):
        for j, sublayer in ((1, "attention"), (2, "mlp")):
            h = layers.LayerNormalization(name=f"block{i}_ln{j}")(x) if pre_norm else x
            if sublayer == "attention":
                h = layers.MultiHeadAttention(2, dim // 2, kernel_initializer=init,
                                              name=f"block{i}_attention")(h, h)
            else:
                h = layers.Dense(2 * dim, activation="gelu", kernel_initializer=init,
                                 name=f"block{i}_mlp_in")(h)
                h = layers.Dense(dim, kernel_initializer=init, name=f"block{i}_mlp_out")(h)
            x = layers.Add(name=f"block{i}_add{j}")([x, h])
            if not pre_norm:
                x = layers.LayerNormalization(name=f"block{i}_ln{j}")(x)
    if pre_norm:
        x = layers.LayerNormalization(name="final_ln")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(tokens, layers.Dense(10, kernel_initializer=init, name="logits")(x), name=name)


def conv1d_net(widths, convs, name, steps=32):
    """A Conv1D network over time steps: section `s` has `convs` convolutions
    of `widths[s]` channels, the first strided by 2 after section 0."""
    init = NumpyNormal(convs)
    x = inputs = keras.Input((steps, 3))
    for s, width in enumerate(widths):
        for c in range(convs):
            stride = 2 if s and not c else 1
            x = layers.Conv1D(width, 3, strides=stride, padding="same", kernel_initializer=init,
                              name=f"conv{s}_{c}")(x)
            x = layers.BatchNormalization(name=f"bn{s}_{c}")(x)
            x = layers.ReLU(name=f"relu{s}_{c}")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(10, kernel_initializer=init, name="logits")(x), name=name)


def transformer_pair():
    keras.utils.set_random_seed(0)
    return transformer(4, 8, "teacher"), transformer(2, 4, "student")


def conv1d_pair():
    keras.utils.set_random_seed(0)
    return conv1d_net((8, 8, 8), 2, "teacher"), conv1d_net((4, 4, 4), 1, "student")


def token_data(n=16):
    return RNG.integers(0, 40, (n, 8)), RNG.integers(0, 10, n)


def step_data(n=16):
    return RNG.normal(size=(n, 32, 3)).astype("float32"), RNG.integers(0, 10, n)


PAIRS = {"transformer": (transformer_pair, token_data), "conv1d": (conv1d_pair, step_data)}


# ------------------------------------------------------------------ maths


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("lengths", [(6, 6), (12, 4), (4, 8)])
def test_fsp_matrix_of_sequences_equals_numpy_reference(mode, lengths):
    f1, f2 = RNG.normal(size=(3, lengths[0], 4)), RNG.normal(size=(3, lengths[1], 5))
    g = _np(terms.fsp_matrix(f1.astype("float32"), f2.astype("float32"), pooling=mode))
    assert g.shape == (3, 4, 5)
    np.testing.assert_allclose(g, reference.fsp(f1, f2, mode), rtol=1e-4, atol=1e-5)


def test_sequence_lengths_that_do_not_divide_are_an_error_saying_what_to_do():
    with pytest.raises(ValueError, match=r"\(2, 6, 3\) and \(2, 4, 3\).*integer multiple.*"
                                         r"Tap layers whose sizes divide"):
        terms.fsp_matrix(np.ones((2, 6, 3)), np.ones((2, 4, 3)))
    # Tokens beside a map are its grid of patches: 4 tokens with a 2 x 2 map; 3 make none.
    tokens, grid = np.random.RandomState(0).rand(2, 4, 3), np.random.RandomState(1).rand(2, 2, 2, 3)
    np.testing.assert_allclose(_np(terms.fsp_matrix(tokens, grid)),
                               reference.fsp(tokens.reshape(2, 2, 2, 3), grid), rtol=1e-5)
    with pytest.raises(ValueError, match="3 tokens with a map of 2 x 2 positions"):
        terms.fsp_matrix(np.ones((2, 3, 3)), np.ones((2, 2, 2, 3)))
    with pytest.raises(ValueError, match="one rank"):
        terms.fsp_matrix(np.ones((2, 4, 3)), np.ones((2, 2, 2, 2, 3)))


def test_attention_map_of_sequences_pools_groups_of_steps():
    f = RNG.normal(size=(3, 8, 5)).astype("float32")
    np.testing.assert_allclose(_np(terms.attention_map(f)), reference.attention_map(f), rtol=1e-5)
    q = _np(terms.attention_map(f, size=(2,)))
    np.testing.assert_allclose(q, reference.attention_map(f, length=2), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------- pairing


def test_a_pre_norm_transformer_is_paired_by_blocks_grouped_evenly():
    teacher, student = transformer_pair()
    assert pairing.section_ends(teacher) == {1: "block0_add2", 2: "block1_add2", 3: "block2_add2",
                                             4: "final_ln"}
    assert pairing.section_start(teacher) == "embed"
    # 4 blocks against 2: the teacher's second and fourth with the student's two.
    assert pairing.matched_section_ends(teacher, student) == [("block1_add2", "block0_add2"),
                                                              ("final_ln", "final_ln")]
    assert pairing.matched_section_pairs(teacher, student) == (
        [("embed", "block1_add2"), ("block1_add2", "final_ln")],
        [("embed", "block0_add2"), ("block0_add2", "final_ln")])
    # 3 blocks against 2: the deeper's at the nearest relative depth (2/3 for 1/2).
    assert pairing.matched_section_ends(transformer(3, 8, "t3"), student) == [
        ("block1_add2", "block0_add2"), ("final_ln", "final_ln")]


def test_a_post_norm_transformer_ends_its_blocks_after_the_normalisation():
    model = transformer(2, 4, "post", pre_norm=False)
    assert pairing.section_ends(model) == {1: "block0_ln2", 2: "block1_ln2"}
    assert pairing.section_start(model) == "embed"


def test_a_conv1d_network_is_paired_by_sequence_length():
    teacher, student = conv1d_pair()
    assert pairing.section_ends(teacher) == {(32,): "relu0_1", (16,): "relu1_1", (8,): "relu2_1"}
    assert pairing.matched_section_ends(teacher, student) == [
        ("relu0_1", "relu0_0"), ("relu1_1", "relu1_0"), ("relu2_1", "relu2_0")]


def test_a_nested_encoder_is_paired_by_path():
    def classifier(dim, name):
        blocks = transformer(2, dim, f"{name}_blocks")
        encoder = keras.Model(blocks.input, blocks.get_layer("final_ln").output, name="encoder")
        tokens = keras.Input((8,), dtype="int32")
        pooled = layers.GlobalAveragePooling1D()(encoder(tokens))
        return keras.Model(tokens, layers.Dense(10, name="logits")(pooled), name=name)

    teacher, student = classifier(8, "teacher"), classifier(4, "student")
    pairs = [("encoder/embed", "encoder/block0_add2"), ("encoder/block0_add2", "encoder/final_ln")]
    assert pairing.matched_section_pairs(teacher, student) == (pairs, pairs)
    term = FSPDistiller(teacher, student, stage="fsp").terms["fsp"]
    x, _ = token_data(4)
    got, _ = term.matrices_of(teacher, student, x)
    features = {k: _np(v) for k, v in taps.tap_model(teacher, pairs[1], False)(x, training=False).items()}
    np.testing.assert_allclose(got[1], reference.fsp(*(features[n] for n in pairs[1])), rtol=1e-4, atol=1e-5)


def test_an_opaque_keras_hub_encoder_layer_is_a_block():
    keras_hub = pytest.importorskip("keras_hub")
    tokens = keras.Input((8,), dtype="int32")
    x = layers.Embedding(40, 8, name="embed")(tokens)
    for i in range(3):
        x = keras_hub.layers.TransformerEncoder(16, 2, name=f"encoder{i}")(x)
    model = keras.Model(tokens, layers.Dense(10)(layers.GlobalAveragePooling1D()(x)))
    assert pairing.section_ends(model) == {1: "encoder0", 2: "encoder1", 3: "encoder2"}
    assert pairing.section_start(model) == "embed"


def test_networks_without_a_usable_trunk_or_of_different_kinds_are_refused():
    mlp = keras.Sequential([keras.Input((12,)), layers.Dense(8), layers.Dense(10)], name="mlp")
    with pytest.raises(ValueError, match=r"'mlp' has no feature maps or sequences of known size on "
                                         r"its trunk.*name the layers"):
        FSPDistiller(mlp, keras.models.clone_model(mlp), stage="fsp")
    # A transformer beside a network whose sections change length pairs by
    # depth where the lengths pool (here 8 tokens with 32, 16 and 8 steps) ...
    teacher, student = transformer_pair()[0], conv1d_pair()[1]
    assert pairing.matched_section_ends(teacher, student) == [
        ("block0_add2", "relu0_0"), ("block2_add2", "relu1_0"), ("final_ln", "relu2_0")]
    # ... and 8 tokens make no grid of a square map.
    from keras_fsp.papers import cifar_resnet

    with pytest.raises(ValueError, match="computes in blocks over 8 tokens and the student in "
                                         "sections of several sizes, none of whose maps"):
        pairing.matched_section_ends(teacher, cifar_resnet(8))


def test_the_hint_layers_are_chosen_in_the_middle_when_none_are_named():
    d = FSPDistiller(*small_pair(), stage="hint")  # the CIFAR ResNets: stage2, as FitNets
    hint = d.terms["hint"]
    assert (hint.hint_layer, hint.guided_layer, hint.regressor) == ("stage2", "stage2", None)
    hint = FSPDistiller(*transformer_pair(), stage="hint").terms["hint"]
    assert (hint.hint_layer, hint.guided_layer) == ("block1_add2", "block0_add2")
    assert isinstance(hint.regressor, layers.Dense) and hint.regressor.kernel.shape == (4, 8)


def test_the_papers_methods_pair_sequence_models_by_themselves():
    from keras_fsp.papers import methods

    teacher, student = transformer_pair()
    built = {name: methods.get(name).build(teacher, student, steps_per_epoch=1, scale=1e-4).model
             for name in ("fsp", "fitnet", "at")}
    assert built["fsp"].terms["fsp"].student_pairs == [("embed", "block0_add2"), ("block0_add2", "final_ln")]
    assert built["fitnet"].terms["hint"].guided_layer == "block0_add2"
    assert built["at"].terms["attention"].pairs == [("block1_add2", "block0_add2"), ("final_ln", "final_ln")]


# ---------------------------------------------------------------- training


def _expected(term, teacher, student, x):
    """The term's value at the networks' weights on `x`, from numpy
    references on their taps."""
    t = {k: _np(v) for k, v in taps.tap_model(teacher, term.teacher_taps, False)(x, training=False).items()}
    s = {k: _np(v) for k, v in taps.tap_model(student, term.student_taps, False)(x, training=True).items()}
    if isinstance(term, FSPTerm):
        kernels = {n: _np(p.kernel) for n, p in term.projections.items()}
        projected = {n: f @ kernels[n] if n in kernels else f for n, f in s.items()}
        return reference.fsp_loss([reference.fsp(t[a], t[b]) for a, b in term.pairs],
                                  [reference.fsp(projected[a], projected[b]) for a, b in term.student_pairs])
    if isinstance(term, HintTerm):
        hint, guided = t[term.hint_layer], s[term.guided_layer]
        length = min(hint.shape[1], guided.shape[1])
        hint, guided = reference.pool_steps(hint, length), reference.pool_steps(guided, length)
        if term.regressor is not None:
            guided = guided @ _np(term.regressor.kernel) + _np(term.regressor.bias)
        return reference.hint_loss(hint, guided)
    return reference.attention_transfer_loss([t[a] for a, _ in term.pairs], [s[b] for _, b in term.pairs])


def _fit(d, x, y, epochs=4):
    d.compile(optimizer=keras.optimizers.Adam(0.05))
    return d.fit(x, y, batch_size=len(x), epochs=epochs, shuffle=False, verbose=0).history


@pytest.mark.parametrize("stage", ["fsp", "hint", "attention"])
@pytest.mark.parametrize("kind", ["transformer", "conv1d"])
def test_sequence_models_train_in_the_builtin_stages_with_no_layer_named(kind, stage):
    make, data = PAIRS[kind]
    teacher, student = make()
    x, y = data()
    d = FSPDistiller(teacher, student, stage=stage)
    term = d.terms[stage]
    expected = _expected(term, teacher, student, x)
    history = _fit(d, x, y)
    losses = history["loss"]
    # One whole-batch step an epoch: the first epoch's value is the term at
    # the initial weights.
    assert history[f"{stage}_loss"][0] == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-3 and np.all(np.isfinite(losses)) and losses[-1] < losses[0], history


def test_hints_and_attention_between_sequences_of_different_lengths():
    teacher, student = conv1d_pair()
    x, y = step_data()
    cases = [HintTerm("relu1_1", "relu0_0", name="pooled_guided"),  # 16 steps <- 32, 8 <- 4 channels
             HintTerm("relu0_1", "relu1_0", name="pooled_hint"),  # 32 steps <- 16
             terms.AttentionTerm([("relu1_1", "relu0_0"), ("relu0_1", "relu1_0")], name="at")]
    d = FSPDistiller(teacher, student, terms=cases)
    assert d.terms["pooled_hint"].target_shapes(teacher) == {"/hint/16/relu0_1": (16, 8)}
    for term in cases:  # the terms on the networks' taps, as a step computes them
        t = taps.tap_model(teacher, term.teacher_taps, False)(x, training=False)
        s = taps.tap_model(student, term.student_taps, False)(x, training=True)
        value = _np(term.compute(s, term.teacher_targets(t), y)).mean()
        assert value == pytest.approx(_expected(term, teacher, student, x), rel=1e-4), term.name
