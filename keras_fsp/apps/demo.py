"""Offline Quickstart: FSP distillation on scikit-learn's handwritten digits.

    python -m keras_fsp.apps.demo [--output_dir DIR] [--epochs_scale F] [--seed N]

Trains, on the 1,797 bundled 8x8 digit images (no network needed):

1. a teacher, a CIFAR ResNet-14 (two residual blocks per section);
2. the student alone, a ResNet-8 (one block per section), on labels only;
3. the same student (same initial weights) distilled with FSP in the paper's
   two stages within one `fit`: stage 1 fits the student's FSP matrices to the
   teacher's, stage 2 trains it on the labels with the same budget as (2).

Both networks have three sections (8x8, 4x4 and 2x2 maps, 16/32/64
channels), found automatically by `keras_fsp.pairing`. The demo
prints a table of test accuracies and of the task epochs each student needed
to reach the student-alone's final accuracy, exports the distilled student
(SavedModel and `.keras`) and draws its FSP matrices and training curves.
About a minute on two CPU cores. `run(...)` does everything and returns
the results as a dict; `main` only parses the flags.
"""

import json
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from keras_fsp import FSPDistiller, Stage, export_student
from keras_fsp import training
from keras_fsp.apps.visualize import plot_fsp_matrices
from keras_fsp.callbacks import StageSchedule
from keras_fsp.terms.fsp import fsp_matrices_of
from keras_fsp.papers import cifar_resnet
from keras_fsp.papers.recipes import Recipe

DEFAULT_OUTPUT_DIR = "fsp_demo_output"
INPUT_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
TEST_SIZE = 500
TEACHER_DEPTH = 14
STUDENT_DEPTH = 8
# Epochs at epochs_scale=1.
TEACHER_EPOCHS = 30
TASK_EPOCHS = 10  # the student alone, and stage 2 of the FSP student
FSP_EPOCHS = 10  # stage 1 of the FSP student
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
# Test images whose FSP matrices are averaged for the picture.
FSP_BATCH = 256


# ---------------------------------------------------------------------- data


def load_data(seed=0, test_size=TEST_SIZE):
    """The digits as `(x_train, y_train, x_test, y_test)`.

    Pixels scaled from 0..16 to [0, 1], shape `(N, 8, 8, 1)` float32, labels
    int32; a stratified split (1,297 / 500 by default) fixed by `seed`.
    """
    from keras_fsp.apps.data import load_digits_split

    (x_train, y_train), (x_test, y_test) = load_digits_split(seed, test_size)
    return x_train, y_train, x_test, y_test


def scaled_epochs(epochs, scale):
    """`epochs * scale`, rounded, at least 1."""
    return max(1, int(round(epochs * scale)))


def epochs_to_reach(val_accuracy, target, num_examples):
    """1-based epoch at which `val_accuracy` first reaches `target`, or None.

    Accuracies are compared as counts of correct examples out of
    `num_examples`, so float round-off cannot hide a tie.
    """
    goal = int(round(target * num_examples))
    for epoch, acc in enumerate(val_accuracy, start=1):
        if int(round(acc * num_examples)) >= goal:
            return epoch
    return None


def task_epochs_to_reach(alone_history, fsp_history, fsp_epochs, target, num_examples):
    """Task epochs each student needed to reach `target` (None: never).

    `fsp_history` holds every epoch of the FSP student's one `fit`: its
    first `fsp_epochs` (the FSP stage) do not count.
    """
    return {
        "student_alone": epochs_to_reach(alone_history, target, num_examples),
        "fsp_student": epochs_to_reach(fsp_history[fsp_epochs:], target, num_examples),
    }


# -------------------------------------------------------------------- models


def _optimizer(epochs, steps_per_epoch):
    """Adam with a cosine decay over `epochs`.

    Adam rather than the paper's SGD: the FSP loss on these maps is of order
    1e4 at the start (the teacher's matrices have entries up to tens), and SGD
    with a learning rate that trains the task diverges on it. The
    `FSPDistiller` gives each stage a fresh copy, so the schedule restarts at
    the task stage exactly as it runs for the student alone.
    """
    schedule = keras.optimizers.schedules.CosineDecay(
        LEARNING_RATE, decay_steps=epochs * steps_per_epoch
    )
    return keras.optimizers.Adam(schedule)


