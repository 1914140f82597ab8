"""The published results: what `keras-fsp reproduce` wrote is consistent
(each row's mean and standard deviation are those of its seeds, the Markdown
table is the JSON's), and the summary JSON files hold plausible values."""

import glob
import json
import os
import statistics

import pytest

from keras_fsp.apps import reproduce

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
REPRODUCED = sorted(glob.glob(os.path.join(RESULTS, "reproduce", "*.json")))


@pytest.mark.parametrize("path", REPRODUCED, ids=os.path.basename)
def test_reproduced_tables_are_consistent(path):
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["table"] in reproduce.TABLES and summary["command"].startswith("keras-fsp reproduce")
    metric = summary["metric"]
    complete = 0
    for method, row in summary["rows"].items():
        values = row[metric]
        assert len(values) == len(row["seeds"]), method
        if not values:
            continue
        complete += 1
        assert row["mean"] == pytest.approx(statistics.fmean(values))
        assert row["std"] == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
        if metric == "test_accuracy":
            assert all(0.1 < v <= 1.0 for v in values), method  # better than chance, a fraction
    assert complete
    with open(path[:-5] + ".md", encoding="utf-8") as f:
        assert f.read() == reproduce.markdown(summary)


def test_summary_tables_hold_percentages():
    with open(os.path.join(RESULTS, "cifar10_resnet26_to_resnet8.json"), encoding="utf-8") as f:
        table = json.load(f)
    for method, values in table.items():
        assert 2 <= len(values) <= 3 and all(80.0 < v < 90.0 for v in values), method
    # the rows RESULTS.md compares on one teacher and one code version
    for method in ("kd_reproduce", "at", "dkd", "fsp_kd", "dense_fsp_kd"):
        assert len(table[method]) == 3


@pytest.mark.parametrize("summary, reproduced, rows", [
    ("cifar10_resnet26_to_resnet14.json", "cifar10_resnet26_to_resnet14.json",
     {"kd": "kd", "dense_fsp_kd": "dense-fsp-kd"}),
    ("cifar10_transfer.json", "cifar10_transfer.json",
     {"teacher_source_classes": "teacher", "student_alone": "student_alone",
      "teacher_finetuned": "teacher_finetuned", "fitnet": "fitnet", "fsp": "fsp", "at": "at"}),
    ("cifar10_resnet26_to_resnet8.json", "cifar10_resnet26_to_resnet8_at_kd.json",
     {"at_kd": "at-kd"}),
    ("cifar10_resnet26_to_resnet8.json", "cifar10_resnet26_to_resnet8.json",
     {"kd_reproduce": "kd", "at": "at", "dkd": "dkd", "fsp_kd": "fsp-kd",
      "dense_fsp_kd": "dense-fsp-kd"}),
])
def test_summary_tables_are_the_reproduced_runs(summary, reproduced, rows):
    with open(os.path.join(RESULTS, summary), encoding="utf-8") as f:
        table = json.load(f)
    with open(os.path.join(RESULTS, "reproduce", reproduced), encoding="utf-8") as f:
        runs = json.load(f)["rows"]
    for name, method in rows.items():
        assert table[name] == pytest.approx([100 * v for v in runs[method]["test_accuracy"]],
                                            abs=0.005), name


def test_the_mnist_summary_is_the_reproduced_runs():
    with open(os.path.join(RESULTS, "mnist_hinton.json"), encoding="utf-8") as f:
        table = json.load(f)
    with open(os.path.join(RESULTS, "reproduce", "mnist_hinton.json"), encoding="utf-8") as f:
        runs = json.load(f)["rows"]
    rows = {"teacher": "teacher", "student_alone": "student_alone",
            "student_alone_jitter": "student_alone_jitter", "distilled": "kd_t20",
            "distilled_jitter": "kd_t20_jitter", "distilled_t4_jitter": "kd_t4_jitter",
            "omitted_class_distilled": "omitted_3"}
    assert set(table) == set(rows) | {"omitted_class_3s_correct_percent_before_bias_shift",
                                      "omitted_class_3s_correct_percent_after_bias_shift"}
    for name, method in rows.items():
        assert table[name] == runs[method]["test_errors"], name
    for when in ("before", "after"):
        assert table[f"omitted_class_3s_correct_percent_{when}_bias_shift"] == pytest.approx(
            [100 * v for v in runs["omitted_3"][f"omitted_accuracy_{when}"]], abs=0.05)


def test_export_accuracies_in_results_md_are_the_benchmarks():
    root = os.path.dirname(RESULTS)
    with open(os.path.join(root, "benchmarks", "results", "export-cifar10-resnet8-kd.json"),
              encoding="utf-8") as f:
        exported = json.load(f)
    with open(os.path.join(root, "RESULTS.md"), encoding="utf-8") as f:
        text = f.read()
    assert exported["test_images"] == 10000
    for name, label in (("keras_float32", "`.keras`, float32"), ("litert_float32", "LiteRT float32"),
                        ("litert_int8", "LiteRT int8"), ("onnx_float32", "ONNX float32")):
        accuracy = f"{100 * exported[name]['accuracy']:.2f}"
        row = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
        assert f"| {accuracy} |" in row, (name, row)
        if name != "keras_float32":
            agreement = exported[name]["agreement_with_keras"]
            assert f"| {100 * agreement:.2f}% |" in row or (agreement == 1 and "| 100% |" in row)
            assert f"| {round(exported[name]['bytes'] / 1000)} kB |" in row, row
