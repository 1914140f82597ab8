"""Speed where users run: keras_fsp on ImageNet-sized keras.applications
networks against the same torchvision networks in PyTorch, measured in one
run on one GPU.

    KERAS_BACKEND=jax python benchmarks/users_networks.py \
        --json_out benchmarks/results/gpu-users-networks.json

Each `--pairs` entry is a keras.applications `teacher:student` pair, built
with `weights=None`, `--image_size` inputs, `--classes` logits (no softmax)
and, where the constructor takes it, `include_preprocessing=False` (Keras'
EfficientNetB0 does not: it keeps its rescaling and normalisation layers,
torchvision's has none). The teacher is frozen. Inputs are random images of
the uint8 range scaled to [-1, 1], labels random classes; nothing is
augmented, on either side.

Measurements (each a record `{"name", "pair", "batch_size", "ms_per_step",
"images_per_sec", ...}` in `--json_out`, written as soon as it is taken):

- `fit_stage_kd`, `fit_stage_fsp`: `FSPDistiller` in its `kd` stage (0.9
  soft targets at T = 4 + 0.1 labels) and its `fsp` stage (the section pairs
  and projections found automatically), `fit` over `--train_examples` images
  held on the device (`keras_fsp.inputs.DeviceArrays`) with
  `steps_per_execution` = one epoch (`keras_fsp.jax_steps`), SGD with
  momentum 0.9, under `--dtype_policy`; timed over `--fit_epochs` epochs
  after one that compiles (`compile_seconds`: that epoch's time beyond a
  timed one);
- `fit_student_alone`: the student alone on the labels, the same `fit`;
- `fit_stage_kd_cached`: `kd` on the teacher's logits cached once
  (`keras_fsp.teacher_cache`; its time in `teacher_cache_seconds`), so the
  teacher does not run;
- `teacher_forward`: the frozen teacher's inference pass alone, jitted, on
  one device batch: the part of a `kd` step that the cache removes;
- `..._teacher_bf16`, `..._teacher_int8` (of `fit_stage_kd`,
  `fit_stage_fsp`, `teacher_forward`): the same with the frozen teacher in
  bfloat16 or int8 (`keras_fsp.teacher_in_precision`; the student as
  `--dtype_policy` says). int8 quantizes the Dense layers of a teacher
  (ConvNeXt's pointwise layers) and refuses a convolutional one (ResNet50):
  that refusal is printed in one line and the measurement skipped;
- `torch_graph_kd`, `torch_graph_student_alone`, `torch_eager_kd`,
  `torch_compile_kd`: the same networks from torchvision, the same KD loss
  (`torch_reference.kd_loss`: the soft cross-entropy, whose gradients are
  those of keras_fsp's KL divergence), SGD with momentum 0.9, channels-last under bfloat16 autocast
  (`torch_reference.run_networks`): the whole step in one CUDA graph,
  eager, and `torch.compile`d (`--torch_compile_mode`; `compile_seconds`:
  its first step). They run first, in a process of their own, before JAX
  takes the GPU's memory; without torch or torchvision they are skipped.

With `--profile_dir`, each `fit` measurement traces one more epoch there
(`jax.profiler`); `trace_summary.py` then says where each one's GPU time
goes and which kernels differ between two (e.g. `fit_stage_fsp` against
`fit_stage_kd`).

At the end a table per pair and batch size, with `kd` against the fastest
PyTorch `kd` step (`torch ms / keras_fsp ms`: above 1, keras_fsp is faster),
what the `fsp` stage costs against `kd`, and `kd` with the teacher in
bfloat16 and in int8 against `kd`. `--max_seconds` stops starting
new measurements (the PyTorch ones included).
"""

import gc
import inspect
import json
import os
import re
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_throughput as g  # noqa: E402  (its fit timing; its --batch_sizes, --fit_epochs, --iters, --torch, --max_seconds, --json_out)

flags.DEFINE_list("pairs", ["ResNet50:MobileNetV2", "ResNet50:EfficientNetB0",
                           "ConvNeXtTiny:MobileNetV2"],
                  "keras.applications teacher:student pairs (the same names in torchvision: "
                  "resnet50, mobilenet_v2, efficientnet_b0, ...).")
flags.DEFINE_integer("image_size", 224, "Height and width of the images.")
flags.DEFINE_integer("classes", 1000, "Classes of the networks' logits.")
flags.DEFINE_string("dtype_policy", "mixed_bfloat16", "Keras dtype policy; PyTorch runs under "
                    "bfloat16 autocast when it is mixed_bfloat16, else in float32.")
flags.DEFINE_integer("steps_per_execution", 20, "compile(steps_per_execution=...): by default "
                     "the steps of one epoch.")
