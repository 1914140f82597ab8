"""Images per second on an accelerator (JAX backend): the compiled step on
device-resident data, real `fit` on CIFAR-10 with augmentation, the step's
memory, and a plain PyTorch implementation of the same steps as the peer
reference.

    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py --data_dir ../shared/data \
        --json_out benchmarks/results/gpu-h100.json

Measurements (each a name in the JSON list `{"name", "batch_size", "images_per_sec", ...}`):

- `student_alone`, `teacher_inference`, `stage_{fsp,kd,task,hint,dense_fsp}`:
  the jitted Keras train step (`model.train_step`, exactly what `fit` runs)
  called in a loop on one batch already on the device, timed after warm-up
  with a final `block_until_ready`. `temp_mib` is XLA's temporary buffer size
  for the step (activations kept for the backward pass included).
- `fit_student_alone`, `fit_stage_{fsp,kd}`: `fit` over the real CIFAR-10
  training set held on the device (`keras_fsp.inputs.DeviceArrays`), with
  pad-crop-flip augmentation inside the step; `fit_numpy_*`: the same `fit`
  fed from host NumPy arrays (Keras' default path).
- `torch_reference_{kd,fsp}`, `torch_student_alone`: the same networks and
  losses written plainly in PyTorch (eager, float32, cuDNN autotuning,
  channels-last), when PyTorch with CUDA is present.

Every measurement is written to `--json_out` as soon as it is taken, and the
run stops starting new ones after `--max_seconds`.
"""

import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_list("batch_sizes", ["128", "512"], "Batch sizes.")
flags.DEFINE_list("pairs", ["26:8"], "teacher_depth:student_depth pairs.")
flags.DEFINE_list("steps", ["student_alone", "teacher_inference", "stage_fsp", "stage_kd",
                            "stage_kd_fsp", "stage_task", "stage_hint", "stage_dense_fsp"],
                  "Compiled steps to time.")
flags.DEFINE_list("fits", ["fit_student_alone", "fit_stage_fsp", "fit_stage_kd",
                           "fit_numpy_student_alone", "fit_numpy_stage_kd"], "fit paths to time.")
flags.DEFINE_bool("torch", True, "Also time the plain PyTorch reference.")
flags.DEFINE_integer("iters", 200, "Timed iterations of a compiled step.")
flags.DEFINE_integer("fit_steps", 300, "Timed steps of a fit.")
flags.DEFINE_string("data_dir", None, "Folder of the shared datasets.py (real CIFAR-10 for "
                    "the fit measurements); random data when absent.")
flags.DEFINE_float("max_seconds", 1e9, "Start no new measurement after this many seconds.")
flags.DEFINE_string("json_out", None, "Write the results here (updated after each one).")
FLAGS = flags.FLAGS

_START = time.time()
RESULTS = []


def _record(name, batch_size, seconds_per_step, **extra):
    entry = {"name": name, "batch_size": batch_size,
             "images_per_sec": round(batch_size / seconds_per_step, 1),
             "ms_per_step": round(1e3 * seconds_per_step, 3), **extra}
    RESULTS.append(entry)
    print(json.dumps(entry), flush=True)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(RESULTS, f, indent=1)


def _out_of_time():
    return time.time() - _START > FLAGS.max_seconds


def _distiller(stage, teacher_depth, student_depth, augment=None):
    import keras

    from keras_fsp import FSPDistiller, Stage
    from keras_fsp.papers import cifar_resnet, dense_taps

    teacher, student = cifar_resnet(teacher_depth), cifar_resnet(student_depth)
    options = {}
    if stage == "kd_fsp":  # KD plus the FSP term: what the FSP matrices add to a KD step
        options = dict(stages={"kd_fsp": Stage("kd_fsp", {"kd": 0.9, "task": 0.1, "fsp": 1e-3})})
    if stage == "hint":
        options = dict(fsp_pairs=None, hint_layer="stage2", guided_layer="stage2")
    if stage == "dense_fsp":
        t, s = dense_taps(teacher, 2), dense_taps(student, 2)
        options = dict(fsp_pairs=list(zip(t[:-1], t[1:])), student_fsp_pairs=list(zip(s[:-1], s[1:])),
                       stages={"dense_fsp": Stage("dense_fsp", {"fsp": 1.0}, trainable="up_to_taps")})
    model = FSPDistiller(teacher, student, stage=stage, augment=augment, **options)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    return model


def _student(depth, augment=None):
    import keras

    from keras_fsp.papers import cifar_resnet

    net = cifar_resnet(depth)
    if augment is not None:
        inputs = keras.Input((32, 32, 3))
        net = keras.Model(inputs, net(augment(inputs)))
    net.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return net


