"""The published results/*.json files are what results/collect.py computes
from the raw per-run results (complete runs only), so a table can't drift
from the runs behind it."""

import importlib.util
import json
import os

import pytest

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def _collect():
    spec = importlib.util.spec_from_file_location("collect", os.path.join(RESULTS, "collect.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, table, key", [
    ("cifar10_resnet26_to_resnet8.json", "NETWORK_MINIMIZATION", "test_accuracy"),
    ("cifar10_resnet26_to_resnet8_genuine_subset.json", "NETWORK_MINIMIZATION",
     "genuine_subset_accuracy"),
    ("cifar10_resnet26_fast_optimization.json", "FAST_OPTIMIZATION", "test_accuracy"),
])
def test_published_json_equals_the_raw_runs(name, table, key):
    collect = _collect()
    with open(os.path.join(RESULTS, name)) as f:
        published = json.load(f)
    assert published == collect.collect(getattr(collect, table), key)
    assert all(len(v) >= 2 for v in published.values())


def test_published_mnist_json_equals_the_raw_runs():
    collect = _collect()
    with open(os.path.join(RESULTS, "mnist_hinton.json")) as f:
        published = json.load(f)
    assert published == collect.collect_mnist()
    assert all(len(v) == 3 for v in published.values())


def test_an_incomplete_run_is_refused(tmp_path, monkeypatch):
    collect = _collect()
    (tmp_path / "cut.json").write_text(json.dumps({"completed": False, "test_accuracy": 0.9}))
    monkeypatch.setattr(collect, "RAW", str(tmp_path))
    with pytest.raises(ValueError, match="not a complete run"):
        collect.collect({"m": ["cut.json"]})
