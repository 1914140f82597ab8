"""The worker processes of `tests/test_multi_worker.py`.

`python tests/multi_worker_worker.py worker OUT_DIR`, with `TF_CONFIG` naming a
cluster of workers and this process's task: builds a small teacher and student
under `tf.distribute.MultiWorkerMirroredStrategy`, trains the `FSPDistiller`
two SGD (momentum) steps on one fixed global batch split between the workers,
evaluates it, and the chief (worker 0) writes the student's weights and the
logs to OUT_DIR (each worker also writes which rows of the batch it got).

`train(strategy)` is also the single-device reference (the default strategy):
same models, data and steps. `... launch OUT_DIR PORT,PORT TIMEOUT_S` starts
the workers (one process tree, so that the test can run it in a private network
namespace).
"""

import json
import os
import sys
import time

GLOBAL_BATCH = 16
STEPS = 2
# A stage with FSP, KD and task terms (plus weight decay): every term of
# `FSPDistiller.compute_loss` goes through the replica scaling.
MIX = {"fsp": 1e-3, "kd": 1.0, "task": 0.1}
SHAPE = (16, 16, 3)

_T0 = time.monotonic()


def _progress(message):
    """A timestamped line in the worker's log (the test shows it on failure)."""
    print(f"[{time.monotonic() - _T0:5.1f} s] {message}", flush=True)


def global_batch():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH,) + SHAPE).astype("float32")
    y = rng.integers(0, 10, GLOBAL_BATCH).astype("int64")
    return x, y


def dataset():
    """The fixed global batch, `STEPS` times. Under a multi-worker strategy
    Keras distributes it; sharding by DATA splits each global batch between
    the workers (each gets GLOBAL_BATCH / workers examples)."""
    import tensorflow as tf

    x, y = global_batch()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).repeat(STEPS)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return ds.with_options(options)




def build():
    import keras

    from keras_fsp import FSPDistiller, Stage
    from keras_fsp.papers import cifar_resnet

    keras.utils.set_random_seed(0)
    teacher = cifar_resnet(8, input_shape=SHAPE, weight_decay=1e-4, name="teacher")
    student = cifar_resnet(8, input_shape=SHAPE, weight_decay=1e-4, name="student")
    # Per-replica batch statistics differ from whole-batch ones by design:
    # freeze the student's batch norm so both runs compute the same maths.
    for layer in student.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    distiller = FSPDistiller(
        teacher, student, stages={"mix": Stage("mix", MIX)}, stage="mix"
    )
    # jit_compile=True fails under the MirroredStrategy family on CPUs.
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=False
    )
    return distiller


def train(strategy):
    """Returns `(initial student weights, final ones, logs)`: the logs are
    `fit`'s history and `evaluate`'s results (keys `evaluate_...`)."""
    import numpy as np

    with strategy.scope():
        distiller = build()
    initial = [np.array(v) for v in distiller.student.get_weights()]
    history = distiller.fit(dataset(), epochs=1, shuffle=False, verbose=0).history
    final = [np.array(v) for v in distiller.student.get_weights()]
    history = {k: [float(x) for x in v] for k, v in history.items()}
    evaluation = distiller.evaluate(dataset(), verbose=0, return_dict=True)
    history.update({f"evaluate_{k}": [float(v)] for k, v in evaluation.items()})
    return initial, final, history


def local_shares(strategy):
    """Row indices (into the global batch) that this worker's replicas get,
    per step, from the same distribution `fit` uses."""
    import numpy as np

    x, _ = global_batch()
    shares = []
    for batch in strategy.experimental_distribute_dataset(dataset()):
        rows = []
        for local_x in strategy.experimental_local_results(batch[0]):
            for row in np.asarray(local_x):
                rows.append(int(np.flatnonzero((x == row).all(axis=(1, 2, 3)))[0]))
        shares.append(rows)
    return shares


def worker(out_dir):
    import numpy as np
    import tensorflow as tf

    _progress("TensorFlow imported")
    # The strategy must exist before any other TensorFlow op runs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    resolver = strategy.cluster_resolver
    task = resolver.task_id
    _progress(f"strategy up: {resolver.task_type} {task}")
    shares = local_shares(strategy)
    _progress("data shares read")
    with open(os.path.join(out_dir, f"share{task}.json"), "w") as f:
        json.dump(shares, f)  # test data only: the weights come from the chief
    initial, final, history = train(strategy)
    _progress("trained and evaluated")
    info = {
        "task_type": resolver.task_type,
        "task_id": task,
        "num_replicas_in_sync": strategy.num_replicas_in_sync,
        "history": history,
    }
    # Only the chief (worker 0) writes results: every worker holds the same
    # weights, and several writers to one path would collide.
    if task == 0:
        np.savez(os.path.join(out_dir, "initial.npz"), *initial)
        np.savez(os.path.join(out_dir, "final.npz"), *final)
        with open(os.path.join(out_dir, "info.json"), "w") as f:
            json.dump(info, f)
    print("done", json.dumps(info), flush=True)


def launch(out_dir, ports, timeout):
    """Starts one worker per port (TF_CONFIG each), output to
    OUT_DIR/worker<i>.log; kills them all when one fails or at the deadline.
    Exit status 0 iff every worker succeeded."""
    import subprocess

    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(len(ports)):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        with open(os.path.join(out_dir, f"worker{index}.log"), "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "worker", out_dir],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = any(c not in (None, 0) for c in codes)
        if None not in codes or failed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if None in codes:
        # A worker failed (its peers would wait for it) or time ran out.
        for p in procs:
            p.kill()
        codes = [p.wait() if c is None else c for p, c in zip(procs, codes)]
        reason = "a worker failed" if failed else f"time ran out ({timeout} s)"
        print(f"{reason}: killed the others", flush=True)
    print("worker exit codes", codes, flush=True)
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2])
    elif sys.argv[1] == "launch":
        ports = [int(p) for p in sys.argv[3].split(",")]
        sys.exit(launch(sys.argv[2], ports, float(sys.argv[4])))
    else:
        sys.exit(f"usage: {sys.argv[0]} worker OUT_DIR | launch OUT_DIR PORT,PORT TIMEOUT_S")
