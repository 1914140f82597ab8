"""Builds the per-experiment JSON files of results/ from the raw per-run
results under results/raw/ (written by the example scripts), and prints
mean ± std per method. Only complete runs count (`"completed": true`).

    python results/collect.py          # rewrites the CIFAR-10 and MNIST JSON files

Teacher A's runs are in results/raw/ (an earlier session, H200), teacher B's
in results/raw/h100/ (ResNet-26 seed 0, results/teachers/).
"""

import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
RAW = os.path.join(HERE, "raw")

# method -> raw files, in seed order (teacher A: raw/, teacher B: raw/h100/)
NETWORK_MINIMIZATION = {
    "student_alone": [f"student_alone_seed{s}.json" for s in (0, 1, 2)],
    "kd": [f"h100/c10/kd_seed{s}.json" for s in (0, 1, 2)],
    "kd_teacher_a": [f"kd_seed{s}.json" for s in (0, 1, 2)],
    # seed 0 on teacher A, seeds 1-2 on teacher B (the same command on two GPUs)
    "fitnet": ["fitnet_seed0.json"] + [f"h100/c10/fitnet_seed{s}.json" for s in (1, 2)],
    # the recipe's default: stage-1 gradients clipped at 10, norms restored
    "fsp": [f"h100/c10/fsp_clip10_seed{s}.json" for s in (0, 1, 2)],
    "fsp_unclipped": [f"h100/c10/fsp_seed{s}.json" for s in (0, 1, 2)],
    # Adam in stage 1: seed 0 on the H100, seeds 1-2 on an H200
    "fsp_adam": ["h100/c10/fsp_adam_seed0.json"] + [f"h200/c10/fsp_adam_seed{s}.json" for s in (1, 2)],
    "fsp_published": [f"fsp_seed{s}.json" for s in (0, 1, 2)],
    # dense_fsp's default: unclipped, norms restored
    "dense_fsp": [f"h100/c10/dense_fsp_seed{s}.json" for s in (0, 1, 2)],
    "dense_fsp_clip10": [f"h100/c10/dense_fsp_clip10_seed{s}.json" for s in (0, 1, 2)],
    "dense_fsp_adam": [f"h200/c10/dense_fsp_adam_seed{s}.json" for s in (0, 1, 2)],
    "dense_fsp_published": [f"dense_fsp_seed{s}.json" for s in (0, 1)],
}
FAST_OPTIMIZATION = {
    "teacher_21k": [f"h100/c10fast/teacher_21k_seed{s}.json" for s in (0, 1, 2)],
    # seed 0 is teacher B (network-minimization script, same recipe); seeds 0
    # and 2 were stopped at epochs 127 and 125 of 164 (see RESULTS.md)
    "teacher_64k": ["h100/c10/teacher_seed0.json", "h100/c10fast/teacher_64k_seed1.json",
                    "h100/c10fast/teacher_64k_seed2.json"],
    # the recipe's default (stage-1 gradients clipped at 10)
    "fsp_from_teacher_64k": [f"h100/c10fast/fsp_t64k_clip10_seed{s}.json" for s in (0, 1, 2)],
    # unclipped: seeds 0 and 3 diverged (NaN) in the first FSP epoch, listed apart
    "fsp_from_teacher_64k_unclipped": [f"h100/c10fast/fsp_t64k_seed{s}.json" for s in (1, 2)],
    "fsp_from_teacher_21k_unclipped": [f"h100/c10fast/fsp_t21k_seed{s}.json" for s in (0, 1, 2)],
}
# GPU run 9 (H100): teacher 300 epochs with max-norm 3.5, students 100 epochs
MNIST = {
    "teacher": [f"h100/mnist/teacher_mn300_seed{s}.json" for s in (0, 1, 2)],
    "student_alone": [f"h100/mnist/student_alone_e100_seed{s}.json" for s in (0, 1, 2)],
    "distilled": [f"h100/mnist/kd_mn300_seed{s}.json" for s in (0, 1, 2)],
    "omitted_class_distilled": [f"h100/mnist/omitted_class_mn300_seed{s}.json" for s in (0, 1, 2)],
}
OMITTED = MNIST["omitted_class_distilled"]
# runs stopped by a time limit that still count (their teacher role): the
# table says so; everything else must be complete.
ALLOWED_INCOMPLETE = {"h100/c10/teacher_seed0.json", "h100/c10fast/teacher_64k_seed2.json"}


def _load(name):
    with open(os.path.join(RAW, name)) as f:
        run = json.load(f)
    if not run.get("completed", False) and name not in ALLOWED_INCOMPLETE:
        raise ValueError(f"{name} is not a complete run")
    return run


def collect(table, key="test_accuracy", percent=True):
    """`{method: [accuracy % per seed]}` from the raw runs of `table` (with
    `percent=False`, the raw values of `key`, e.g. test errors)."""
    value = (lambda v: round(100 * v, 2)) if percent else (lambda v: v)
    return {m: [value(_load(f)[key]) for f in files] for m, files in table.items()}


def collect_mnist():
    """`{model: [test errors per seed]}` plus the omitted class's share of
    test 3s right (%) before and after the bias shift."""
    results = collect(MNIST, "test_errors", percent=False)
    for when in ("before", "after"):
        results[f"omitted_class_3s_correct_percent_{when}_bias_shift"] = [
            round(100 * _load(f)[f"omitted_accuracy_{when}"], 1) for f in OMITTED]
    return results


def summary(results):
    for method, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{method:24s} {statistics.mean(values):6.2f} ± {std:4.2f}  {values}")


def main():
    outputs = {
        "cifar10_resnet26_to_resnet8.json": collect(NETWORK_MINIMIZATION),
        "cifar10_resnet26_to_resnet8_genuine_subset.json":
            collect(NETWORK_MINIMIZATION, "genuine_subset_accuracy"),
        "cifar10_resnet26_fast_optimization.json": collect(FAST_OPTIMIZATION),
        "cifar10_resnet26_fast_optimization_genuine_subset.json":
            collect(FAST_OPTIMIZATION, "genuine_subset_accuracy"),
        "mnist_hinton.json": collect_mnist(),
    }
    for name, results in outputs.items():
        print(name)
        summary(results)
        with open(os.path.join(HERE, name), "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
