"""Images per second on an accelerator (JAX backend), keras_fsp against the
fastest PyTorch step of the same networks, measured in one run on one GPU.

    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py \
        --dataset npz:cifar10_arrays.npz --json_out benchmarks/results/gpu-h100.json

Measurements (each a name in the JSON list `{"name", "batch_size",
"images_per_sec", "ms_per_step", ...}`):

- `torch_graph_{kd,fsp,student_alone}` (and `_bf16`): the same networks and
  losses in PyTorch (`torch_reference.py`), the whole training step captured
  in one CUDA graph and replayed: the peer to beat. `torch_reference_*`,
  `torch_student_alone`: the same step in eager PyTorch.
- `stage_{fsp,kd,kd_fsp,task}`, `student_alone`: keras_fsp's compiled
  training step (`model.train_step` under `jax.jit`, exactly what `fit`
  runs) called from Python on one device-resident batch: keras_fsp's own
  compiled step. `temp_mib` is XLA's temporary buffer size for the step.
- `fit_stage_{fsp,kd,kd_fsp}`, `fit_student_alone` (and `_bf16` under
  `mixed_bfloat16`): `fit` over the training set held on the device
  (`keras_fsp.inputs.DeviceArrays`) with pad-crop-flip augmentation inside
  the step and `steps_per_execution` = one epoch (`keras_fsp.jax_steps`);
  `fit_spe1_*`: the same `fit` one step per dispatch (Keras' own loop);
  `_noaug`: without augmentation; `_cached`: without augmentation, on a
  teacher cache (`teacher_outputs`, its time in `teacher_cache_seconds`),
  so the teacher does not run; `_teacher_bf16` (also of `stage_*`): the
  frozen teacher in bfloat16 (`keras_fsp.teacher_in_precision`: its
  weights stored and its layers computing in bfloat16), the student as the
  rest of the name says (float32, or `mixed_bfloat16` with `_bf16`).
- `fsp_parts_*`: where an FSP step's time goes: the teacher's forward pass to
  its last FSP map (`_bf16`: the teacher in bfloat16), the student's forward
  and backward pass to its last FSP map, and the FSP matrices with their
  loss and gradient alone.

Every measurement is written to `--json_out` as soon as it is taken, and the
run stops starting new ones after `--max_seconds`.
"""

import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_list("batch_sizes", ["128", "512"], "Batch sizes.")
flags.DEFINE_string("pair", "26:8", "teacher_depth:student_depth.")
flags.DEFINE_list("steps", ["student_alone", "stage_kd", "stage_fsp", "stage_kd_fsp", "stage_task",
                            "stage_kd_teacher_bf16", "stage_fsp_teacher_bf16"],
                  "Compiled steps to time.")
flags.DEFINE_list("fits", ["fit_student_alone", "fit_stage_kd", "fit_stage_fsp",
                           "fit_spe1_stage_kd", "fit_spe1_student_alone",
                           "fit_student_alone_bf16", "fit_stage_kd_bf16", "fit_stage_fsp_bf16",
                           "fit_stage_kd_teacher_bf16", "fit_stage_fsp_teacher_bf16",
                           "fit_stage_kd_bf16_teacher_bf16", "fit_stage_fsp_bf16_teacher_bf16"],
                  "fit paths to time.")
flags.DEFINE_bool("fsp_parts", True, "Time the parts of an FSP step.")
flags.DEFINE_bool("torch", True, "Also time the PyTorch peers.")
flags.DEFINE_integer("iters", 300, "Timed iterations of a compiled step.")
flags.DEFINE_integer("fit_epochs", 2, "Timed epochs of a fit (after one that compiles).")
flags.DEFINE_string("dataset", None, "npz:PATH with x_train, y_train (uint8 CIFAR-10 images) for "
                    "the fit measurements; random images when absent.")
flags.DEFINE_integer("train_examples", None, "Use only this many training images (default all).")
flags.DEFINE_float("max_seconds", 1e9, "Start no new measurement after this many seconds.")
flags.DEFINE_string("json_out", None, "Write the results here (updated after each one).")
FLAGS = flags.FLAGS

_START = time.time()
RESULTS = []
# What a measurement name's suffixes change (`variants`).
VARIANTS = ("teacher_bf16", "bf16", "cached", "noaug")
TEACHER_PRECISIONS = {"teacher_bf16": "bfloat16"}