flags.DEFINE_integer("train_examples", None, "Training images held on the device (default: "
                     "steps_per_execution batches).", allow_override=True)
flags.DEFINE_list("measurements", ["fit_stage_kd", "fit_stage_fsp", "fit_student_alone",
                                   "teacher_forward", "fit_stage_kd_cached",
                                   "teacher_forward_teacher_bf16", "fit_stage_kd_teacher_bf16",
                                   "fit_stage_fsp_teacher_bf16", "teacher_forward_teacher_int8",
                                   "fit_stage_kd_teacher_int8", "fit_stage_fsp_teacher_int8"],
                  "keras_fsp measurements to take, in this order.")
flags.DEFINE_list("torch_ways", ["graph_kd", "graph_student_alone", "eager_kd", "compile_kd"],
                  "PyTorch measurements (torch_reference.run_networks ways).")
flags.DEFINE_bool("torch_compile", True, "Include the torch.compile ways.")
flags.DEFINE_string("torch_compile_mode", "max-autotune-no-cudagraphs", "torch.compile mode.")
flags.DEFINE_string("profile_dir", None, "Trace one more epoch of each fit measurement into "
                    "PROFILE_DIR/<name>-<student>-<batch> (jax.profiler, Perfetto trace; summarise "
                    "them with trace_summary.py).")
flags.DEFINE_bool("torch_process", False, "Take the PyTorch measurements here and print them "
                  "as JSON lines (what this script runs in a process of its own).")
flags.DEFINE_float("torch_deadline", None, "With --torch_process: start nothing after this time "
                   "(seconds since the epoch).")
FLAGS = flags.FLAGS
FLAGS.set_default("batch_sizes", ["128", "256"])
FLAGS.set_default("iters", 50)

TORCH_KD = ("torch_graph_kd", "torch_eager_kd", "torch_compile_kd")
# A measurement's suffix -> the precision of its teacher (`teacher_in_precision`).
TEACHER_PRECISIONS = {"_teacher_bf16": "bfloat16", "_teacher_int8": "int8"}


def _pairs():
    return [tuple(p.split(":")) for p in FLAGS.pairs]


def _pair_name(teacher, student):
    return f"{teacher}->{student}"


def _examples(batch_size):
    return FLAGS.train_examples or FLAGS.steps_per_execution * batch_size


# ----------------------------------------------------------------- PyTorch


def torchvision_name(keras_name):
    """`ResNet50` -> `resnet50`, `MobileNetV2` -> `mobilenet_v2`,
    `EfficientNetB0` -> `efficientnet_b0`, `MobileNetV3Small` ->
    `mobilenet_v3_small`."""
    return re.sub(r"(?<=[a-z0-9])(?=V\d|B\d|Small|Large|Tiny|Base)", "_", keras_name).lower()


def _emit(entry):
    print(json.dumps(entry), flush=True)


def torch_main():
    """The PyTorch measurements, one JSON line each (`--torch_process`)."""
    try:
        import torch
        import torchvision

        import torch_reference
    except ImportError as e:
        _emit({"error": f"torch or torchvision cannot be imported ({e}): no PyTorch peers"})
        return
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = {"framework": "pytorch", "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "torchvision": torchvision.__version__}
    ways = [w for w in FLAGS.torch_ways if FLAGS.torch_compile or not w.startswith("compile_")]
    bf16 = FLAGS.dtype_policy == "mixed_bfloat16"
    size = FLAGS.image_size

    def network(name):
        return getattr(torchvision.models, torchvision_name(name))(weights=None,
                                                                   num_classes=FLAGS.classes)

    for t_name, s_name in _pairs():
        pair = _pair_name(t_name, s_name)
        try:
            teacher = network(t_name)
            params = {"teacher_params": sum(p.numel() for p in teacher.parameters()),
                      "student_params": sum(p.numel() for p in network(s_name).parameters())}
        except Exception as e:  # noqa: BLE001 (one pair, not the run)
            _emit({"error": f"{pair}: {type(e).__name__}: {e}"})
            continue
        for b in (int(b) for b in FLAGS.batch_sizes):
            # The same images as the Keras side: uint8 range, scaled to [-1, 1].
            x = (torch.randint(0, 256, (b, 3, size, size), device=device).float() - 127.5) / 127.5
            x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, FLAGS.classes, (b,), device=device)
            for way in ways:
                if FLAGS.torch_deadline and time.time() > FLAGS.torch_deadline:
                    _emit({"error": f"--max_seconds reached: torch_{way} {pair} {b} not measured"})
                    continue
                try:
                    for name, seconds, extra in torch_reference.run_networks(
                            teacher, lambda: network(s_name), x, y, ways=(way,), iters=FLAGS.iters,
                            bf16=bf16, compile_mode=FLAGS.torch_compile_mode):
                        if seconds is None:
                            _emit({"error": f"{name} {pair} {b}: skipped ({extra['skipped']})"})
                        else:
                            _emit({"name": name, "pair": pair, "batch_size": b, "seconds": seconds,
                                   "autocast": "bfloat16" if bf16 else None, **params, **info,
                                   **extra})
                except Exception as e:  # noqa: BLE001 (report it and go on with the others)
                    _emit({"error": f"torch_{way} {pair} {b}: {type(e).__name__}: {e}"})