class _CaptureFSP(keras.callbacks.Callback):
    """The FSP matrices at the end of a given epoch (the stage switch)."""

    def __init__(self, epoch, x):
        super().__init__()
        self.epoch, self.x, self.captured = epoch, x, None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.captured = _fsp_matrices(self.model, self.x)


def _train(recipe, data, out, name, seed, verbose, callbacks=()):
    """One of the demo's trainings, through keras_fsp's training harness."""
    (x_train, y_train), test = data
    return training.train(recipe, (x_train, y_train), test, str(out / "runs" / name),
                          batch_size=BATCH_SIZE, seed=seed, validation_every=1,
                          verbose=verbose, save_name=name, callbacks=callbacks,
                          log=training.Log(echo=False))


def _fsp_matrices(distiller, x):
    """The teacher's and the student's FSP matrices of the distiller's pairs."""
    return distiller.terms["fsp"].matrices_of(distiller.teacher, distiller.student, x)


def _fsp_distance(teacher_gs, student_gs):
    """Per pair: batch mean of `||G_T - G_S||_F^2` (the FSP loss terms)."""
    return [
        float(np.mean(np.sum((t - s) ** 2, axis=(1, 2))))
        for t, s in zip(teacher_gs, student_gs)
    ]


# ------------------------------------------------------------------ pictures


def plot_training_curves(path, alone_acc, fsp_acc, fsp_loss, fsp_epochs, target):
    """Val accuracy per epoch, task-stage epochs aligned (stage 1 of the FSP
    student drawn at epochs <= 0): the whole range, a zoom on the task
    stage, and the FSP loss of stage 1."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.2), layout="constrained")
    ax_full, ax_zoom, ax_loss = fig.subplots(1, 3, width_ratios=[1.2, 1.2, 0.9])
    alone_x = np.arange(1, len(alone_acc) + 1)
    fsp_x = np.arange(1, len(fsp_acc) + 1) - fsp_epochs
    task_values = list(alone_acc) + list(fsp_acc[fsp_epochs:])
    low = max(0.0, min(task_values) - 0.01)
    for ax, zoom in ((ax_full, False), (ax_zoom, True)):
        ax.axvspan(fsp_x[0] - 0.5, 0.5, color="tab:orange", alpha=0.12,
                   label="FSP student, stage 1 (FSP loss;\nhead untrained: chance)")
        ax.axvline(0.5, color="tab:orange", linestyle="--", linewidth=1,
                   label="stage switch: fsp -> task")
        ax.plot(alone_x, alone_acc, "o-", color="tab:blue", label="student alone")
        first = fsp_epochs if zoom else 0  # the zoom shows the task stage only
        ax.plot(fsp_x[first:], fsp_acc[first:], "s-", color="tab:orange",
                label="FSP student")
        ax.axhline(target, color="gray", linestyle=":", linewidth=1,
                   label=f"student alone, final ({target:.3f})")
        ax.set_xlabel("task-stage epoch (FSP stage at <= 0)")
        ax.set_ylabel("test (validation) accuracy")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_xlim(0.5, max(len(alone_acc), len(fsp_acc) - fsp_epochs) + 0.5)
            ax.set_ylim(low, min(1.0, max(task_values) + 0.005))
            ax.set_title("Task stage, zoomed")
        else:
            ax.set_ylim(0.0, 1.0)
            ax.set_title("Student alone vs FSP student")
            ax.legend(loc="center right", fontsize=7)
    loss = [v for v in fsp_loss if v is not None]
    ax_loss.plot(np.arange(1, len(loss) + 1), loss, "s-", color="tab:orange")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("FSP-stage epoch")
    ax_loss.set_ylabel("FSP loss (training batches)")
    ax_loss.set_title("Stage 1: FSP loss")
    ax_loss.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------- results


def _fmt_epochs(n, budget):
    return "not reached" if n is None else f"{n} of {budget}"


def format_table(results):
    """The results table as plain-text lines and as Markdown lines."""
    acc = results["accuracy"]
    reach = results["task_epochs_to_reach_target"]
    budget = results["epochs"]["task"]
    target = results["target_accuracy"]
    m = results["models"]
    rows = [
        (f"teacher ({m['teacher']})", f"{acc['teacher']:.4f}", "-"),
        (f"student alone ({m['student']})", f"{acc['student_alone']:.4f}",
         _fmt_epochs(reach["student_alone"], budget)),
        (f"FSP student ({m['student']})", f"{acc['fsp_student']:.4f}",
         _fmt_epochs(reach["fsp_student"], budget)
         + f" (after {results['epochs']['fsp_stage']} FSP epochs)"),
    ]
    header = ("model", "test accuracy", f"task epochs to reach {target:.4f}")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    text = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    md = ["| " + " | ".join(header) + " |", "| --- | ---: | --- |"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return text, md


def _write_markdown(path, results, md_table):
    e = results["epochs"]
    d = results["fsp_distance_to_teacher"]
    lines = [
        "# keras_fsp demo: FSP distillation on the digits",
        "",
        f"{results['data']['train']} training and {results['data']['test']} test "
        f"images (scikit-learn digits, 8x8), seed {results['seed']}. Teacher "
        f"{results['models']['teacher']} trained {e['teacher']} epochs; the "
        f"student alone {e['task']} epochs on the labels; the FSP student "
        f"{e['fsp_stage']} epochs of FSP loss, then {e['task']} epochs on the "
        "labels (same schedule as the student alone), from the same initial "
        "weights. The target is the student alone's final test accuracy.",
        "",
        *md_table,
        "",
        "FSP distance to the teacher, sum over pairs of the mean "
        "`||G_T - G_S||_F^2` (per pair in results.json):",
        "",
        "| student | distance |",
        "| --- | ---: |",
        *[f"| {k.replace('_', ' ')} | {sum(v):.4g} |" for k, v in d.items()],
        "",
        f"Wall time {results['seconds']['total']:.0f} s.",
        "",
        "![FSP matrices](fsp_matrices.png)",
        "",
        "![Training curves](training_curves.png)",
        "",
    ]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def _prepare_output_dir(out):
    """Creates `out`; removes a SavedModel left there by an earlier run (the
    exporter refuses to overwrite), and refuses anything else in its place."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "runs", ignore_errors=True)  # each demo trains from scratch
    saved = out / "student_savedmodel"
    if saved.exists():
        if (saved / "saved_model.pb").is_file():
            shutil.rmtree(saved)
        else:
            raise FileExistsError(
                f"{saved} exists and is not a SavedModel from an earlier demo "
                "run; choose another --output_dir."
            )


