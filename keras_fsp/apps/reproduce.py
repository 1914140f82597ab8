"""`keras-fsp reproduce TABLE`: every run behind one results table, on one
machine, then the table.

    keras-fsp reproduce cifar10-resnet26-to-resnet8 --dataset npz:cifar10.npz \\
        --teacher results/teachers/cifar10_resnet26_seed0.weights.h5 --seeds 0,1,2 --parallel 4
    keras-fsp reproduce cifar10-two-teachers-to-resnet8 --dataset npz:cifar10.npz \\
        --teacher results/teachers/cifar10_resnet26x4_seed0.weights.h5 \\
        --teacher results/teachers/cifar10_resnet26_seed0.weights.h5 --seeds 0,1,2 --parallel 3
    keras-fsp reproduce mnist-hinton --dataset npz:mnist.npz --parallel 6

Each run is one `keras-fsp distill` (or example script) in a process of its
own, in `--runs_dir/TABLE/<method>-seed<seed>/`. Runs resume: start the same
command again after an interruption (or a `--max_minutes` stop) and finished
runs are skipped, unfinished ones continue from their last checkpoint. With
`--parallel N`, N runs share the machine (on one GPU, each gets 1/N of its
memory; `--mps` starts NVIDIA's multi-process service so their kernels
overlap; on JAX with a GPU, a method's later seeds start once its first run
has trained an epoch, and load its compiled programs from JAX's compilation
cache: `--compile_first`). At the end the results JSON
(`--results_dir/<table>.json`: every seed's last-epoch test accuracy, mean
and standard deviation, train time) and the Markdown table (`<table>.md`)
are written and the table printed.

Run it from the repository's root (the MNIST and transfer tables run the
example scripts in `examples/`).
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import List, Optional

from keras_fsp import teacher_precision
from keras_fsp.papers import methods
from keras_fsp.training.run_folder import PROCESS_LOG, RunFolder


def label(method):
    """A results table's row label for a run called `method` (a method of
    the table, with settings: `dkd:beta=1` -> "dkd, beta=1")."""
    known = methods.METHODS.get(method)
    if known is not None:
        return known.label
    base, settings = methods.split_variant(method)
    return ", ".join([base, *settings]) if settings else method


def _folder_name(method):
    return method.replace(":", "_").replace("=", "-")


@dataclasses.dataclass
class Run:
    """One training of a table: its command line and its folder."""

    method: str
    seed: int
    argv: List[str]
    run_dir: str
    needs: Optional[str] = None  # a run whose folder must be complete first

    @property
    def name(self):
        return f"{self.method}-seed{self.seed}"


def _cli(flags, *args):
    plugins = [f"--plugins={','.join(flags.plugins)}"] if flags.plugins else []
    return [sys.executable, "-m", "keras_fsp.apps.cli", *plugins, *map(str, args)]


def _teachers(flags, name, count):
    """The `--teacher` values of a table of `count` teachers (none: one is
    trained first, for a table of one)."""
    given = [t for value in flags.teacher or () for t in value.split(",") if t]
    if count > 1 and len(given) != count:
        raise SystemExit(
            f"keras-fsp reproduce {name}: give its {count} trained teachers in the order its "
            f"title names them: --teacher A --teacher B (.weights.h5 files or train-teacher run "
            f"folders); got {len(given)}.")
    if len(given) > count:
        raise SystemExit(f"keras-fsp reproduce {name}: the table has one teacher; got "
                         f"{len(given)} --teacher.")
    return given


def _distill_table(student, teacher=("--teacher_depth", 26), teacher_training=(),
                   teacher_schedule=1.0, default_methods=None, teachers=1):
    """The runs of a distillation table on CIFAR: per method and seed, one
    `keras-fsp distill` of the student that the flags `student` name (with
    its recipe's flags) from the teacher (or the ensemble of `teachers`
    teachers, all given), after training the teacher first when `--teacher`
    is not given (`keras-fsp train-teacher` with the flags `teacher` and
    `teacher_training`, for `teacher_schedule` times the students'
    schedule). `teacher` also tells distill how to load `.weights.h5`
    teachers."""

    def runs(flags, root):
        given = _teachers(flags, os.path.basename(root), teachers)
        common = ["--dataset", flags.dataset, "--dtype_policy", flags.dtype_policy, "--verbose", 0]
        out, needs = [], None
        if not given:  # train one first
            needs = os.path.join(root, "teacher-seed0")
            out.append(Run("teacher", 0, _cli(
                flags, "train-teacher", *common, *teacher, *teacher_training,
                "--schedule_scale", flags.schedule_scale * teacher_schedule, "--seed", 0,
                "--model_dir", needs), needs))
            given = [needs]
        loading = [] if "--teacher" in teacher else list(teacher)  # a spec: trained into a folder
        for method in flags.methods or default_methods or list(methods.METHODS):
            base, settings = methods.split_variant(method)
            if base not in methods.METHODS:
                raise ValueError(f"--methods: {base!r} is not one of "
                                 f"{', '.join(methods.METHODS)}.")
            method_spec = methods.get(base)
            method_spec.parse_settings(settings)  # refused here, before any run starts
            options = ["--method_options", ",".join(settings)] if settings else []
            alone = not method_spec.uses_teacher
            for seed in flags.seeds:
                run_dir = os.path.join(root, f"{_folder_name(method)}-seed{seed}")
                argv = _cli(flags, "distill", "--method", base, *options, *common, *student,
                            "--schedule_scale", flags.schedule_scale, "--seed", seed,
                            "--model_dir", run_dir)
                if not alone:
                    argv += [str(a) for a in (*loading, *[x for t in given for x in ("--teacher", t)])]
                    if flags.teacher_precision:
                        argv += ["--teacher_precision", flags.teacher_precision]
                out.append(Run(method, seed, argv, run_dir, None if alone else needs))
        return out

    return runs


def _cifar_table(student_depth, teacher_widths=(1,), default_methods=None):
    """The runs of a network-minimization table: ResNet-26 teachers (one
    per width of `teacher_widths`; several: every run distils from their
    ensemble, `--teacher A --teacher B`; a wide one trained here with weight
    decay 5e-4) and a ResNet-`student_depth` student per method and seed
    (`default_methods`, or every method)."""
    wide = set(teacher_widths) != {1}
    widths = ["--teacher_width", ",".join(map(str, teacher_widths))] if wide else []
    return _distill_table(["--student_depth", student_depth], ["--teacher_depth", 26, *widths],
                          ["--weight_decay", 5e-4] if wide else [], default_methods=default_methods,
                          teachers=len(teacher_widths))


# Vision Transformers train with their usual recipe (AdamW, warm-up, cosine
# decay, Cutout; `keras_fsp.papers.recipes.with_adamw`), CNNs with theirs.
VIT_RECIPE = ("--optimizer", "adamw", "--cutout", 16)
VIT_TEACHER = ("--teacher", "keras_fsp.papers.vit:vit_teacher", *VIT_RECIPE)
VIT_STUDENT = ("--student", "keras_fsp.papers.vit:vit_student", *VIT_RECIPE)
# Feature terms pair a ViT's blocks by depth, with a CNN's stages too (its
# tokens read as their grid of patches: `keras_fsp.pairing`).
VIT_METHODS = ("none", "kd", "fsp-kd", "fitnet", "at-kd", "ls-kd")


def _example(script, *args):
    return [sys.executable, os.path.join("examples", script), *map(str, args)]


def _mnist_runs(flags, root):
    teachers = {s: os.path.join(root, f"teacher-seed{s}") for s in flags.seeds}
    out = []
    for s in flags.seeds:
        common = ["--dataset", flags.dataset, "--seed", s]
        out.append(Run("teacher", s, _example("mnist_hinton.py", "--method", "teacher",
                                              "--run_dir", teachers[s], *common), teachers[s]))
        for method, extra in (("student_alone", []), ("student_alone_jitter", ["--student_jitter"])):
            run_dir = os.path.join(root, f"{method}-seed{s}")
            out.append(Run(method, s, _example("mnist_hinton.py", "--method", "student_alone",
                                               "--run_dir", run_dir, *extra, *common), run_dir))
        weights = os.path.join(teachers[s], "teacher.weights.h5")
        for method, extra in (("kd_t20", ["--temperature", 20]),
                              ("kd_t20_jitter", ["--temperature", 20, "--student_jitter"]),
                              ("kd_t4_jitter", ["--temperature", 4, "--student_jitter"]),
                              ("omitted_3", ["--omitted_digit", 3])):
            run_dir = os.path.join(root, f"{method}-seed{s}")
            kind = "omitted_class" if method.startswith("omitted") else "kd"
            out.append(Run(method, s, _example(
                "mnist_hinton.py", "--method", kind, "--teacher_weights", weights,
                "--run_dir", run_dir, *extra, *common), run_dir, needs=teachers[s]))
    return out


def _transfer_runs(flags, root):
    teacher = os.path.join(root, "teacher-seed0")
    out = [Run("teacher", 0, _example("cifar10_transfer.py", "--method", "teacher",
                                      "--dataset", flags.dataset, "--seed", 0,
                                      "--run_dir", teacher), teacher)]
    weights = os.path.join(teacher, "teacher.weights.h5")
    for method in flags.methods or ("student_alone", "teacher_finetuned", "fitnet", "fsp", "at"):
        for s in flags.seeds:
            run_dir = os.path.join(root, f"{method}-seed{s}")
            out.append(Run(method, s, _example(
                "cifar10_transfer.py", "--method", method, "--dataset", flags.dataset,
                "--teacher_weights", weights, "--seed", s, "--run_dir", run_dir), run_dir,
                needs=teacher))
    return out


@dataclasses.dataclass
class Table:
    title: str
    runs: object  # (flags, root) -> [Run]
    metric: str = "test_accuracy"


TABLES = {
    "cifar10-resnet26-to-resnet8": Table(
        "Network minimization, CIFAR-10: ResNet-26 -> ResNet-8", _cifar_table(8)),
    "cifar10-resnet26-to-resnet14": Table(
        "Network minimization, CIFAR-10: ResNet-26 -> ResNet-14", _cifar_table(14)),
    "cifar10-resnet26x4-to-resnet8": Table(
        "A strong teacher, CIFAR-10: ResNet-26x4 -> ResNet-8", _cifar_table(8, (4,))),
    "cifar10-resnet26x4-to-resnet20": Table(
        "A strong teacher, CIFAR-10: ResNet-26x4 -> ResNet-20", _cifar_table(20, (4,))),
    "cifar10-vit-to-vit": Table(
        "Vision Transformers, CIFAR-10: ViT-6x256 -> ViT-4x128",
        _distill_table(VIT_STUDENT, VIT_TEACHER, teacher_schedule=2.0,
                       default_methods=VIT_METHODS)),
    "cifar10-resnet26x4-to-vit": Table(
        "A CNN teacher for a Vision Transformer, CIFAR-10: ResNet-26x4 -> ViT-4x128",
        _distill_table(VIT_STUDENT, ("--teacher_depth", 26, "--teacher_width", 4),
                       ("--weight_decay", 5e-4), default_methods=VIT_METHODS)),
    "cifar10-vit-to-resnet8": Table(
        "A Vision Transformer teacher for a CNN, CIFAR-10: ViT-6x256 -> ResNet-8",
        _distill_table(("--student_depth", 8), VIT_TEACHER, teacher_schedule=2.0,
                       default_methods=VIT_METHODS)),
    "cifar10-two-teachers-to-resnet8": Table(
        "Two teachers, CIFAR-10: ResNet-26x4 + ResNet-26 -> ResNet-8 (the mean of their logits)",
        _cifar_table(8, (4, 1), default_methods=("kd",))),
    "mnist-hinton": Table("Soft targets on MNIST (Hinton et al.)", _mnist_runs, "test_errors"),
    "cifar10-transfer": Table(
        "Transfer from a teacher trained on other classes (CIFAR-10, 6 -> 4 classes)",
        _transfer_runs),
}


# ------------------------------------------------------------------ running


def _complete(run_dir):
    result = RunFolder(run_dir).read_result()
    return bool(result and result.get("complete"))


def _start_mps(log):
    try:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True, capture_output=True)
        log("started the CUDA multi-process service (MPS)")
        return True
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"could not start CUDA MPS ({e}); the runs time-share the GPU")
        return False


def _stop_mps():
    subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", capture_output=True)


def _compiles_on_accelerator():
    """Whether the runs will compile with JAX for a GPU or TPU (and so keep
    their programs in JAX's compilation cache): asked of a short process of
    its own, so that this one never takes a GPU's memory."""
    if os.environ.get("KERAS_BACKEND") != "jax":
        return False
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() not in ("", "cpu")


def _first_epoch_done(run_dir):
    return _complete(run_dir) or bool(RunFolder(run_dir).metrics_rows())


def _ended(name, code, result):
    """The line that says how a run's process ended: a failure, a run that
    stopped before its last epoch (its --max_minutes) or its result."""
    if code != 0:
        return f"{name}: failed, exit {code} (its {PROCESS_LOG} says why)"
    if not result.get("complete"):
        return f"{name}: stopped before its last epoch (--max_minutes); run the command again to resume it"
    return (f"{name}: complete, test accuracy {result.get('test_accuracy')}, "
            f"{result.get('train_seconds')} s")


def execute(runs, parallel=1, max_minutes=None, log=print, mps=False, compile_first=False):
    """Runs `runs` (skipping complete ones), at most `parallel` at a time,
    each after the run it needs. With `compile_first`, while a run of a
    method has not finished its first epoch no other run of that method
    starts: the seeds of a method compile the same programs, and the later
    ones then load them from JAX's compilation cache instead of compiling
    them all at once (which leaves a GPU idle while they share the host's
    cores). Returns `{run name: exit code}` of the runs started."""
    started_at = time.time()
    pending = [r for r in runs if not _complete(r.run_dir)]
    for r in runs:
        if r not in pending:
            log(f"{r.name}: complete, skipped")
    env = dict(os.environ)
    if parallel > 1:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{min(0.75, 0.9 / parallel):.3f}")
    mps = mps and _start_mps(log)
    running, codes = {}, {}
    try:
        while pending or running:
            for name, (run, proc, out) in list(running.items()):
                if proc.poll() is not None:
                    out.close()
                    codes[name] = proc.returncode
                    log(_ended(name, proc.returncode, RunFolder(run.run_dir).read_result() or {}))
                    del running[name]
            left = None if max_minutes is None else max_minutes - (time.time() - started_at) / 60
            ready = [r for r in pending if r.needs is None or _complete(r.needs)]
            compiling = {run.method for run, _, _ in running.values()
                         if compile_first and not _first_epoch_done(run.run_dir)}
            ready = [r for r in ready if r.method not in compiling]
            blocked = [r for r in pending if r.needs is not None and r.needs in
                       {x.run_dir for x in runs if x.name in codes and codes[x.name] != 0}]
            for r in blocked:
                log(f"{r.name}: skipped, the run it needs failed")
                pending.remove(r)
            while ready and len(running) < parallel and (left is None or left > 1.5):
                run = ready.pop(0)
                if run.method in compiling:
                    continue
                if compile_first:
                    compiling.add(run.method)
                pending.remove(run)
                argv = list(run.argv) + ([] if left is None else ["--max_minutes", f"{left - 1:.1f}"])
                os.makedirs(run.run_dir, exist_ok=True)
                out = open(RunFolder(run.run_dir).file(PROCESS_LOG), "a", encoding="utf-8")
                log(f"{run.name}: started")
                running[run.name] = (run, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                           env=env), out)
            if left is not None and left <= 1.5 and not running:
                for r in pending:
                    log(f"{r.name}: not started, --max_minutes reached (run the command again)")
                break
            if not running and pending and not ready:
                for r in pending:
                    log(f"{r.name}: waits for {r.needs}, which is not complete")
                break
            time.sleep(0.5)
    finally:
        for _, proc, out in running.values():
            proc.terminate()
            out.close()
        if mps:
            _stop_mps()
    return codes


