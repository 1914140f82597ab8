"""Data-parallel scaling on several accelerators (JAX backend, Keras'
`keras.distribution.DataParallel`): the compiled train step at a fixed batch
per device, on 1 device and on N devices.

    KERAS_BACKEND=jax python benchmarks/data_parallel.py --per_device_batch 512 --iters 100 \
        --json_out benchmarks/results/gpu-h200x2-data-parallel.json

For each step (`student_alone`, `stage_fsp`, `stage_kd`, ...; the same
models as `gpu_throughput.py`) and each device count, the model is built
under `DataParallel(devices[:n])` (variables replicated), the batch of
`n * per_device_batch` images is sharded over the devices, and the jitted
`train_step` (what `fit` runs) is timed in a loop after warm-up. XLA
inserts the all-reduces: one for the weight gradients, and one for every
batch norm's statistics over the global batch and their gradients (Keras'
`DataParallel` gives synchronised batch norm). Scaling efficiency is
`images_per_sec(n) / (n * images_per_sec(1))`.

On a CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=2` gives two
host devices to try it (the timings then mean nothing); `--collectives_only`
compiles each step and counts its all-reduce ops, and how many of them reduce
only per-channel vectors (batch-norm statistics and their gradients):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \
        python benchmarks/data_parallel.py --collectives_only --devices 2 \
        --per_device_batch 8 --json_out benchmarks/results/cpu-jax-2dev-collectives.json
"""

import json
import os
import re
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_throughput as g  # noqa: E402  (the same models; its --iters and --json_out)

flags.DEFINE_integer("per_device_batch", 512, "Images per device per step.")
flags.DEFINE_list("devices", None, "Device counts to time (default: 1 and all).")
flags.DEFINE_list("dp_steps", ["student_alone", "stage_fsp", "stage_kd", "stage_task"],
                  "Compiled steps to time.")
flags.DEFINE_string("pair", "26:8", "teacher_depth:student_depth.")
flags.DEFINE_bool("collectives_only", False, "Compile each step and count its all-reduce ops "
                  "(no timing): works on host devices.")
FLAGS = flags.FLAGS


def all_reduces(compiled):
    """`(all, per-channel)`: all-reduce ops in a compiled step, and those that
    reduce only vectors (batch-norm statistics and their gradients)."""
    ops = [l for l in compiled.as_text().splitlines() if re.search(r" all-reduce(-start)?\(", l)]
    vector = [l for l in ops if not re.search(r"f32\[\d+,", l.split(" all-reduce")[0])]
    return len(ops), len(vector)


def time_step(name, teacher_depth, student_depth, devices, per_device_batch, iters):
    """Seconds per step of `name` data-parallel over `devices` (None with
    --collectives_only), the last loss, and the step's all-reduce counts."""
    import jax
    import keras
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    try:
        model = (g._student(student_depth) if name == "student_alone"
                 else g._distiller(name[len("stage_"):], teacher_depth, student_depth))
        if hasattr(model, "stage"):
            model._apply_trainable(model.stage)
        elif not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                     optimizer_variables=True, metrics_variables=True)
        mesh = distribution.device_mesh.backend_mesh
        batch = NamedSharding(mesh, PartitionSpec("batch"))
        n = len(devices) * per_device_batch
        rng = np.random.default_rng(0)
        x = jax.device_put(rng.normal(size=(n, 32, 32, 3)).astype("float32"), batch)
        y = jax.device_put(rng.integers(0, 10, n).astype("int32"), batch)
        step = jax.jit(model.train_step, donate_argnums=0)
        compiled = step.lower(state, (x, y)).compile()
        collectives = all_reduces(compiled)
        if FLAGS.collectives_only:
            return None, float("nan"), collectives
        for _ in range(10):
            logs, state = compiled(state, (x, y))
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(iters):
            logs, state = compiled(state, (x, y))
        jax.block_until_ready(state)
        loss = float(np.asarray(logs["loss"]))
        return (time.perf_counter() - start) / iters, loss, collectives
    finally:
        keras.distribution.set_distribution(None)


def _record(results, entry):
    results.append(entry)
    print(json.dumps(entry), flush=True)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=1)


def main(_):
    import jax
    import keras

    devices = keras.distribution.list_devices()
    counts = [int(c) for c in FLAGS.devices] if FLAGS.devices else sorted({1, len(devices)})
    t_depth, s_depth = (int(d) for d in FLAGS.pair.split(":"))
    print(f"{len(devices)} devices ({jax.devices()[0].device_kind}); keras {keras.__version__}, "
          f"jax {jax.__version__}", flush=True)
    results, single = [], {}
    for name in FLAGS.dp_steps:
        for count in counts:
            sec, loss, (n_ops, n_vector) = time_step(name, t_depth, s_depth, devices[:count],
                                                     FLAGS.per_device_batch, FLAGS.iters)
            if sec is None:
                entry = {"name": f"data_parallel_{name}", "devices": count,
                         "pair": f"{t_depth}->{s_depth}", "all_reduce_ops": n_ops,
                         "all_reduce_ops_per_channel": n_vector}
                _record(results, entry)
                continue
            ips = count * FLAGS.per_device_batch / sec
            single.setdefault(name, ips if count == 1 else None)
            entry = {"name": f"data_parallel_{name}", "devices": count,
                     "per_device_batch": FLAGS.per_device_batch,
                     "batch_size": count * FLAGS.per_device_batch,
                     "images_per_sec": round(ips, 1), "ms_per_step": round(1e3 * sec, 3),
                     "pair": f"{t_depth}->{s_depth}", "final_loss": round(loss, 4),
                     "all_reduce_ops": n_ops, "all_reduce_ops_per_channel": n_vector}
            if single.get(name) and count > 1:
                entry["scaling_efficiency"] = round(ips / (count * single[name]), 3)
            _record(results, entry)


if __name__ == "__main__":
    app.run(main)
