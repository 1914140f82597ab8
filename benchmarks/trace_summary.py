"""Where a traced epoch's GPU time goes: one line per trace written by
`data_parallel.py --profile_dir` (or any `jax.profiler` Perfetto trace), and
the kernels whose time per step changed most against the first trace.

    python benchmarks/trace_summary.py --steps 97,48,48 \\
        prof/fit_stage_kd-1-global prof/fit_stage_kd-2-global prof/fit_stage_kd-2-replica

For the first GPU of each trace: kernel time per step (`busy`), the time no
kernel ran (`idle`), split into gaps longer than 1 ms (the device waiting on
the host, e.g. between dispatches) and shorter ones (launch and
synchronisation bubbles inside the compiled loop), and the collective
(NCCL) kernels' time.
"""

import collections
import glob
import gzip
import json
import os
import re

from absl import app, flags

flags.DEFINE_list("steps", None, "Training steps in each trace (one per trace).")
flags.DEFINE_string("device", "/device:GPU:0", "Which device's kernels to count.")
flags.DEFINE_integer("top", 12, "Kernels to list.")
FLAGS = flags.FLAGS


def _trace_file(path):
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True))
    if not found:
        raise SystemExit(f"{path}: no perfetto_trace.json.gz in it.")
    return found[-1]


def kernels(path, device):
    """`[(start_us, duration_us, name)]` of the kernels and copies on `device`."""
    with gzip.open(_trace_file(path)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
            and e["args"]["name"].startswith(device)}
    return sorted((e["ts"], e["dur"], e["name"]) for e in events
                  if e.get("ph") == "X" and e["pid"] in pids)


def summary(events, steps):
    busy_end, gaps = events[0][0], []
    for start, duration, _ in events:
        if start > busy_end:
            gaps.append(start - busy_end)
        busy_end = max(busy_end, start + duration)
    span = busy_end - events[0][0]
    idle = sum(gaps)
    nccl = sum(d for _, d, n in events if "nccl" in n.lower())
    long_gaps = sum(g for g in gaps if g > 1000)
    per = 1e-3 / steps
    return {"steps": steps, "span_ms_per_step": round(span * per, 3),
            "busy_ms_per_step": round((span - idle) * per, 3),
            "idle_ms_per_step": round(idle * per, 3),
            "idle_in_gaps_over_1ms_ms_per_step": round(long_gaps * per, 3),
            "idle_in_short_gaps_ms_per_step": round((idle - long_gaps) * per, 3),
            "nccl_ms_per_step": round(nccl * per, 3)}


def by_kernel(events):
    totals = collections.Counter()
    for _, duration, name in events:
        totals[re.sub(r"[_.]?\d+$", "", name)[:70]] += duration
    return totals


def main(argv):
    paths = argv[1:]
    steps = [int(s) for s in FLAGS.steps] if FLAGS.steps else [1] * len(paths)
    if len(steps) != len(paths):
        raise SystemExit("--steps: give one number of steps per trace.")
    traces = [kernels(p, FLAGS.device) for p in paths]
    for path, events, n in zip(paths, traces, steps):
        print(json.dumps({"trace": os.path.basename(path.rstrip("/")), **summary(events, n)}))
    base = {k: v / steps[0] for k, v in by_kernel(traces[0]).items()}
    for path, events, n in list(zip(paths, traces, steps))[1:]:
        other = {k: v / n for k, v in by_kernel(events).items()}
        change = sorted(set(base) | set(other), key=lambda k: -abs(other.get(k, 0) - base.get(k, 0)))
        print(f"kernel time per step (us), {os.path.basename(paths[0].rstrip('/'))} -> "
              f"{os.path.basename(path.rstrip('/'))}:")
        for k in change[:FLAGS.top]:
            print(f"  {base.get(k, 0):8.1f} -> {other.get(k, 0):8.1f}  {k}")


if __name__ == "__main__":
    app.run(main)
