"""Several teachers at once: `keras_fsp.teacher_ensemble` (the weighted mean
of the teachers' logits), the distiller with an ensemble (soft targets,
feature terms by path, automatic pairing on one member, teacher caching,
saving), and the command line's `--teacher A --teacher B`."""

import json
import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp import FSPDistiller, Stage, ensemble, pairing, teacher_ensemble
from keras_fsp.papers import cifar_resnet
from keras_fsp.terms import FSPTerm, HintTerm, SoftTargetTerm
from tests import reference

SHAPE = (8, 8, 3)


def _softmax_teacher(classes=10, name="softmax_teacher"):
    x = keras.Input(SHAPE)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="conv")(x))
    return keras.Model(x, keras.layers.Dense(classes, activation="softmax", name="probs")(h),
                       name=name)


@pytest.fixture(scope="module")
def nets():
    """Two ResNet-8 teachers of one name (different weights), a softmax
    teacher, a student and a batch."""
    keras.utils.set_random_seed(0)
    a = cifar_resnet(8, input_shape=SHAPE, weight_decay=0.0)
    b = cifar_resnet(8, input_shape=SHAPE, weight_decay=0.0)
    soft = _softmax_teacher()
    student = cifar_resnet(8, input_shape=SHAPE, weight_decay=0.0, name="student")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16,) + SHAPE).astype("float32")
    return dict(a=a, b=b, soft=soft, student=student, x=x, y=np.arange(16) % 10)


def _predict(model, x):
    return np.asarray(ops.convert_to_numpy(model(x, training=False)), "float64")


def test_the_ensemble_averages_logits_and_log_probabilities_with_the_weights(nets):
    a, soft, x = nets["a"], nets["soft"], nets["x"]
    mean = teacher_ensemble([a, soft], weights=[1.0, 3.0])
    expected = 0.25 * _predict(a, x) + 0.75 * np.log(_predict(soft, x))
    np.testing.assert_allclose(_predict(mean, x), expected, rtol=1e-4, atol=1e-4)
    assert [m.name for m in ensemble.members(mean)] == ["resnet8", "softmax_teacher"]


def test_teachers_of_one_name_become_views_and_kd_is_against_the_geometric_mean(nets):
    a, b, student, x, y = (nets[k] for k in ("a", "b", "student", "x", "y"))
    assert a.name == b.name == "resnet8"
    d = FSPDistiller([a, b], student, terms=[SoftTargetTerm(temperature=2.0)],
                     stages={"kd": Stage("kd", {"kd": 1.0})})
    first, second = ensemble.members(d.teacher)
    # The user's models keep their names; the second is a view sharing b's weights.
    assert (first is a, second.name, b.name) == (True, "resnet8_1", "resnet8")
    assert second.weights[0] is b.weights[0]
    d.compile(optimizer=keras.optimizers.SGD(0.01))
    s_logits = ops.convert_to_numpy(student(x, training=True))
    history = d.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history
    # Soft targets: the normalised geometric mean of the tempered distributions.
    p_a, p_b = (reference.softmax(_predict(t, x) / 2.0) for t in (a, b))
    target = np.sqrt(p_a * p_b)
    target /= target.sum(-1, keepdims=True)
    expected = 4.0 * reference.kl(target, reference.softmax(s_logits / 2.0)).mean()
    assert history["kd_loss"][0] == pytest.approx(expected, rel=1e-4)


