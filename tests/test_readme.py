"""The README's API tour runs as written."""

import os
import re

import keras
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.large
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the tour exports a SavedModel")
def test_api_tour_runs(tmp_path, monkeypatch):
    text = open(README, encoding="utf-8").read()
    tour = text.split("## API tour", 1)[1]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    distiller = namespace["distiller"]
    assert distiller.stage.name == "task"
    import numpy as np
    losses = namespace["history"].history
    assert np.all(np.isfinite(losses["fsp_loss"])) and np.all(np.isfinite(losses["task_loss"]))
    assert distiller.terms["fsp"].pairs == [("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")]
    assert os.path.exists(tmp_path / "student_savedmodel" / "saved_model.pb")
