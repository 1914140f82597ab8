"""Would several seeds trained in one compiled program beat one at a time?

A results table trains every method with 3 seeds of small CIFAR networks.
One such training leaves an H200 mostly idle (its kernels are small), and
processes sharing the GPU under MPS gain little over one alone. Here the
distiller's own `train_step` is `jax.vmap`ped over N stacked copies of its
state (N seeds: each its own weights, optimizer slots and batch) and run K
steps per dispatch in one `jax.lax.scan`, as `keras_fsp.jax_steps` runs one
seed. Measured in one run on one device, for N = `--seeds`:

    KERAS_BACKEND=jax python benchmarks/stacked_seeds.py --stacks 1,2,4,8 \\
        --json_out benchmarks/results/stacked-seeds-h200.json

Each record in `--json_out` (written as soon as it is taken): `name`
(`student_alone`, `stage_kd` or `stage_fsp`: the ResNets of `--pair`, random
device-resident images, no augmentation), `seeds` (N), `batch_size` (all N
seeds' images in one step), `ms_per_step` (one step of the N seeds),
`ms_per_seed_step` (that over N), `images_per_sec`, and `speedup` (the
one-seed time per step over `ms_per_seed_step`: N seeds in one program
against N runs one after the other).
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_throughput as g  # noqa: E402  (its networks; its --pair, --iters, --json_out)

flags.DEFINE_list("stacks", ["1", "2", "4", "8"], "Seeds per program (N).")
flags.DEFINE_list("models", ["student_alone", "stage_kd", "stage_fsp"], "What trains.")
flags.DEFINE_integer("batch_size", 128, "Batch per seed.")
flags.DEFINE_integer("scan_steps", 50, "Training steps per dispatch (K).")
flags.DEFINE_string("dtype_policy", "float32", "Keras dtype policy.")
flags.DEFINE_bool("check", False, "Instead of timing: train each model's seeds stacked and one "
                  "at a time for --scan_steps steps in float64, print the largest difference "
                  "between the two, and fail above 1e-4 (of the largest value of each part of the "
                  "state: weights, other variables, optimizer slots, metrics). "
                  "float64: in float32 the FSP loss's gradient through max pooling and ReLUs "
                  "moves by 1% between two orders of summation.")
FLAGS = flags.FLAGS
FLAGS.set_default("iters", 10)


def model_for(name, teacher_depth, student_depth):
    """A compiled model of `name` whose variables are all built."""
    if name == "student_alone":
        model = g._student(student_depth)
        model.optimizer.build(model.trainable_variables)
    else:
        model = g._distiller(name[len("stage_"):], teacher_depth, student_depth)
        model._stages.apply_trainable()  # what `fit` does
        model.optimizer.build(model.trainable_variables)
    return model


def model_state(model):
    return model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                optimizer_variables=True, metrics_variables=True)


def stacked(trees):
    """Leaf-wise stack of a list of equal-structured trees (seeds first)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def scanned_steps(model, seeds, steps):
    """`(state, data) -> state`: `steps` training steps of `seeds` stacked
    copies (`seeds` = 1: the model's own step, not vmapped)."""
    import jax

    step = model.train_step if seeds == 1 else jax.vmap(model.train_step)

    def run(state, data):
        def body(carry, _):
            _, carry = step(carry, data)
            return carry, None

        return jax.lax.scan(body, state, None, length=steps)[0]

    return run


def seed_states(model, seeds):
    """`seeds` states of `model`, the student's (and its term's) trainable
    weights perturbed per seed so that the copies differ."""
    import jax
    import jax.numpy as jnp

    base = model_state(model)
    out = []
    for s in range(seeds):
        key = jax.random.PRNGKey(s)
        trainable = [v + 0.01 * s * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
                     if jnp.issubdtype(v.dtype, jnp.floating) else v
                     for i, v in enumerate(base[0])]
        # copies: a timed run donates its state, never the model's own buffers
        out.append(jax.tree.map(jnp.copy, (trainable, *base[1:])))
    return out