def test_a_feature_term_taps_the_second_teacher_by_path_also_from_a_cache(nets):
    a, b, x, y = nets["a"], nets["b"], nets["x"], nets["y"]
    student = keras.models.clone_model(nets["student"])
    d = FSPDistiller(teacher_ensemble([a, b]), student, stage="hint",
                     terms=[HintTerm("resnet8_1/stage2", "stage2")])
    d.compile(optimizer=keras.optimizers.SGD(0.01))
    cache = d.teacher_outputs(x, stage="hint")
    b_map = _predict(keras.Model(b.inputs, b.get_layer("stage2").output), x)
    a_map = _predict(keras.Model(a.inputs, a.get_layer("stage2").output), x)
    assert list(cache) == ["resnet8_1/stage2"] and not np.allclose(a_map, b_map, atol=1e-3)
    np.testing.assert_allclose(cache["resnet8_1/stage2"], b_map, rtol=1e-4, atol=1e-5)
    guided = ops.convert_to_numpy(keras.Model(student.inputs, student.get_layer("stage2").output)(
        x, training=True))
    history = d.fit({"inputs": x, "teacher": cache}, y, batch_size=len(x), epochs=1,
                    verbose=0).history
    assert history["hint_loss"][0] == pytest.approx(reference.hint_loss(b_map, guided), rel=1e-4)


def test_automatic_pairing_reads_the_chosen_member_with_its_paths(nets):
    a, b, student = nets["a"], nets["b"], nets["student"]
    for features_from, prefix in ((0, "resnet8/"), (1, "resnet8_1/")):
        both = teacher_ensemble([a, b], features_from=features_from)
        member = ensemble.members(both)[features_from]
        ends = pairing.section_ends(both)
        assert ends == {size: prefix + n for size, n in pairing.section_ends(member).items()}
        assert pairing.penultimate(both, "teacher") == prefix + "pool"
        term = FSPTerm()
        term.configure(both, student)
        assert term.pairs == [(prefix + p, prefix + q) for p, q in pairing.section_pairs(member)]
        assert term.student_pairs == pairing.section_pairs(student)


def test_teachers_that_do_not_fit_together_are_refused_in_one_line(nets):
    a = nets["a"]
    other_input = cifar_resnet(8, input_shape=(16, 16, 3), name="big")
    other_classes = _softmax_teacher(classes=4, name="four")
    cases = {
        r"teacher 1 'big' takes inputs of shape \(16, 16, 3\) and teacher 0 'resnet8' \(8, 8, 3\)":
            dict(teachers=[a, other_input]),
        r"teacher 1 'four' gives 4 classes and teacher 0 'resnet8' 10":
            dict(teachers=[a, other_classes]),
        r"2 weights for 1 teachers": dict(teachers=[a], weights=[1, 2]),
        r"weights must be positive finite numbers; got \[1.0, -1.0\]":
            dict(teachers=[a, a], weights=[1, -1]),
        r"features_from=2 is no teacher's index; give 0 to 1":
            dict(teachers=[a, a], features_from=2),
    }
    for message, kwargs in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            teacher_ensemble(**kwargs)
        assert "\n" not in str(error.value)


def test_a_distiller_with_an_ensemble_saves_and_loads(nets, tmp_path):
    a, soft, x = nets["a"], nets["soft"], nets["x"]
    student = keras.models.clone_model(nets["student"])
    d = FSPDistiller(teacher_ensemble([soft, a], weights=[2, 1], features_from=1), student,
                     terms=[FSPTerm(), SoftTargetTerm(3.0)])
    assert d.terms["fsp"].pairs[0] == ("resnet8/stem", "resnet8/stage1")
    d.save(tmp_path / "d.keras")
    for loaded in (keras.saving.load_model(tmp_path / "d.keras"),
                   FSPDistiller.from_config(d.get_config())):
        head = ensemble.head(loaded.teacher)
        assert (head.member_weights, head.probabilities, head.features_from) == (
            [2.0, 1.0], [True, False], 1)
        assert loaded.terms["fsp"].pairs == d.terms["fsp"].pairs
    np.testing.assert_allclose(_predict(keras.saving.load_model(tmp_path / "d.keras").teacher, x),
                               _predict(d.teacher, x), rtol=1e-5, atol=1e-5)