def run_torch_process():
    """This script with `--torch_process`, its lines recorded as they come:
    its own process, so that a CUDA error there cannot reach JAX, and done
    before JAX reserves the GPU's memory."""
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--torch_process",
               f"--torch_deadline={g._START + FLAGS.max_seconds}"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        for line in process.stdout:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):  # PyTorch's own output
                print(f"PyTorch: {line.rstrip()}", flush=True)
                continue
            if "error" in entry:
                print(f"PyTorch peer: {entry['error']}", flush=True)
            else:
                g._record(entry.pop("name"), entry.pop("batch_size"), entry.pop("seconds"),
                          **entry)
    if process.returncode:
        print(f"PyTorch process exited with status {process.returncode}", flush=True)


# ----------------------------------------------------------------- keras_fsp


def application(name, role):
    """keras.applications `name` as the benchmark builds it: untrained,
    `--image_size` inputs, `--classes` logits."""
    import keras

    constructor = getattr(keras.applications, name)
    accepts = inspect.signature(constructor).parameters
    kwargs = dict(weights=None, input_shape=(FLAGS.image_size, FLAGS.image_size, 3),
                  classes=FLAGS.classes, classifier_activation=None)
    if "include_preprocessing" in accepts:  # the inputs are scaled already
        kwargs["include_preprocessing"] = False
    if "name" in accepts:  # a network may be both teacher and student
        kwargs["name"] = f"{role}_{name.lower()}"
    return constructor(**kwargs)


def trainable_params(model):
    """Trainable parameters, as PyTorch counts `parameters()`."""
    import math

    return sum(math.prod(v.shape) for v in model.trainable_weights)