def summarize(name, table, runs, command):
    """The table's results: per method, every seed's value, mean and std."""
    rows = {}
    devices = set()
    for run in runs:
        result = RunFolder(run.run_dir).read_result()
        row = rows.setdefault(run.method, {"label": label(run.method), "seeds": [],
                                           table.metric: [], "train_seconds": [], "complete": True})
        if not result or not result.get("complete"):
            row["complete"] = False
            continue
        row["seeds"].append(run.seed)
        row[table.metric].append(result[table.metric])
        row["train_seconds"].append(result.get("train_seconds"))
        devices.add(result.get("device", "unknown"))
        for key in ("teacher_test_accuracy", "test_errors_after", "omitted_accuracy_before",
                    "omitted_accuracy_after"):
            if key in result:
                row.setdefault(key, []).append(result[key])
    for row in rows.values():
        values = row[table.metric]
        if values:
            row["mean"] = statistics.fmean(values)
            row["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"table": name, "title": table.title, "metric": table.metric,
            "devices": sorted(devices), "command": command, "rows": rows}


def markdown(summary):
    metric = summary["metric"]
    percent = metric == "test_accuracy"
    unit = "test accuracy % (mean ± std)" if percent else f"{metric.replace('_', ' ')} (mean ± std)"
    lines = [f"### {summary['title']}", "",
             f"| method | seeds | {unit} | per seed | train time (s, mean) |",
             "| --- | --- | --- | --- | --- |"]
    scale = 100.0 if percent else 1.0
    for row in summary["rows"].values():
        values = [v * scale for v in row[metric]]
        if not values:
            lines.append(f"| {row['label']} | - | not complete | | |")
            continue
        seconds = [s for s in row["train_seconds"] if s is not None]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {row['label']} | {', '.join(map(str, row['seeds']))} | "
            f"**{statistics.fmean(values):.2f} ± {std:.2f}** | "
            f"{', '.join(f'{v:.2f}' for v in values)} | "
            f"{statistics.fmean(seconds):.0f} |" if seconds else " |")
    lines += ["", f"Devices: {', '.join(summary['devices']) or 'unknown'}. Command: `{summary['command']}`.", ""]
    return "\n".join(lines)