def variants(name):
    """`(name without its VARIANTS suffixes, the set of them)`:
    `fit_stage_kd_bf16_teacher_bf16` -> `("fit_stage_kd", {"bf16", "teacher_bf16"})`."""
    found = set()
    while True:
        suffix = next((v for v in VARIANTS if name.endswith("_" + v)), None)
        if suffix is None:
            return name, found
        name, found = name[: -len(suffix) - 1], found | {suffix}


def teacher_precision(found):
    """The teacher precision that the `variants` `found` ask for (None: as built)."""
    return next((TEACHER_PRECISIONS[v] for v in found if v in TEACHER_PRECISIONS), None)


def _record(name, batch_size, seconds_per_step, **extra):
    entry = {"name": name, "batch_size": batch_size,
             "images_per_sec": round(batch_size / seconds_per_step, 1),
             "ms_per_step": round(1e3 * seconds_per_step, 3), **extra}
    RESULTS.append(entry)
    print(json.dumps(entry), flush=True)
    if FLAGS.json_out:  # whole at every moment, even if the run is stopped while writing
        with open(FLAGS.json_out + ".tmp", "w") as f:
            json.dump(RESULTS, f, indent=1)
        os.replace(FLAGS.json_out + ".tmp", FLAGS.json_out)


def _out_of_time():
    return time.time() - _START > FLAGS.max_seconds


def compile_distiller(teacher, student, stage, augment=None, steps_per_execution=1, stages=None):
    """`FSPDistiller` in `stage`, compiled with the benchmarks' SGD."""
    import keras

    from keras_fsp import FSPDistiller

    model = FSPDistiller(teacher, student, stage=stage, augment=augment, stages=stages or {})
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  steps_per_execution=steps_per_execution)
    return model


def compile_student(net, augment=None, steps_per_execution=1, learning_rate=0.1):
    """`net` trained alone on the labels (SGD, momentum 0.9), with the
    scanned epochs of `keras_fsp.jax_steps`."""
    import keras

    from keras_fsp import jax_steps

    if augment is not None:
        inputs = keras.Input(net.inputs[0].shape[1:])
        net = keras.Model(inputs, net(augment(inputs)))
    net.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                steps_per_execution=steps_per_execution)
    return jax_steps.install(net)


def _distiller(stage, teacher_depth, student_depth, augment=None, steps_per_execution=1,
               batch_norm_groups=1, precision=None):
    from keras_fsp import Stage, per_replica_batch_norm, teacher_in_precision
    from keras_fsp.papers import cifar_resnet

    teacher, student = cifar_resnet(teacher_depth), cifar_resnet(student_depth)
    teacher = teacher_in_precision(teacher, precision)
    if batch_norm_groups > 1:
        student = per_replica_batch_norm(student, batch_norm_groups)
    stages = {}
    if stage == "kd_fsp":  # KD plus the FSP term: what the FSP matrices add to a KD step
        # (a small FSP weight: its cost does not depend on it, and SGD at 0.01
        # diverges on an FSP loss of 1e5 weighted 1e-3)
        stages = {"kd_fsp": Stage("kd_fsp", {"kd": 0.9, "task": 0.1, "fsp": 1e-6})}
    return compile_distiller(teacher, student, stage, augment, steps_per_execution, stages)


def _student(depth, augment=None, steps_per_execution=1, batch_norm_groups=1):
    from keras_fsp import per_replica_batch_norm
    from keras_fsp.papers import cifar_resnet

    net = cifar_resnet(depth)
    if batch_norm_groups > 1:
        net = per_replica_batch_norm(net, batch_norm_groups)
    return compile_student(net, augment, steps_per_execution)


def _device_batch(batch_size):
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(batch_size, 32, 32, 3)).astype("float32"))
    y = jax.device_put(rng.integers(0, 10, batch_size).astype("int32"))
    return x, y


