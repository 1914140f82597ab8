"""keras-hub transformers built from configs (no presets): a BERT text
classifier over dicts of token ids, segment ids and a padding mask, and a
ViT image classifier. Their encoder blocks are paired by path inside the
nested backbones; the padding mask keeps padded tokens out of every
feature term (against numpy references); each pair trains in the "kd"
stage and a feature stage, and its student saves, reloads and exports."""

import json
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

import keras_fsp
from keras_fsp import FSPDistiller, masks, pairing, taps, terms
from tests import reference

keras_hub = pytest.importorskip("keras_hub")

TENSORFLOW = keras.backend.backend() == "tensorflow"
# On JAX every forward pass of these networks outside a compiled step, and
# each step, compiles for seconds: more than the suite's budget allows. The
# masked maths runs on both backends (tests/test_masks.py), the training
# loop on both with other networks (tests/test_sequence_models.py).
TENSORFLOW_ONLY = pytest.mark.skipif(not TENSORFLOW, reason="compiles for too long on JAX; the "
                                     "exports but .keras are TensorFlow-only")
STEPS, VOCABULARY, CLASSES = 16, 100, 3
TOKEN_INPUTS = ("token_ids", "segment_ids", "padding_mask")


def _np(x):
    return ops.convert_to_numpy(x)


def _numpy_draw(initializer, shape, dtype=None):
    """A random initializer's values drawn by numpy: on JAX, Keras' random
    initializers compile once per weight shape, which would cost these
    tests most of their time."""
    scale = getattr(initializer, "stddev", None) or (np.prod(shape[:-1]) if len(shape) > 1 else 1) ** -0.5
    return np.random.default_rng(int(np.prod(shape))).normal(0.0, scale, shape).astype(dtype or "float32")


def _built_with_numpy_weights(build):
    random = (keras.initializers.TruncatedNormal, keras.initializers.RandomNormal,
              keras.initializers.VarianceScaling, keras.initializers.GlorotUniform)
    with pytest.MonkeyPatch.context() as patch:
        for cls in random:
            patch.setattr(cls, "__call__", _numpy_draw)
        return build()


def bert(layers, dim, name):
    """A BERT classifier over `STEPS` tokens: keras-hub's text models take
    sequences of any length, which the pairing cannot size, so a functional
    model gives it fixed-length inputs."""
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY, num_layers=layers, num_heads=2, hidden_dim=dim,
        intermediate_dim=2 * dim, max_sequence_length=STEPS, dropout=0.0)
    classifier = keras_hub.models.BertTextClassifier(backbone, CLASSES, preprocessor=None, dropout=0.0)
    inputs = {n: keras.Input((STEPS,), dtype="int32", name=n) for n in TOKEN_INPUTS}
    return keras.Model(inputs, classifier(inputs), name=name)


def vit(layers, dim, name):
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=layers, num_heads=2, hidden_dim=dim,
        mlp_dim=2 * dim)
    return keras_hub.models.ViTImageClassifier(backbone, CLASSES, preprocessor=None, name=name)