def _flags(argv):
    from absl import flags

    fv = flags.FlagValues()
    d = dict(flag_values=fv)
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every method.", **d)
    flags.DEFINE_list("methods", None, "Only these methods (default: the table's); a method "
                      "with settings of its recipe as NAME:SETTING=VALUE[:SETTING=VALUE], e.g. "
                      "dkd:beta=1:warmup_epochs=5 (distill's --method_options), is a row of "
                      "its own.", **d)
    flags.DEFINE_string("dataset", None, "The data: npz:PATH (arrays x_train, y_train, x_test, "
                        "y_test), or cifar10 through tensorflow-datasets.", **d)
    flags.DEFINE_multi_string("teacher", None, "CIFAR tables: the teacher's weights (.weights.h5 "
                              "or a train-teacher run folder); default: train one first. "
                              "cifar10-two-teachers-to-resnet8: its two teachers, the ResNet-26x4 "
                              "then the ResNet-26 (--teacher A --teacher B).", **d)
    flags.DEFINE_string("runs_dir", "runs/reproduce", "Where the runs' folders go.", **d)
    flags.DEFINE_string("results_dir", "results", "Where the table's JSON and Markdown go.", **d)
    flags.DEFINE_integer("parallel", 1, "Runs at a time.", **d)
    flags.DEFINE_boolean("mps", False, "Start CUDA MPS for the parallel runs (NVIDIA GPUs).", **d)
    flags.DEFINE_float("max_minutes", None, "Start no run after this many minutes and stop the "
                       "running ones at an epoch end before it (run again to continue).", **d)
    flags.DEFINE_float("schedule_scale", 1.0, "CIFAR tables: shrink every schedule (quick "
                       "checks; the published tables use 1).", **d)
    flags.DEFINE_enum("dtype_policy", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                      "CIFAR tables: every run's --dtype_policy (mixed_bfloat16 on a recent "
                      "GPU).", **d)
    flags.DEFINE_enum("teacher_precision", None, list(teacher_precision.PRECISIONS),
                      "CIFAR and ViT tables: every distillation's --teacher_precision (the frozen "
                      "teacher in a lower precision than the student).", **d)
    flags.DEFINE_boolean("compile_first", None, "Start one seed of each method first and its "
                         "other seeds once it has trained an epoch, so that they load its compiled "
                         "programs from JAX's compilation cache instead of all compiling at once "
                         "(default: with --parallel on JAX with a GPU or TPU).", **d)
    flags.DEFINE_boolean("summary_only", False, "Write the table from the runs done, run nothing.", **d)
    flags.DEFINE_list("plugins", [], "Files or modules of your own methods (passed to each run).",
                      **d)
    rest = fv(argv)[1:]
    return fv, rest


