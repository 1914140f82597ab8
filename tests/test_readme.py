"""The README's code blocks run as written: every ```python block, top to
bottom in one namespace (as a reader pastes them into one session), then
every `keras-fsp` command of the ```bash blocks. The Quickstart's two
commands are the install, the demo (tests/test_demo.py runs it at a small
scale) and this test suite itself."""

import json
import os
import re
import shlex
import sys
import textwrap

import keras
import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks(kind):
    text = open(README, encoding="utf-8").read()
    # A block inside a list item is indented with the item.
    return [textwrap.dedent(b) for b in re.findall(rf"(?ms)^ *```{kind}\n(.*?)^ *```", text)]


@pytest.mark.large
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the tour exports a SavedModel")
def test_python_blocks_run(tmp_path, monkeypatch):
    # Each block alone, as a reader pastes it into a fresh session: a
    # namespace of its own (and what a block registers kept in this test).
    from keras_fsp.terms import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 4
    spaces = []
    for i, code in enumerate(blocks):
        namespace = {}
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        spaces.append(namespace)
    tour = spaces[0]
    assert tour["distiller"].stage.name == "task"
    losses = tour["history"].history
    assert np.all(np.isfinite(losses["fsp_loss"])) and np.all(np.isfinite(losses["task_loss"]))
    assert tour["distiller"].terms["fsp"].pairs == [("stem", "stage1"), ("stage1", "stage2"),
                                                   ("stage2", "stage3")]
    assert os.path.exists(tmp_path / "student_savedmodel" / "saved_model.pb")
    mixed = next(n for n in spaces if "mixed" in n)["mixed"]
    assert sorted(mixed.terms) == ["attention", "logit_mse", "task"]
    transformers = next(n for n in spaces if "distillers" in n)["distillers"]
    assert sorted(transformers) == ["attention", "fsp", "hint"]
    assert len(transformers["fsp"].terms["fsp"].pairs) == 2  # the student's two blocks
    several = next(n for n in spaces if "teachers" in n)
    assert several["flow"].terms["fsp"].pairs[0] == ("resnet14/stem", "resnet14/stage1")
    assert several["by_path"].teacher.get_layer("resnet14_1").weights[0] is several["b"].weights[0]
    assert several["kd"].teacher.get_layer("resnet14_1") is not several["b"]  # a view of it
    result = next(n for n in spaces if "result" in n)["result"]
    assert result["complete"] and os.path.isfile(result["files"]["keras"])


@pytest.mark.large
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the CLI exports a SavedModel")
def test_command_lines_run(tmp_path, monkeypatch, capsys):
    # In this process (`keras-fsp` is `cli.main`), from a folder of its own,
    # what a plugin registers kept in this test.
    pytest.importorskip("sklearn")
    from keras_fsp.apps import cli
    from keras_fsp.papers import methods
    from keras_fsp.terms import base

    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.delitem(sys.modules, "keras_fsp_plugin_my_method", raising=False)
    commands = [line for block in _blocks("bash") for line in block.splitlines()
                if line.startswith("keras-fsp ")]
    assert len(commands) >= 4
    # As from a clone's root: the README's plugin is examples/my_method.py.
    (tmp_path / "examples").symlink_to(os.path.join(os.path.dirname(README), "examples"))
    monkeypatch.chdir(tmp_path)
    for line in commands:
        argv = shlex.split(line.split("#")[0])
        assert cli.main(argv) == 0, (line, capsys.readouterr().err[-3000:])
    assert (tmp_path / "runs" / "distill-fsp-digits" / "student.keras").is_file()
    assert (tmp_path / "runs" / "distill-logit-mse-digits" / "student.keras").is_file()
    student = keras.saving.load_model(tmp_path / "runs" / "my-student" / "student.keras")
    assert student.name == "tiny_cnn"
    metrics = json.loads((tmp_path / "runs" / "my-student" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["test_accuracy"] > 0.5


def test_the_method_list_is_the_method_table():
    from keras_fsp.papers import methods

    text = " ".join(open(README, encoding="utf-8").read().split())
    listed = re.search(r"Methods \(`keras_fsp.papers.methods`.*?\): (.*?)\. Datasets", text).group(1)
    assert re.findall(r"`([^`]+)`", listed) == list(methods.METHODS)
