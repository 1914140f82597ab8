"""Vision Transformers for CIFAR (`keras_fsp.papers.vit`), their recipe
(`recipes.with_adamw`, `augment.Cutout`) and the ViT results tables."""

import keras
import numpy as np
import pytest

from keras_fsp import FSPDistiller, compat, pairing
from keras_fsp.augment import Cutout
from keras_fsp.callbacks import StageSchedule
from keras_fsp.papers import recipes
from keras_fsp.papers.vit import cifar_vit


@pytest.fixture(scope="module")
def vits():
    return (cifar_vit(depth=3, width=32, heads=2, name="vit_t"),
            cifar_vit(depth=2, width=16, heads=2, name="vit_s"))


def test_tokens_are_the_patch_grid_row_by_row_plus_a_position_each(vits):
    teacher, _ = vits
    x = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    view = keras.Model(teacher.inputs, [teacher.get_layer(n).output for n in ("patches", "tokens")])
    patches, tokens = (np.asarray(v) for v in view(x))
    position = np.asarray(teacher.get_layer("tokens").embeddings)
    assert position.shape == (64, 32)
    np.testing.assert_allclose(tokens, patches.reshape(2, 64, 32) + position, rtol=1e-6, atol=1e-6)
    # Pairing finds the blocks by their attention: two ViTs pair by depth.
    assert list(pairing.section_ends(teacher).values()) == ["block1", "block2", "norm"]
    assert pairing.section_start(teacher) == "tokens"


def test_vit_attention_never_takes_the_fused_kernel(vits):
    # The fused bfloat16 kernel went to NaN training a ViT on a GPU
    # (compat.without_fused_attention); the flag is Keras' private one.
    for model in vits:
        attention = [l for l in model.layers if isinstance(l, keras.layers.MultiHeadAttention)]
        assert len(attention) == len([l for l in model.layers if l.name.endswith("_attention")])
        assert attention and all(layer._flash_attention is False for layer in attention)