def main(argv, plugins=()):
    """`keras-fsp reproduce TABLE [--flags]` (`argv[0]` is "reproduce");
    `plugins` (loaded already) are passed to every run."""
    from absl import flags as absl_flags

    try:
        fv, rest = _flags(argv)
    except absl_flags.Error as e:
        raise SystemExit(f"keras-fsp reproduce: {e}") from None
    fv.plugins = list(dict.fromkeys([*plugins, *fv.plugins]))
    if len(rest) != 1 or rest[0] not in TABLES:
        raise SystemExit(f"keras-fsp reproduce: name one table of {', '.join(TABLES)}; got {rest}.")
    name = rest[0]
    table = TABLES[name]
    fv.seeds = [int(s) for s in fv.seeds]
    if fv.dataset is None:
        fv.dataset = "cifar10" if name.startswith("cifar10") else "mnist"
    root = os.path.join(fv.runs_dir, name)
    try:
        runs = table.runs(fv, root)
    except ValueError as e:  # an unknown --methods name or setting
        raise SystemExit(f"keras-fsp reproduce {name}: {e}") from None
    command = "keras-fsp reproduce " + " ".join(argv[1:])
    compile_first = fv.compile_first
    if compile_first is None:  # only where it helps: several seeds at once, a compilation cache
        seeds_at_once = fv.parallel > 1 and len({r.method for r in runs}) < len(runs)
        compile_first = seeds_at_once and not fv.summary_only and _compiles_on_accelerator()
    codes = {} if fv.summary_only else execute(runs, fv.parallel, fv.max_minutes, mps=fv.mps,
                                               compile_first=compile_first)
    summary = summarize(name, table, runs, command)
    os.makedirs(fv.results_dir, exist_ok=True)
    stem = os.path.join(fv.results_dir, name.replace("-", "_"))
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    text = markdown(summary)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    failed = [name for name, code in codes.items() if code != 0]
    if failed:
        from keras_fsp.apps.config import CLIError

        raise CLIError(f"reproduce {name}: {len(failed)} run(s) failed: {', '.join(failed)} "
                       f"(each run's {PROCESS_LOG} under {root} says why); the table holds the "
                       "others.", code=1)
    return summary