# The command line: two teachers of the digits' shape, a .keras file and the
# .weights.h5 file of a wider ResNet-8 (its width given per teacher).
@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    keras.utils.set_random_seed(0)
    cifar_resnet(8, input_shape=(8, 8, 1), name="teacher").save(folder / "a.keras")
    cifar_resnet(8, input_shape=(8, 8, 1), width_multiplier=2).save_weights(folder / "b.weights.h5")
    return folder / "a.keras", folder / "b.weights.h5"


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the CLI exports a SavedModel")
def test_distill_from_two_teachers_records_both_and_refuses_a_bad_second_first(teacher_files,
                                                                               tmp_path):
    pytest.importorskip("sklearn")
    from keras_fsp.apps import cli

    a, b = teacher_files
    # Untrained teachers (--allow_weak_teacher); 64000 * 2e-5 -> 1 iteration.
    args = ["distill", "--method=kd", "--dataset=digits", "--student_depth=8", "--batch_size=1297",
            "--schedule_scale=0.00002", "--verbose=0", "--allow_weak_teacher", "--teacher_depth=8",
            f"--teacher={a}", f"--teacher={b}"]
    refused = {  # the second teacher's file, then what the flags say before anything loads
        f"--teacher {b} does not match a ResNet-8x4 (--teacher_depth, --teacher_width)":
            ["--teacher_width=1,4"],
        "--teacher_width gives 3 values for 2 teacher(s)": ["--teacher_width=1,2,2"],
        "--teacher_weights must be positive numbers; got 1,0": ["--teacher_weights=1,0"],
        "--teacher: visualize takes one network; got 2": ["--model=x"],
    }
    for message, extra in refused.items():
        argv = args if extra != ["--model=x"] else ["visualize", *args[-2:]]
        with pytest.raises(cli.CLIError) as error:
            cli.run(["keras-fsp", *argv, *extra, f"--model_dir={tmp_path / 'bad'}"])
        assert message in error.value.message
    assert not (tmp_path / "bad").exists()

    run_dir = tmp_path / "two"
    result = cli.run(["keras-fsp", *args, "--teacher_width=1,2", "--teacher_weights=0.25,0.75",
                      f"--model_dir={run_dir}"])
    assert result["complete"] and 0.0 <= result["teacher_test_accuracy"] <= 1.0
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["teacher"], config["teacher_width"], config["teacher_weights"]) == (
        [str(a), str(b)], [1, 2], [0.25, 0.75])
    assert f"teachers 0.25 x {a} + 0.75 x {b}: their ensemble scores" in (
        run_dir / "log.txt").read_text()


def test_the_two_teacher_table_passes_both_teachers_to_each_run(tmp_path):
    from keras_fsp.apps import cli, reproduce

    name = "cifar10-two-teachers-to-resnet8"
    argv = ["reproduce", name, "--dataset=digits", "--teacher=wide.weights.h5",
            "--teacher=plain.weights.h5", "--methods=none,kd", "--seeds=0"]
    flags, _ = reproduce._flags(argv)
    flags.seeds = [0]
    runs = reproduce.TABLES[name].runs(flags, str(tmp_path / name))
    assert [(r.method, r.needs) for r in runs] == [("none", None), ("kd", None)]
    kd = cli.parse(["keras-fsp", *runs[1].argv[3:]])
    assert (kd.teacher, kd.teacher_depth, kd.teacher_width, kd.student_depth) == (
        ("wide.weights.h5", "plain.weights.h5"), 26, (4, 1), 8)
    assert cli.parse(["keras-fsp", *runs[0].argv[3:]]).teacher is None
    flags.teacher = ["wide.weights.h5"]
    with pytest.raises(SystemExit, match=f"reproduce {name}: give its 2 trained teachers"):
        reproduce.TABLES[name].runs(flags, str(tmp_path / name))


def test_visualize_of_a_two_teacher_run_shows_its_first_teacher(tmp_path):
    from keras_fsp.apps import cli

    teachers = [tmp_path / "wide-run", tmp_path / "plain-run"]
    for folder in [*teachers, tmp_path / "student-run"]:
        folder.mkdir()
    (tmp_path / "student-run" / "config.json").write_text(json.dumps(
        {"subcommand": "distill", "dataset": "digits", "teacher": [str(t) for t in teachers]}))
    config = cli.parse(["keras-fsp", "visualize", f"--model={tmp_path / 'student-run'}"])
    assert config.teacher == str(teachers[0])