def time_compiled_step(name, teacher_depth, student_depth, batch_size):
    """The jitted `train_step` on one device-resident batch."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(batch_size, 32, 32, 3)).astype("float32"))
    y = jax.device_put(rng.integers(0, 10, batch_size))
    if name == "teacher_inference":
        from keras_fsp.papers import cifar_resnet

        teacher = cifar_resnet(teacher_depth)
        tv = [v.value for v in teacher.trainable_variables]
        ntv = [v.value for v in teacher.non_trainable_variables]
        fn = jax.jit(lambda tv, ntv, x: teacher.stateless_call(tv, ntv, x, training=False)[0])
        args = (tv, ntv, x)
        compiled = fn.lower(*args).compile()
        for _ in range(10):
            out = compiled(*args)
        out.block_until_ready()
        start = time.perf_counter()
        for _ in range(FLAGS.iters):
            out = compiled(*args)
        out.block_until_ready()
        mem = compiled.memory_analysis()
        return (time.perf_counter() - start) / FLAGS.iters, mem

    model = (_student(student_depth) if name == "student_alone"
             else _distiller(name[len("stage_"):], teacher_depth, student_depth))
    if hasattr(model, "stage"):
        model._apply_trainable(model.stage)  # what `fit` does: the stage's variables train
    elif not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True)
    step = jax.jit(model.train_step, donate_argnums=0)
    compiled = step.lower(state, (x, y)).compile()
    for _ in range(10):
        logs, state = compiled(state, (x, y))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(FLAGS.iters):
        logs, state = compiled(state, (x, y))
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / FLAGS.iters, compiled.memory_analysis()


def _cifar10(data_dir):
    import numpy as np

    if data_dir:
        sys.path.insert(0, os.path.abspath(data_dir))
        import datasets  # the shared loader

        (x, y), _ = datasets.load_cifar10()
    else:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 50000)
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    return ((x - mean) / std).astype("float32"), y.astype("int32")


def time_fit(name, teacher_depth, student_depth, batch_size, x, y):
    """`fit` over CIFAR-10 with in-step augmentation: device-resident or NumPy."""
    from keras_fsp.augment import PadCropFlip
    from keras_fsp.inputs import DeviceArrays

    numpy_path = name.startswith("fit_numpy_")
    what = name[len("fit_numpy_"):] if numpy_path else name[len("fit_"):]
    augment = PadCropFlip(pad=4, flip=True, seed=0)
    model = (_student(student_depth, augment) if what == "student_alone"
             else _distiller(what[len("stage_"):], teacher_depth, student_depth, augment))
    steps = min(FLAGS.fit_steps, len(x) // batch_size)  # one epoch at most
    n = batch_size * steps
    if numpy_path:
        data = dict(x=x[:n], y=y[:n], batch_size=batch_size, shuffle=True)
    else:
        data = dict(x=DeviceArrays(x[:n], y[:n], batch_size=batch_size, seed=0, drop_remainder=True))
    model.fit(**data, epochs=1, verbose=0)  # compiles
    start = time.perf_counter()
    model.fit(**data, epochs=1, verbose=0)
    return (time.perf_counter() - start) / steps


def main(_):
    import jax
    import keras

    device = jax.devices()[0]
    print(f"device: {device.device_kind}; keras {keras.__version__}, jax {jax.__version__}", flush=True)
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    pairs = [tuple(int(d) for d in p.split(":")) for p in FLAGS.pairs]
    if FLAGS.torch:
        try:
            import torch_reference

            for t_depth, s_depth in pairs:
                for b in batch_sizes:
                    for name, sec in torch_reference.run(t_depth, s_depth, b).items():
                        _record(name, b, sec, pair=f"{t_depth}->{s_depth}", framework="pytorch")
        except Exception as e:  # the Keras measurements still run
            print(f"PyTorch reference skipped: {type(e).__name__}: {e}", flush=True)
    x, y = _cifar10(FLAGS.data_dir)
    for i, (t_depth, s_depth) in enumerate(pairs):
        for b in batch_sizes:
            for name in FLAGS.steps:
                if _out_of_time():
                    break
                sec, mem = time_compiled_step(name, t_depth, s_depth, b)
                _record(name, b, sec, pair=f"{t_depth}->{s_depth}",
                        temp_mib=round(mem.temp_size_in_bytes / 2**20, 1) if mem else None)
        for b in batch_sizes if i == 0 else ():  # the input path: first pair only
            for name in FLAGS.fits:
                if _out_of_time():
                    break
                _record(name, b, time_fit(name, t_depth, s_depth, b, x, y),
                        pair=f"{t_depth}->{s_depth}", data="cifar10" if FLAGS.data_dir else "random")
    stats = device.memory_stats() or {}
    print(f"peak device memory in use (whole run): {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main)