def images(n):
    """`n` random images of the uint8 range scaled to [-1, 1], and labels."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, FLAGS.image_size, FLAGS.image_size, 3), dtype=np.uint8)
    x = x.astype("float32")
    x -= 127.5  # in place: the float32 array is the largest thing on the host
    x /= 127.5
    return x, rng.integers(0, FLAGS.classes, n).astype("int32")


def teacher_forward(teacher, x):
    """Seconds per jitted inference pass of `teacher` on the device batch
    `x`, and `{"compile_seconds"}`."""
    import jax

    def forward(trainable, non_trainable, x):
        return teacher.stateless_call(trainable, non_trainable, x, training=False)[0]

    trainable = [v.value for v in teacher.trainable_variables]
    non_trainable = [v.value for v in teacher.non_trainable_variables]
    x = jax.device_put(x)
    start = time.perf_counter()
    compiled = jax.jit(forward).lower(trainable, non_trainable, x).compile()
    compile_seconds = round(time.perf_counter() - start, 2)
    return g._time(compiled, (trainable, non_trainable, x), FLAGS.iters), {
        "compile_seconds": compile_seconds}


class Teachers:
    """One pair's frozen teacher in each precision, each made once (a
    refusal too: it is raised again for each measurement asking for it)."""

    def __init__(self, teacher):
        self.made = {None: teacher}

    def split(self, name):
        """`(name without its precision suffix, the teacher it measures)`."""
        from keras_fsp import teacher_in_precision

        suffix = next((s for s in TEACHER_PRECISIONS if name.endswith(s)), None)
        if suffix is None:
            return name, self.made[None]
        precision = TEACHER_PRECISIONS[suffix]
        if precision not in self.made:
            try:
                self.made[precision] = teacher_in_precision(self.made[None], precision)
            except ValueError as e:
                self.made[precision] = e
        if isinstance(self.made[precision], ValueError):
            raise self.made[precision]
        return name[: -len(suffix)], self.made[precision]


def measure(name, teachers, student_name, x, y, batch_size):
    """Seconds per step of keras_fsp measurement `name`, and its extra fields."""
    profile = FLAGS.profile_dir and os.path.join(
        FLAGS.profile_dir, f"{name}-{student_name}-{batch_size}")
    name, teacher = teachers.split(name)
    if name == "teacher_forward":
        return teacher_forward(teacher, x[:batch_size])
    student = application(student_name, "student")
    params = trainable_params(student)
    spe = FLAGS.steps_per_execution
    if name == "fit_student_alone":  # the distiller's optimizer
        model = g.compile_student(student, steps_per_execution=spe, learning_rate=0.01)
    else:
        stage = name[len("fit_stage_"):].removesuffix("_cached")
        model = g.compile_distiller(teacher, student, stage, steps_per_execution=spe)
    seconds, extra = g.fit_seconds(model, x, y, batch_size, cached=name.endswith("_cached"),
                                   profile_dir=profile, cache_batch_size=batch_size)
    return seconds, {"student_params": params, "train_examples": len(x), **extra}


def run_keras():
    import jax
    import keras

    keras.config.set_dtype_policy(FLAGS.dtype_policy)
    info = {"framework": "keras_fsp", "device": jax.devices()[0].device_kind,
            "keras": keras.__version__, "jax": jax.__version__,
            "backend": keras.backend.backend(), "dtype_policy": FLAGS.dtype_policy}
    print(f"device: {info['device']}; keras {info['keras']}, jax {info['jax']}", flush=True)
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    x_all, y_all = images(max(_examples(b) for b in batch_sizes))
    for t_name, s_name in _pairs():
        pair = _pair_name(t_name, s_name)
        teacher = application(t_name, "teacher")  # frozen: one for every measurement
        teacher_params = trainable_params(teacher)
        teachers = Teachers(teacher)
        for b in batch_sizes:
            x, y = x_all[:_examples(b)], y_all[:_examples(b)]
            for name in FLAGS.measurements:
                if g._out_of_time():
                    print(f"--max_seconds reached: {name} {pair} {b} not measured", flush=True)
                    continue
                try:
                    seconds, extra = measure(name, teachers, s_name, x, y, b)
                except Exception as e:  # noqa: BLE001 (one failed measurement, not the run)
                    print(f"{name} {pair} {b}: {type(e).__name__}: {e}", flush=True)
                    continue
                finally:
                    gc.collect()  # the last model's device buffers
                g._record(name, b, seconds, pair=pair, teacher_params=teacher_params,
                          image_size=FLAGS.image_size, classes=FLAGS.classes, **info, **extra)
    stats = jax.devices()[0].memory_stats() or {}
    print(f"peak device memory in use (keras_fsp): {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB",
          flush=True)


# ----------------------------------------------------------------- summary


def summary(results):
    """Markdown tables of `results`: every measurement, then the ratios."""
    devices = sorted({f"{r['framework']}: {r['device']}" for r in results if "device" in r})
    lines = [f"GPU: {'; '.join(devices) or 'none measured'}"]
    blocks = {}
    for r in results:
        blocks.setdefault((r["pair"], r["batch_size"]), {})[r["name"]] = r
    ratios = []
    for (pair, b), rows in blocks.items():
        lines += ["", f"{pair}, batch {b}", "", "| measurement | ms/step | images/s |",
                  "| --- | --- | --- |"]
        lines += [f"| {n} | {r['ms_per_step']:.2f} | {r['images_per_sec']:,.0f} |"
                  for n, r in rows.items()]
        ms = {n: r["ms_per_step"] for n, r in rows.items()}
        torch_kd = min((n for n in TORCH_KD if n in ms), key=ms.get, default=None)

        def ratio(num, den):
            return f"{ms[num] / ms[den]:.2f}" if num in ms and den in ms else ""

        ratios.append(f"| {pair} | {b} | {ratio(torch_kd, 'fit_stage_kd') if torch_kd else ''}"
                      f"{f' ({torch_kd})' if torch_kd and 'fit_stage_kd' in ms else ''} | "
                      f"{ratio('torch_graph_student_alone', 'fit_student_alone')} | "
                      f"{ratio('fit_stage_fsp', 'fit_stage_kd')} | "
                      f"{ratio('teacher_forward', 'fit_stage_kd')} | "
                      f"{ratio('fit_stage_kd_cached', 'fit_stage_kd')} | "
                      f"{ratio('fit_stage_kd_teacher_bf16', 'fit_stage_kd')} | "
                      f"{ratio('fit_stage_kd_teacher_int8', 'fit_stage_kd')} |")
    lines += ["", "| pair | batch | keras kd speed: fastest torch kd ms / keras ms | student alone: "
              "torch graph ms / keras ms | fsp / kd time | teacher forward / kd time | "
              "kd cached / kd time | kd, bf16 teacher / kd time | kd, int8 teacher / kd time |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *ratios]
    return "\n".join(lines)


def main(_):
    if FLAGS.torch_process:
        torch_main()
        return
    if FLAGS.torch:  # first: before JAX reserves the GPU's memory
        run_torch_process()
    if FLAGS.measurements:
        run_keras()
    print("\n" + summary(g.RESULTS), flush=True)


if __name__ == "__main__":
    app.run(main)