def _time(fn, args, iters):
    import jax

    out = None
    for _ in range(10):
        out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def time_compiled_step(name, teacher_depth, student_depth, batch_size):
    """The jitted `train_step` on one device-resident batch, from Python."""
    import jax

    x, y = _device_batch(batch_size)
    name, found = variants(name)
    model = (_student(student_depth) if name == "student_alone"
             else _distiller(name[len("stage_"):], teacher_depth, student_depth,
                             precision=teacher_precision(found)))
    if hasattr(model, "stage"):
        model._stages.apply_trainable()  # what `fit` does: the stage's variables train
    elif not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True)
    compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, (x, y)).compile()
    holder = [state]

    def step():
        logs, holder[0] = compiled(holder[0], (x, y))
        return holder[0]

    seconds = _time(step, (), FLAGS.iters)
    return seconds, compiled.memory_analysis()


def time_fsp_parts(teacher_depth, student_depth, batch_size):
    """Teacher forward, student forward+backward to its last FSP map, and the
    FSP matrices + loss + gradient alone, each jitted on its own."""
    import jax
    import jax.numpy as jnp

    from keras_fsp import taps, teacher_in_precision
    from keras_fsp.terms import fsp_matrix
    from keras_fsp.papers import cifar_resnet

    names = ["stem", "stage1", "stage2", "stage3"]
    pairs = list(zip(names[:-1], names[1:]))
    x, _ = _device_batch(batch_size)
    teacher, student = cifar_resnet(teacher_depth), cifar_resnet(student_depth)
    t_view = taps.tap_model(teacher, names, include_logits=False)
    s_view = taps.tap_model(student, names, include_logits=False)
    sv, sn = [v.value for v in s_view.trainable_variables], [v.value for v in s_view.non_trainable_variables]

    def forward(view):
        """The jitted inference pass of `view` (its variables as constants)."""
        t = [v.value for v in view.trainable_variables]
        n = [v.value for v in view.non_trainable_variables]
        return jax.jit(lambda x: view.stateless_call(t, n, x, training=False)[0])

    teacher_fwd = forward(t_view)
    low = teacher_in_precision(teacher, "bfloat16")
    low_view = taps.tap_model(low, names, include_logits=False)

    def fsp_loss(maps_s, maps_t):
        total = 0.0
        for a, b in pairs:
            g_s = fsp_matrix(maps_s[a], maps_s[b])
            g_t = fsp_matrix(maps_t[a], maps_t[b])
            total = total + jnp.mean(jnp.sum(jnp.square(g_t - g_s), axis=(1, 2)))
        return total

    def student_fwd_bwd(sv, x):  # a loss that costs nothing: the backbone alone
        def loss(sv):
            out, _ = s_view.stateless_call(sv, sn, x, training=True)
            return sum(jnp.mean(v) for v in out.values())
        return jax.grad(loss)(sv)

    maps_t = teacher_fwd(x)
    s_maps, _ = jax.jit(lambda sv, x: s_view.stateless_call(sv, sn, x, training=True))(sv, x)
    fsp_grad = jax.jit(jax.grad(fsp_loss))
    return {
        "fsp_parts_teacher_forward": _time(teacher_fwd, (x,), FLAGS.iters),
        "fsp_parts_teacher_forward_bf16": _time(forward(low_view), (x,), FLAGS.iters),
        "fsp_parts_student_forward_backward": _time(jax.jit(student_fwd_bwd), (sv, x), FLAGS.iters),
        "fsp_parts_matrices_loss_gradient": _time(fsp_grad, (s_maps, maps_t), FLAGS.iters),
    }


def _cifar10(dataset):
    import numpy as np

    if dataset:
        from keras_fsp.apps.data import load_arrays

        (x, y), _, _ = load_arrays(dataset)
    else:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 50000)
    x, y = x[:FLAGS.train_examples], y[:FLAGS.train_examples]
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    return ((x - mean) / std).astype("float32"), y.astype("int32")


