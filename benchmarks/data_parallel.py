"""Data-parallel scaling on several accelerators (JAX backend, Keras'
`keras.distribution.DataParallel`) at a fixed batch per device, on 1 device
and on N devices, with synchronised and with per-replica batch norm.

    KERAS_BACKEND=jax python benchmarks/data_parallel.py --dataset npz:cifar10.npz \
        --per_device_batch 512 --json_out benchmarks/results/gpu-h100x2-data-parallel.json

Two measurements, each on 1 device and on N (the same models as
`gpu_throughput.py`):

- `--dp_fits` (`fit_student_alone`, `fit_stage_kd`, `fit_stage_fsp`): what a
  user runs, `fit` over the training set held on the devices
  (`keras_fsp.inputs.DeviceArrays`), pad-crop-flip augmentation inside the
  step and one epoch per dispatch (`keras_fsp.jax_steps`);
- `--dp_steps` (`student_alone`, `stage_fsp`, ...; none by default): the
  jitted `train_step` called from Python once per step on one sharded batch.

`--batch_norm global,replica`: the student's batch norms as Keras builds
them (their statistics over the global batch: XLA inserts one all-reduce
per layer, forward and backward) or `keras_fsp.per_replica_batch_norm`
(each device's examples normalised with their own statistics, what
`tf.distribute` and PyTorch's DDP do). The teacher runs in inference mode
and adds none. Scaling efficiency is `images_per_sec(n) / (n *
images_per_sec(1))`, against one device with Keras' batch norm.

On a CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=2` gives two
host devices to try it (the timings then mean nothing); `--collectives_only`
compiles each `--dp_steps` step and counts its all-reduce ops, and how many
of them reduce only per-channel vectors (batch-norm statistics and their
gradients):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \
        python benchmarks/data_parallel.py --collectives_only --devices 2 --dp_fits= \
        --dp_steps student_alone,stage_task,stage_kd,stage_fsp --per_device_batch 8 \
        --json_out benchmarks/results/cpu-jax-2dev-collectives.json
"""

import json
import os
import re
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_throughput as g  # noqa: E402  (the same models; its --pair, --iters, --dataset, --fit_epochs, --json_out)

flags.DEFINE_integer("per_device_batch", 512, "Images per device per step.")
flags.DEFINE_list("devices", None, "Device counts to time (default: 1 and all).")
flags.DEFINE_list("dp_steps", [], "Compiled steps to time one dispatch per step "
                  "(student_alone, stage_task, stage_kd, stage_fsp).")
flags.DEFINE_list("dp_fits", ["fit_student_alone", "fit_stage_kd", "fit_stage_fsp"],
                  "fit paths to time (one epoch per dispatch).")
flags.DEFINE_string("profile_dir", None, "Trace one more epoch of each fit measurement into "
                    "PROFILE_DIR/<name>-<devices>-<batch_norm> (jax.profiler, Perfetto trace).")
flags.DEFINE_list("batch_norm", ["global", "replica"], "The student's batch norm: global "
                  "(synchronised over the devices) and/or replica (per-device statistics).")
flags.DEFINE_bool("collectives_only", False, "Compile each step and count its all-reduce ops "
                  "(no timing): works on host devices.")
FLAGS = flags.FLAGS


def all_reduces(compiled):
    """`(all, per-channel)`: all-reduce ops in a compiled step, and those that
    reduce only vectors (batch-norm statistics and their gradients)."""
    ops = [l for l in compiled.as_text().splitlines() if re.search(r" all-reduce(-start)?\(", l)]
    vector = [l for l in ops if not re.search(r"f32\[\d+,", l.split(" all-reduce")[0])]
    return len(ops), len(vector)


def time_step(name, teacher_depth, student_depth, devices, per_device_batch, iters, groups):
    """Seconds per step of `name` data-parallel over `devices` (None with
    --collectives_only), the last loss, and the step's all-reduce counts;
    the student's batch norms in `groups` groups (1: Keras' own)."""
    import jax
    import keras
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    try:
        model = (g._student(student_depth, batch_norm_groups=groups) if name == "student_alone"
                 else g._distiller(name[len("stage_"):], teacher_depth, student_depth,
                                   batch_norm_groups=groups))
        if hasattr(model, "stage"):
            model._stages.apply_trainable()
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


def time_fit(name, teacher_depth, student_depth, devices, per_device_batch, groups, data,
             profile_dir=None):
    """Seconds per step of `fit` path `name` data-parallel over `devices`
    (one device: plain `fit`, no distribution)."""
    import keras

    if len(devices) > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        return g.time_fit(name, teacher_depth, student_depth, len(devices) * per_device_batch,
                          *data, batch_norm_groups=groups, profile_dir=profile_dir)[0]
    finally:
        keras.distribution.set_distribution(None)


def main(_):
    import jax
    import keras

    devices = keras.distribution.list_devices()
    counts = [int(c) for c in FLAGS.devices] if FLAGS.devices else sorted({1, len(devices)})
    t_depth, s_depth = (int(d) for d in FLAGS.pair.split(":"))
    print(f"{len(devices)} devices ({jax.devices()[0].device_kind}); keras {keras.__version__}, "
          f"jax {jax.__version__}", flush=True)
    results, single = [], {}
    data = g._cifar10(FLAGS.dataset) if FLAGS.dp_fits else None
    for name in FLAGS.dp_fits + FLAGS.dp_steps:
        for count in counts:
            for batch_norm in FLAGS.batch_norm if count > 1 else ["global"]:
                if g._out_of_time():
                    print(f"--max_seconds reached: {name} on {count} devices ({batch_norm}) "
                          "not measured", flush=True)
                    continue
                groups = count if batch_norm == "replica" else 1
                entry = {"name": name if name in FLAGS.dp_fits else f"data_parallel_{name}",
                         "devices": count, "batch_norm": batch_norm,
                         "pair": f"{t_depth}->{s_depth}"}
                if name in FLAGS.dp_fits:
                    profile = FLAGS.profile_dir and os.path.join(
                        FLAGS.profile_dir, f"{name}-{count}-{batch_norm}")
                    sec = time_fit(name, t_depth, s_depth, devices[:count],
                                   FLAGS.per_device_batch, groups, data, profile)
                else:
                    sec, loss, (n_ops, n_vector) = time_step(
                        name, t_depth, s_depth, devices[:count], FLAGS.per_device_batch,
                        FLAGS.iters, groups)
                    entry.update(all_reduce_ops=n_ops, all_reduce_ops_per_channel=n_vector)
                    if sec is None:
                        _record(results, entry)
                        continue
                    entry["final_loss"] = round(loss, 4)
                ips = count * FLAGS.per_device_batch / sec
                if count == 1:
                    single[name] = ips
                entry.update(per_device_batch=FLAGS.per_device_batch,
                             batch_size=count * FLAGS.per_device_batch,
                             images_per_sec=round(ips, 1), ms_per_step=round(1e3 * sec, 3))
                if single.get(name) and count > 1:
                    entry["scaling_efficiency"] = round(ips / (count * single[name]), 3)
                _record(results, entry)


if __name__ == "__main__":
    app.run(main)