# ----------------------------------------------------------------------- run


def run(output_dir=DEFAULT_OUTPUT_DIR, epochs_scale=1.0, seed=0, verbose=2,
        return_models=False):
    """Runs the whole demo and writes its outputs into `output_dir`.

    Args:
        output_dir: where results.json, results.md, the pictures and the
            exported student go (created if needed).
        epochs_scale: multiplies every epoch count (at least 1 epoch each);
            0.05 gives a smoke test of a few seconds of training.
        seed: seeds the split, the initial weights and the shuffling.
        verbose: Keras `fit` verbosity (2: one line per epoch; 0: none).
            The stage lines and the table are printed in any case.
        return_models: also return the Keras models under `"models_"`
            (`teacher`, `student_alone`, `fsp_student`, `distiller`).

    Returns:
        a JSON-serialisable dict (also saved as results.json): accuracies,
        task epochs to reach the target, per-epoch histories, FSP distances,
        epochs, timings and the paths written.
    """
    if not epochs_scale > 0:
        raise ValueError(f"epochs_scale must be > 0; got {epochs_scale!r}.")
    t_start = time.time()
    out = Path(output_dir)
    _prepare_output_dir(out)

    x_train, y_train, x_test, y_test = load_data(seed)
    steps = len(x_train) // BATCH_SIZE
    n_test = len(x_test)
    x_fsp = x_test[:FSP_BATCH]
    e_teacher = scaled_epochs(TEACHER_EPOCHS, epochs_scale)
    e_task = scaled_epochs(TASK_EPOCHS, epochs_scale)
    e_fsp = scaled_epochs(FSP_EPOCHS, epochs_scale)
    data = ((x_train, y_train), (x_test, y_test))
    print(f"Digits: {len(x_train)} training, {n_test} test images, 8x8x1; seed {seed}.")

    # 1. Teacher.
    keras.utils.set_random_seed(seed)
    teacher = cifar_resnet(TEACHER_DEPTH, NUM_CLASSES, INPUT_SHAPE, name="teacher")
    print(f"\n[1/3] teacher ResNet-{TEACHER_DEPTH} ({teacher.count_params():,} "
          f"parameters), {e_teacher} epochs ...", flush=True)
    r_teacher = _train(Recipe("teacher", teacher, {}, e_teacher, [], teacher,
                              optimizer=_optimizer(e_teacher, steps)), data, out, "teacher",
                       seed, verbose)

    # 2. Student alone. Its initial weights are kept for the FSP student.
    keras.utils.set_random_seed(seed + 1)
    student_alone = cifar_resnet(STUDENT_DEPTH, NUM_CLASSES, INPUT_SHAPE, name="student_alone")
    initial_weights = student_alone.get_weights()
    print(f"\n[2/3] student alone ResNet-{STUDENT_DEPTH} "
          f"({student_alone.count_params():,} parameters), {e_task} epochs on the "
          "labels ...", flush=True)
    r_alone = _train(Recipe("student_alone", student_alone, {}, e_task, [], student_alone,
                            optimizer=_optimizer(e_task, steps)), data, out, "student_alone",
                     seed + 1, verbose)

    # 3. FSP student: the same initial weights, FSP stage then task stage.
    keras.utils.set_random_seed(seed + 2)
    student = cifar_resnet(STUDENT_DEPTH, NUM_CLASSES, INPUT_SHAPE, name="fsp_student")
    student.set_weights(initial_weights)
    # Each stage with the task's optimizer (Adam), not the built-in FSP
    # stage's 1/100 of it: on these small maps Adam at the task's rate is stable.
    fsp_stage = Stage("fsp", {"fsp": 1.0}, trainable="up_to_taps",
                      optimizer=_optimizer(e_task, steps))
    task_stage = Stage("task", {"task": 1.0}, optimizer=_optimizer(e_task, steps))
    distiller = FSPDistiller(teacher, student, stages={"fsp": fsp_stage, "task": task_stage},
                             stage="fsp")
    fsp = distiller.terms["fsp"]  # pairs found automatically
    print(f"\n[3/3] FSP student ResNet-{STUDENT_DEPTH}: stage 1 'fsp' for {e_fsp} "
          f"epochs (FSP pairs {fsp.pairs}; the student's head does not "
          "train, so its val accuracy stays at chance), then stage 2 'task' for "
          f"{e_task} epochs ...", flush=True)
    fsp_before = _fsp_matrices(distiller, x_fsp)
    schedule = {0: fsp_stage, e_fsp: task_stage}
    capture = _CaptureFSP(e_fsp - 1, x_fsp)
    r_fsp = _train(Recipe("fsp", distiller, schedule, e_fsp + e_task, [StageSchedule(schedule)],
                          student), data, out, "fsp_student", seed + 2, verbose, [capture])
    teacher_gs, fsp_final = _fsp_matrices(distiller, x_fsp)
    alone_gs = fsp_matrices_of(student_alone, fsp.student_pairs, x_fsp, fsp.pooling)

    # Table.
    alone_acc, fsp_acc = r_alone["test_accuracy"], r_fsp["test_accuracy"]
    alone_hist = r_alone["history"]["val_accuracy"]
    fsp_hist = r_fsp["history"]["val_accuracy"]
    results = {
        "seed": seed,
        "epochs_scale": epochs_scale,
        "data": {"train": int(len(x_train)), "test": int(n_test)},
        "models": {
            "teacher": f"ResNet-{TEACHER_DEPTH}",
            "student": f"ResNet-{STUDENT_DEPTH}",
            "teacher_parameters": int(teacher.count_params()),
            "student_parameters": int(student.count_params()),
        },
        "fsp_pairs": {"teacher": [list(p) for p in fsp.pairs],
                      "student": [list(p) for p in fsp.student_pairs]},
        "epochs": {"teacher": e_teacher, "task": e_task, "fsp_stage": e_fsp},
        "optimizer": f"Adam, lr {LEARNING_RATE} cosine decay, batch {BATCH_SIZE}",
        "accuracy": {"teacher": r_teacher["test_accuracy"], "student_alone": alone_acc,
                     "fsp_student": fsp_acc},
        "target_accuracy": alone_acc,
        "task_epochs_to_reach_target": task_epochs_to_reach(
            alone_hist, fsp_hist, e_fsp, alone_acc, n_test
        ),
        "history": {
            "teacher_val_accuracy": r_teacher["history"]["val_accuracy"],
            "student_alone_val_accuracy": alone_hist,
            # Every epoch of the one fit: e_fsp FSP-stage epochs, then the task.
            "fsp_student_val_accuracy": fsp_hist,
            "fsp_student_fsp_loss": r_fsp["history"]["fsp_loss"][:e_fsp],
        },
        "fsp_distance_to_teacher": {
            "student_before": _fsp_distance(teacher_gs, fsp_before[1]),
            "fsp_student_after_stage_1": _fsp_distance(teacher_gs, capture.captured[1]),
            "fsp_student_final": _fsp_distance(teacher_gs, fsp_final),
            "student_alone_final": _fsp_distance(teacher_gs, alone_gs),
        },
    }
    text_table, md_table = format_table(results)
    print("\n" + "\n".join(text_table), flush=True)

    # Export.
    print("\nExporting the distilled student ...", flush=True)
    files = {}
    if keras.backend.backend() == "tensorflow":
        files["savedmodel"] = str(export_student(distiller, str(out / "student_savedmodel"),
                                                 overwrite=True))
    else:
        print("  (SavedModel export needs KERAS_BACKEND=tensorflow: skipped)")
    # The demo's own files from an earlier run are replaced, as Keras' save would.
    files["keras"] = str(export_student(distiller, str(out / "student.keras"), format="keras",
                                        overwrite=True))

    # Pictures.
    print("Drawing the pictures ...", flush=True)
    files["fsp_matrices"] = str(plot_fsp_matrices(
        teacher_gs, fsp_final, out / "fsp_matrices.png", pair_names=fsp.pairs,
        title=f"FSP matrices of the teacher and the distilled student, mean over "
              f"{len(x_fsp)} test images"))
    files["training_curves"] = str(out / "training_curves.png")
    plot_training_curves(
        files["training_curves"], alone_hist, fsp_hist,
        results["history"]["fsp_student_fsp_loss"], e_fsp, alone_acc,
    )

    files["results_json"] = str(out / "results.json")
    files["results_md"] = str(out / "results.md")
    results["files"] = files
    results["seconds"] = {
        "teacher": r_teacher["train_seconds"],
        "student_alone": r_alone["train_seconds"],
        "fsp_student": r_fsp["train_seconds"],
        "total": round(time.time() - t_start, 1),
    }
    Path(files["results_json"]).write_text(json.dumps(results, indent=2), encoding="utf-8")
    _write_markdown(files["results_md"], results, md_table)

    print(f"\nDone in {results['seconds']['total']:.0f} s. Outputs in {out.resolve()}/:")
    for name in sorted(os.listdir(out)):
        print(f"  {out / name}")
    if return_models:
        results["models_"] = {
            "teacher": teacher, "student_alone": student_alone,
            "fsp_student": student, "distiller": distiller,
        }
    return results


# ---------------------------------------------------------------------- main


def _define_flags():
    """Defines the command-line flags, each once (importing the module defines
    none, so tests and other tools can import it freely)."""
    from absl import flags

    definitions = [
        (flags.DEFINE_string, "output_dir", DEFAULT_OUTPUT_DIR,
         "Where the results, pictures and exported student go."),
        (flags.DEFINE_float, "epochs_scale", 1.0,
         "Multiplies every epoch count (at least 1 each); 0.05 is a smoke test."),
        (flags.DEFINE_integer, "seed", 0,
         "Seed of the split, the initial weights and the data order."),
    ]
    for define, name, default, help_text in definitions:
        if name not in flags.FLAGS:
            define(name, default, help_text)
    return flags.FLAGS


def main(argv):
    from absl import app, logging

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")

    logging.set_verbosity(logging.WARNING)  # no TensorFlow INFO lines on export
    FLAGS = _define_flags()
    run(FLAGS.output_dir, epochs_scale=FLAGS.epochs_scale, seed=FLAGS.seed)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