def fit_seconds(model, x, y, batch_size, cached=False, profile_dir=None, cache_batch_size=1000):
    """Seconds per step of `model.fit` over `x`, `y` held on the device
    (`DeviceArrays`), timed over `--fit_epochs` epochs after one that
    compiles, and `{"compile_seconds": the first epoch's time beyond a timed
    one, "final_loss": ...}`. `cached`: on the teacher's outputs, computed first
    (`teacher_cache_seconds`). With `profile_dir`, one more epoch is then
    traced there (`jax.profiler`, with a Perfetto trace)."""
    from keras_fsp.inputs import DeviceArrays

    extra, inputs = {}, x
    if cached:
        start = time.perf_counter()
        inputs = {"inputs": x, "teacher": model.teacher_outputs(x, batch_size=cache_batch_size)}
        extra["teacher_cache_seconds"] = round(time.perf_counter() - start, 2)
    data = DeviceArrays(inputs, y, batch_size=batch_size, seed=0, drop_remainder=True)
    start = time.perf_counter()
    model.fit(data, epochs=1, verbose=0)  # compiles
    first = time.perf_counter() - start
    start = time.perf_counter()
    history = model.fit(data, epochs=FLAGS.fit_epochs, verbose=0).history
    seconds = (time.perf_counter() - start) / (FLAGS.fit_epochs * len(data))
    extra["compile_seconds"] = round(max(0.0, first - seconds * len(data)), 2)
    extra["final_loss"] = float(history["loss"][-1])
    if profile_dir:
        import jax

        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            model.fit(data, epochs=1, verbose=0)
    return seconds, extra


def time_fit(name, teacher_depth, student_depth, batch_size, x, y, batch_norm_groups=1,
             profile_dir=None):
    """`fit` over the device-resident training set with in-step augmentation;
    seconds per step (`fit_seconds`)."""
    import keras

    from keras_fsp.augment import PadCropFlip

    what, found = variants(name)
    one_per_dispatch = what.startswith("fit_spe1_")
    what = what[len("fit_spe1_"):] if one_per_dispatch else what[len("fit_"):]
    keras.config.set_dtype_policy("mixed_bfloat16" if "bf16" in found else "float32")
    try:
        steps = 1 if one_per_dispatch else len(x) // batch_size
        # A teacher cache needs fixed inputs: no augmentation there.
        fixed = bool(found & {"cached", "noaug"})
        augment = None if fixed else PadCropFlip(pad=4, flip=True, seed=0)
        model = (_student(student_depth, augment, steps, batch_norm_groups)
                 if what == "student_alone"
                 else _distiller(what[len("stage_"):], teacher_depth, student_depth, augment, steps,
                                 batch_norm_groups, teacher_precision(found)))
        return fit_seconds(model, x, y, batch_size, "cached" in found, profile_dir)
    finally:
        keras.config.set_dtype_policy("float32")


def main(_):
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    t_depth, s_depth = (int(d) for d in FLAGS.pair.split(":"))
    pair = f"{t_depth}->{s_depth}"
    if FLAGS.torch:  # first, in a process of its own: a CUDA error there cannot reach JAX
        import subprocess

        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
        lines = subprocess.run([sys.executable, script, str(t_depth), str(s_depth), *map(str, batch_sizes)],
                               capture_output=True, text=True).stdout.splitlines()
        for line in lines:
            entry = json.loads(line) if line.startswith("{") else {"error": line}
            if "error" in entry:
                print(f"PyTorch peer: {entry['error']}", flush=True)
            else:
                _record(entry["name"], entry["batch_size"], entry["seconds"], pair=pair,
                        framework="pytorch")
    import jax
    import keras

    device = jax.devices()[0]
    print(f"device: {device.device_kind}; keras {keras.__version__}, jax {jax.__version__}", flush=True)
    for b in batch_sizes:
        for name in FLAGS.steps:
            if not _out_of_time():
                sec, mem = time_compiled_step(name, t_depth, s_depth, b)
                _record(name, b, sec, pair=pair,
                        temp_mib=round(mem.temp_size_in_bytes / 2**20, 1) if mem else None)
        if FLAGS.fsp_parts and not _out_of_time():
            for name, sec in time_fsp_parts(t_depth, s_depth, b).items():
                _record(name, b, sec, pair=pair)
    x, y = _cifar10(FLAGS.dataset)
    for b in batch_sizes:
        for name in FLAGS.fits:
            if not _out_of_time():
                try:
                    seconds, extra = time_fit(name, t_depth, s_depth, b, x, y)
                except Exception as e:  # noqa: BLE001 (one failed measurement, not the run)
                    print(f"{name}: {type(e).__name__}: {e}", flush=True)
                    continue
                _record(name, b, seconds, pair=pair, data=FLAGS.dataset or "random", **extra)
    stats = device.memory_stats() or {}
    print(f"peak device memory in use (whole run): {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main)