def batches(seeds, batch_size):
    import numpy as np

    rng = np.random.default_rng(0)
    import keras

    x = rng.normal(size=(seeds, batch_size, 32, 32, 3)).astype(keras.config.floatx())
    y = rng.integers(0, 10, (seeds, batch_size)).astype("int32")
    return x, y


def seconds_per_seed_step(model, seeds):
    """Seconds of one training step of one seed, `seeds` in one program."""
    import jax

    run = jax.jit(scanned_steps(model, seeds, FLAGS.scan_steps), donate_argnums=0)
    states = seed_states(model, seeds)
    x, y = batches(seeds, FLAGS.batch_size)
    state, data = (states[0], (x[0], y[0])) if seeds == 1 else (stacked(states), (x, y))
    data = jax.device_put(data)
    state = run(state, data)  # compiles
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(FLAGS.iters):
        state = run(state, data)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / (FLAGS.iters * FLAGS.scan_steps * seeds)


def stacked_against_separate(model, seeds):
    """`(largest relative difference between `seeds` seeds trained stacked
    and one at a time, the smallest change of a seed's trainable weights)`
    over `--scan_steps` steps. The difference is taken per part of the state
    (the trainable variables, the other variables, the optimizer's slots,
    the metrics), relative to that part's largest value: a slot whose value
    is a cancellation near zero has no precision of its own to compare."""
    import jax
    import numpy as np

    states = seed_states(model, seeds)
    x, y = batches(seeds, FLAGS.batch_size)
    stacked_run = jax.jit(scanned_steps(model, seeds, FLAGS.scan_steps))
    one_run = jax.jit(scanned_steps(model, 1, FLAGS.scan_steps))
    together = stacked_run(stacked(states), (x, y))
    worst, moved = 0.0, []
    for s in range(seeds):
        alone = one_run(states[s], (x[s], y[s]))
        for part_together, part_alone in zip(together, alone):
            pairs = [(np.asarray(a[s], "float64"), np.asarray(b, "float64"))
                     for a, b in zip(jax.tree.leaves(part_together), jax.tree.leaves(part_alone))]
            scale = max([float(np.max(np.abs(b), initial=0.0)) for _, b in pairs] + [1e-12])
            difference = max([float(np.max(np.abs(a - b), initial=0.0)) for a, b in pairs] + [0.0])
            worst = max(worst, difference / scale)
        moved.append(max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                         for a, b in zip(alone[0], states[s][0])))
    return worst, min(moved)


def main(_):
    import jax
    import keras

    if FLAGS.check:
        jax.config.update("jax_enable_x64", True)
        keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64" if FLAGS.check else FLAGS.dtype_policy)
    t_depth, s_depth = (int(d) for d in FLAGS.pair.split(":"))
    device = jax.devices()[0].device_kind
    print(f"device: {device}; keras {keras.__version__}, jax {jax.__version__}", flush=True)
    for name in FLAGS.models:
        model = model_for(name, t_depth, s_depth)
        if FLAGS.check:
            worst, moved = stacked_against_separate(model, max(int(n) for n in FLAGS.stacks))
            print(f"{name}: largest relative difference {worst:.2e}; weights moved {moved:.2e}",
                  flush=True)
            if not worst <= 1e-4:
                raise SystemExit(f"{name}: the stacked seeds differ from separate runs.")
            continue
        one = None
        for n in (int(s) for s in FLAGS.stacks):
            seconds = seconds_per_seed_step(model, n)
            one = seconds if n == 1 else one
            g._record(name, FLAGS.batch_size * n, seconds * n, seeds=n,
                      ms_per_seed_step=round(1e3 * seconds, 3),
                      speedup=round(one / seconds, 2) if one else None,
                      pair=f"{t_depth}->{s_depth}", device=device,
                      dtype_policy=FLAGS.dtype_policy, jax=jax.__version__)


if __name__ == "__main__":
    app.run(main)