def test_a_saved_vit_loads_and_gives_the_same_logits(vits, tmp_path):
    _, student = vits
    path = str(tmp_path / "vit.keras")
    student.save(path)
    x = np.random.RandomState(1).rand(3, 32, 32, 3).astype("float32")
    np.testing.assert_allclose(np.asarray(keras.models.load_model(path)(x)), np.asarray(student(x)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="patch_size 5 must divide"):
        cifar_vit(depth=1, width=8, heads=2, patch_size=5)


def _cut_square(image_before, image_after):
    """The zeroed region of an all-ones image, as (rows, columns) spans."""
    zero = np.all(image_after == 0, axis=-1)
    rows, cols = np.where(zero.any(axis=1))[0], np.where(zero.any(axis=0))[0]
    return zero, rows, cols


def test_cutout_zeroes_one_clipped_square_per_image_and_nothing_when_not_training():
    size = 6
    x = np.ones((64, 16, 16, 3), "float32")
    out = np.asarray(Cutout(size, seed=3)(x, training=True))
    assert np.array_equal(np.asarray(Cutout(size)(x, training=False)), x)
    heights = set()
    for before, after in zip(x, out):
        zero, rows, cols = _cut_square(before, after)
        assert rows.size and cols.size  # a centre inside the image always cuts something
        # One axis-aligned rectangle of contiguous rows and columns, all channels.
        assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))
        assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))
        expected = np.zeros((16, 16), bool)
        expected[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
        assert np.array_equal(zero, expected)
        # size x size, clipped only where it touches the border.
        for span in (rows, cols):
            assert span.size == size or span[0] == 0 or span[-1] == 15
        heights.add(rows.size)
        assert np.array_equal(after[~zero], before[~zero])
    assert size in heights and len(heights) > 1  # whole squares and clipped ones


def test_with_adamw_gives_each_stage_a_warm_up_and_a_cosine_decay_over_its_own_length(vits):
    teacher, student = vits
    steps = 10
    recipe = recipes.fsp_kd(teacher, student, steps, scale=0.01)  # 210 + 640 iterations
    new = recipes.with_adamw(recipe, steps, rate=1e-3, warmup_epochs=2)
    starts = sorted(new.schedule)
    assert starts == sorted(recipe.schedule) and starts[0] == 0
    assert [s.name for s in new.schedule.values()] == [s.name for s in recipe.schedule.values()]
    ends = starts[1:] + [new.epochs]
    for start, end in zip(starts, ends):
        stage = new.schedule[start]
        optimizer = stage.optimizer
        assert isinstance(optimizer, keras.optimizers.AdamW) and optimizer.global_clipnorm == 1.0
        iterations, warmup = (end - start) * steps, min(2 * steps, (end - start) * steps // 4)
        rate = compat.learning_rate(optimizer)
        values = [float(rate(s)) for s in (0, warmup // 2, warmup, iterations // 2 + warmup // 2,
                                           iterations)]
        np.testing.assert_allclose(values, [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=2e-5)
        assert new.model.stages[stage.name] is stage  # the distiller trains with it
    assert isinstance(new.model, FSPDistiller) and new.model is not recipe.model
    schedule = next(c for c in new.callbacks if isinstance(c, StageSchedule))
    assert all(schedule.schedule[e] is new.schedule[e] for e in starts)
    assert set(new.model.terms) == set(recipe.model.terms)
    alone = recipes.with_adamw(recipes.student_alone(student, steps, scale=0.01), steps)
    assert isinstance(alone.optimizer, keras.optimizers.AdamW) and not alone.schedule


def test_the_vit_tables_run_commands_the_cli_takes(tmp_path):
    from keras_fsp.apps import cli, reproduce

    def configs(table, *extra):
        flags, _ = reproduce._flags(["reproduce", table, "--seeds=0", "--dataset=digits",
                                     "--schedule_scale=0.25", *extra])
        flags.seeds = [0]
        runs = reproduce.TABLES[table].runs(flags, str(tmp_path / table))
        return runs, {r.name: cli.parse(["keras-fsp", *r.argv[3:]]) for r in runs}

    runs, vit = configs("cifar10-vit-to-vit")
    assert [r.method for r in runs] == ["teacher", *reproduce.VIT_METHODS]
    teacher = vit["teacher-seed0"]
    assert (teacher.teacher, teacher.optimizer, teacher.cutout, teacher.schedule_scale) == (
        "keras_fsp.papers.vit:vit_teacher", "adamw", 16, 0.5)  # twice the students' schedule
    fsp = vit["fsp-kd-seed0"]
    assert (fsp.student, fsp.teacher, fsp.optimizer, fsp.schedule_scale) == (
        "keras_fsp.papers.vit:vit_student", runs[0].run_dir, "adamw", 0.25)
    _, cnn = configs("cifar10-resnet26x4-to-vit", "--teacher=t.weights.h5",
                     "--teacher_precision=bfloat16")
    assert (cnn["kd-seed0"].teacher_width, cnn["kd-seed0"].teacher) in ((4, "t.weights.h5"),
                                                                        ([4], "t.weights.h5"))
    # --teacher_precision reaches every run that has a teacher, and only those.
    assert (cnn["kd-seed0"].teacher_precision, cnn["none-seed0"].teacher_precision) == (
        "bfloat16", None)
    _, resnet = configs("cifar10-vit-to-resnet8")
    assert (resnet["kd-seed0"].student_depth, resnet["kd-seed0"].optimizer) == (8, "sgd")


# ------------------------------------------------- a CNN with a ViT, either way


def _grid_pool(x, side):
    """Numpy: maps `(batch, h, w[, c])` averaged over square groups down to
    `side` x `side`."""
    x = np.asarray(x, np.float64)
    b, h, w = x.shape[:3]
    return x.reshape(b, side, h // side, side, w // side, *x.shape[3:]).mean(axis=(2, 4))


def test_tokens_are_read_as_their_patch_grid_beside_a_map():
    from keras_fsp import positions

    tokens = np.random.RandomState(2).rand(2, 64, 3).astype("float32")
    # 64 tokens beside a 16 x 16 map are 8 x 8 patches, row by row; pooled to 4 x 4.
    assert positions.pooled_size((None, 64, 5), (None, 16, 16, 7)) == (8, 8)
    assert positions.pooled_size((None, 32, 32, 7), (None, 64, 5)) == (8, 8)
    np.testing.assert_allclose(np.asarray(positions.pool(tokens, (4, 4), "avg")),
                               _grid_pool(tokens.reshape(2, 8, 8, 3), 4), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(positions.pool(tokens, (8, 8), "avg")),
                               tokens.reshape(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"32 tokens with a map of 8 x 8 positions.*must form the "
                                         r"map's shape"):
        positions.pooled_size((None, 32, 5), (None, 8, 8, 7))


@pytest.fixture(scope="module")
def cnn_and_vit():
    from keras_fsp.papers import cifar_resnet

    return cifar_resnet(8, name="resnet8_x"), cifar_vit(depth=3, width=16, heads=2, name="vit_x")


def test_a_cnn_and_a_vit_pair_by_depth_and_their_terms_equal_numpy_references(cnn_and_vit):
    from keras_fsp import taps
    from keras_fsp.terms import AttentionTerm, HintTerm

    cnn, vit = cnn_and_vit
    # The ResNet's three stages with the ViT's blocks at the same relative depth.
    assert pairing.matched_section_ends(cnn, vit) == [("stage1", "block1"), ("stage2", "block2"),
                                                      ("stage3", "norm")]
    assert pairing.matched_section_ends(vit, cnn) == [("block1", "stage1"), ("block2", "stage2"),
                                                      ("norm", "stage3")]
    x = np.random.RandomState(3).rand(4, 32, 32, 3).astype("float32")
    y = np.arange(4)

    def values(term, teacher, student):
        term.configure(teacher, student)
        t = taps.tap_model(teacher, term.teacher_taps, False)(x, training=False)
        s = taps.tap_model(student, term.student_taps, False)(x, training=False)
        got = float(np.asarray(term.compute(s, term.teacher_targets(t), y)).mean())
        return got, {k: np.asarray(v, np.float64) for k, v in t.items()}, \
            {k: np.asarray(v, np.float64) for k, v in s.items()}

    # Attention transfer, CNN teacher -> ViT student: each map's energy pooled
    # to the 8 x 8 patch grid, the tokens' energies read row by row.
    term = AttentionTerm()
    got, t, s = values(term, cnn, vit)

    def energy(f, grid):
        q = (f ** 2).sum(axis=-1)
        q = _grid_pool(q, 8).reshape(len(f), -1) if grid else q
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    want = sum(((energy(s[b], False) - energy(t[a], True)) ** 2).mean(axis=1)
               for a, b in term.pairs)
    assert got == pytest.approx(float((term.beta / 2 * want).mean()), rel=1e-4)

    # A hint, ViT teacher -> CNN student: the ResNet's 16 x 16 stage pooled to
    # the 8 x 8 grid of the ViT's tokens, then a per-position regressor.
    term = HintTerm()
    got, t, s = values(term, vit, cnn)
    assert (term.hint_layer, term.guided_layer) == ("block2", "stage2")
    guided = _grid_pool(s["stage2"], 8) @ np.asarray(term.regressor.kernel, np.float64) + \
        np.asarray(term.regressor.bias, np.float64)
    hint = t["block2"].reshape(4, 8, 8, 16)
    assert got == pytest.approx(0.5 * ((hint - guided) ** 2).reshape(4, -1).sum(axis=1).mean(),
                                rel=1e-4)


def test_a_cnn_teacher_and_a_vit_student_train_on_fsp_hints_and_attention_at_once(cnn_and_vit):
    from keras_fsp import Stage

    cnn, vit = cnn_and_vit
    x = np.random.RandomState(4).rand(8, 32, 32, 3).astype("float32")
    # One stage of the three feature terms, each paired automatically: one
    # compiled step instead of three (the suite's time).
    stage = Stage("features", {"fsp": 1e-3, "hint": 1e-2, "attention": 1.0})
    d = FSPDistiller(cnn, keras.models.clone_model(vit), stages={"features": stage}, stage="features")
    d.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = d.fit(x, np.arange(8) % 10, batch_size=8, epochs=3, shuffle=False, verbose=0).history
    for name in ("fsp", "hint", "attention"):
        values = history[f"{name}_loss"]
        assert np.all(np.isfinite(values)) and values[0] > 0, (name, values)
    assert history["loss"][-1] < history["loss"][0], history