def token_data(n=16, seed=0):
    """Sequences of 3 to 16 tokens, padded with id 0; `padding_mask` 1 at tokens."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(STEPS)[None] < rng.integers(3, STEPS + 1, (n, 1))).astype("int32")
    x = {"token_ids": rng.integers(1, VOCABULARY, (n, STEPS)).astype("int32") * mask,
         "segment_ids": np.zeros((n, STEPS), "int32"), "padding_mask": mask}
    return x, rng.integers(0, CLASSES, n)


def image_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 16, 16, 3)).astype("float32"), rng.integers(0, CLASSES, n)


@pytest.fixture(scope="module")
def bert_pair():
    keras.utils.set_random_seed(0)
    return _built_with_numpy_weights(lambda: (bert(2, 32, "teacher"), bert(1, 16, "student")))


@pytest.fixture(scope="module")
def vit_pair():
    keras.utils.set_random_seed(0)
    return _built_with_numpy_weights(lambda: (vit(3, 32, "teacher"), vit(2, 16, "student")))


# ---------------------------------------------------------------- pairing


def test_the_encoder_blocks_are_found_by_path_inside_the_nested_backbones(bert_pair, vit_pair):
    bert_blocks = "bert_text_classifier{}/bert_backbone{}/"
    t, s = bert_blocks.format("", ""), bert_blocks.format("_1", "_1")
    assert pairing.section_ends(bert_pair[0]) == {1: t + "transformer_layer_0", 2: t + "transformer_layer_1"}
    assert pairing.matched_section_pairs(*bert_pair) == (
        [(t + "embeddings_layer_norm", t + "transformer_layer_1")],
        [(s + "embeddings_layer_norm", s + "transformer_layer_0")])
    # The ViT's blocks are inside one opaque ViTEncoder layer: traced as its stack.
    t, s = (f"{m.backbone.name}/vit_encoder/" for m in vit_pair)
    assert pairing.section_ends(vit_pair[0]) == {1: t + "transformer_block_1", 2: t + "transformer_block_2",
                                                 3: t + "ln"}
    assert pairing.matched_section_ends(*vit_pair) == [(t + "transformer_block_2", s + "transformer_block_1"),
                                                       (t + "ln", s + "ln")]
    x, _ = image_data(2)
    view = taps.tap_model(vit_pair[0], ["vit_encoder"])  # the stack's name: its output
    out = view(x, training=False)
    np.testing.assert_allclose(_np(out[taps.LOGITS]), _np(vit_pair[0](x, training=False)), rtol=1e-5, atol=1e-6)
    assert tuple(out["vit_encoder"].shape) == (2, 17, 32)
    assert masks.has_mask(bert_pair[0]) and not masks.has_mask(vit_pair[0])


# ---------------------------------------------------------- masked terms


def _tokens_at(x, layer, model):
    return {k: _np(v) for k, v in taps.tap_model(model, layer, False)(x, training=False).items()}


@TENSORFLOW_ONLY
def test_every_feature_term_keeps_padded_tokens_out_and_equals_its_numpy_reference(bert_pair):
    teacher, student = bert_pair
    t_ends, s_ends = zip(*pairing.matched_section_ends(teacher, student))
    t_last, s_last = t_ends[-1], s_ends[-1]
    cases = [terms.FSPTerm(), terms.HintTerm(), terms.AttentionTerm(),
             terms.RKDTerm(layers=(t_last, s_last))]
    d = FSPDistiller(teacher, student, terms=cases)
    for term in cases:
        assert masks.PADDING_MASK in term.student_taps, term.name
    x, y = token_data(8)
    # Other token ids at the padded positions: the features there change
    # (BERT's attention keeps them out of the tokens' features only).
    changed = dict(x, token_ids=np.where(x["padding_mask"] == 1, x["token_ids"], 7).astype("int32"))

    def value(term, batch):
        t = taps.tap_model(teacher, term.teacher_taps, False)(batch, training=False)
        s = taps.tap_model(student, term.student_taps, False)(batch, training=False)
        return _np(term.compute(s, term.teacher_targets(t), y)).mean(), s

    mask = x["padding_mask"]
    for term in cases:
        got, s = value(term, x)
        again, s_changed = value(term, changed)
        moved = np.abs(_np(s_changed[term.student_taps[0]]) - _np(s[term.student_taps[0]])).max()
        assert moved > 1e-3 and again == pytest.approx(got, rel=1e-5), term.name
        t, s = _tokens_at(x, term.teacher_taps, teacher), _tokens_at(x, term.student_taps, student)
        if isinstance(term, terms.FSPTerm):
            kernels = {n: _np(p.kernel) for n, p in term.projections.items()}
            s = {n: f @ kernels[n] if n in kernels else f for n, f in s.items()}
            want = reference.fsp_loss([reference.masked_fsp(t[a], t[b], mask) for a, b in term.pairs],
                                      [reference.masked_fsp(s[a], s[b], mask) for a, b in term.student_pairs])
        elif isinstance(term, terms.HintTerm):
            guided = s[term.guided_layer] @ _np(term.regressor.kernel) + _np(term.regressor.bias)
            want = reference.masked_hint_loss(t[term.hint_layer], guided, mask)
        elif isinstance(term, terms.AttentionTerm):
            want = reference.masked_attention_transfer_loss([t[a] for a, _ in term.pairs],
                                                            [s[b] for _, b in term.pairs], mask)
        else:
            valid = mask[..., None]
            want = reference.rkd_loss(t[t_last] * valid, s[s_last] * valid)
        assert got == pytest.approx(want, rel=1e-4), term.name


def test_a_network_with_a_mask_against_one_without_is_refused(bert_pair):
    teacher, student = bert_pair
    inputs = {n: keras.Input((STEPS,), dtype="int32", name=n) for n in TOKEN_INPUTS[:2]}
    unmasked = keras.Model(inputs, student.layers[-1]({**inputs, "padding_mask": ops.ones_like(inputs["token_ids"])}))
    with pytest.raises(ValueError, match="teacher takes a 'padding_mask' input and the student none"):
        FSPDistiller(teacher, unmasked, stage="hint")


# ----------------------------------------------------- training and export


def _export_and_check(student, x, tmp_path):
    """The student saved and reloaded by plain Keras (its file names no
    keras_fsp class), and served as a SavedModel (of token inputs: one
    image input is tests/test_export.py's) and by onnxruntime, all giving
    its outputs."""
    want = _np(student(x, training=False))
    path = keras_fsp.export_student(student, tmp_path / "student.keras", format="keras")
    with zipfile.ZipFile(path) as archive:
        assert "keras_fsp" not in json.dumps(json.loads(archive.read("config.json")))
    reloaded = keras.models.load_model(path, compile=False)
    np.testing.assert_allclose(_np(reloaded(x, training=False)), want, rtol=1e-5, atol=1e-5)
    feed = x if isinstance(x, dict) else {"inputs": x}
    if isinstance(x, dict):
        import tensorflow as tf

        serve = tf.saved_model.load(keras_fsp.export_student(student, tmp_path / "saved"))
        served = serve.signatures["serving_default"](**{k: tf.constant(v) for k, v in feed.items()})
        np.testing.assert_allclose(served["logits"].numpy(), want, rtol=1e-4, atol=1e-4)
    ort = pytest.importorskip("onnxruntime")
    onnx = keras_fsp.export_student(student, tmp_path / "student.onnx", format="onnx")
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == sorted(feed)
    assert [o.name for o in session.get_outputs()] == ["logits"]
    (out,) = session.run(None, feed)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


@TENSORFLOW_ONLY
@pytest.mark.parametrize("kind,stage", [("bert", "fsp"), ("vit", "hint")])
def test_a_keras_hub_pair_trains_in_kd_and_a_feature_stage_then_saves_and_exports(
        kind, stage, bert_pair, vit_pair, tmp_path):
    teacher, student = bert_pair if kind == "bert" else vit_pair
    x, y = token_data() if kind == "bert" else image_data()
    d = FSPDistiller(teacher, student, stage=stage)
    # Eager on TensorFlow: three steps of these tiny networks run faster
    # than they trace.
    d.compile(optimizer=keras.optimizers.Adam(0.01), run_eagerly=TENSORFLOW)
    feature = d.fit(x, y, batch_size=len(x), epochs=3, shuffle=False, verbose=0).history[f"{stage}_loss"]
    assert np.all(np.isfinite(feature)) and feature[0] > 1e-3 and feature[2] < feature[1] < feature[0], feature
    d.set_stage("kd")
    kd = d.fit(x, y, batch_size=len(x), epochs=2, shuffle=False, verbose=0).history
    # (The labels are random: the soft targets' term is what falls.)
    assert np.all(np.isfinite(kd["loss"])) and kd["kd_loss"][1] < kd["kd_loss"][0], kd
    _export_and_check(student, x, tmp_path)
