"""A plain PyTorch version of keras_fsp's training steps, the peer reference of
`gpu_throughput.py`: the same CIFAR ResNets (6n+2, 16/32/64 channels, 1x1
projection shortcuts with batch norm), the same losses (KD: 0.9 * T^2 soft
cross-entropy + 0.1 labels at T = 4; FSP: eq. 2 over the three section pairs,
max pooling), SGD with momentum and weight decay 1e-4; channels-last, cuDNN
autotuning. The teacher runs under `no_grad` in eval mode.

Two ways to run the step:

- `run`: eager PyTorch, float32 (`torch_reference_*`, `torch_student_alone`);
- `run_graph`: what a speed-minded PyTorch user writes: the whole step
  (forward, backward, SGD update) captured once in a CUDA graph after
  warm-up on a side stream, and replayed on a static batch
  (`torch_graph_*`), in float32 or under bfloat16 autocast (`*_bf16`).

`run_networks` times the KD step and the student alone for any networks
returning logits (torchvision's, for `users_networks.py`): in a CUDA graph,
eager, or `torch.compile`d, under bfloat16 autocast.

    python benchmarks/torch_reference.py   # prints milliseconds per step
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    """Returns the logits and the maps at the stem and the three section ends."""

    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        sections, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                blocks.append(Block(cin, width, 2 if i > 0 and b == 0 else 1))
                cin = width
            sections.append(nn.Sequential(*blocks))
        self.sections = nn.ModuleList(sections)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x, logits=True):
        maps = [self.stem(x)]
        for section in self.sections:
            maps.append(section(maps[-1]))
        out = self.fc(maps[-1].mean((2, 3))) if logits else None
        return out, maps


def fsp_matrix(a, b):
    if a.shape[2] != b.shape[2]:
        a = F.max_pool2d(a, a.shape[2] // b.shape[2])
    h, w = b.shape[2], b.shape[3]
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / (h * w)


def fsp_loss(t_maps, s_maps):
    loss = 0.0
    for i in range(3):  # (stem, stage1), (stage1, stage2), (stage2, stage3)
        gt = fsp_matrix(t_maps[i], t_maps[i + 1])
        gs = fsp_matrix(s_maps[i], s_maps[i + 1])
        loss = loss + (gt - gs).pow(2).sum((1, 2)).mean()
    return loss


def kd_loss(t_logits, s_logits, y, temperature=4.0, weight=0.9):
    soft = -(F.softmax(t_logits / temperature, 1) * F.log_softmax(s_logits / temperature, 1)).sum(1).mean()
    return weight * temperature ** 2 * soft + (1 - weight) * F.cross_entropy(s_logits, y)


def _sgd(module):
    return torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def _timed(call, iters, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def eager_seconds(step, optimizer, iters, warmup, device):
    """Seconds per call of `step` (forward, backward, update), the gradients
    cleared before each."""
    def call():
        optimizer.zero_grad(set_to_none=True)
        step()

    for _ in range(warmup):
        call()
    return _timed(call, iters, device)


def graph_seconds(step, optimizer, iters, warmup):
    """Seconds per replay of `step` (forward, backward, update on static
    tensors) captured once in a CUDA graph after warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuDNN autotuning, optimizer state) off the graph
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # Gradients set to None before capture: backward() then writes fresh
    # .grad tensors from the graph's pool at every replay.
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    for _ in range(warmup):
        graph.replay()
    return _timed(graph.replay, iters, torch.device("cuda"))


def run(teacher_depth=26, student_depth=8, batch_size=128, iters=200, warmup=20):
    """Seconds per step of `torch_reference_kd`, `torch_reference_fsp` and
    `torch_student_alone` on the first CUDA device."""
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    teacher = CifarResNet(teacher_depth).to(dev, memory_format=torch.channels_last).eval()
    x = torch.randn(batch_size, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    results = {}
    for name in ("torch_student_alone", "torch_reference_kd", "torch_reference_fsp"):
        student = CifarResNet(student_depth).to(dev, memory_format=torch.channels_last).train()
        opt = _sgd(student)

        def step():
            if name == "torch_student_alone":
                loss = F.cross_entropy(student(x)[0], y)
            else:
                with torch.no_grad():
                    t_logits, t_maps = teacher(x, logits=name.endswith("kd"))
                s_logits, s_maps = student(x, logits=name.endswith("kd"))
                loss = (kd_loss(t_logits, s_logits, y) if name.endswith("kd")
                        else fsp_loss(t_maps, s_maps))
            loss.backward()
            opt.step()

        results[name] = eager_seconds(step, opt, iters, warmup, dev)
    return results


def run_graph(teacher_depth=26, student_depth=8, batch_size=128, iters=500, warmup=20,
              bf16=False):
    """Seconds per replay of the whole training step captured in a CUDA
    graph: `torch_graph_kd`, `torch_graph_fsp`, `torch_graph_student_alone`
    (with `_bf16` under bfloat16 autocast)."""
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    teacher = CifarResNet(teacher_depth).to(dev, memory_format=torch.channels_last).eval()
    static_x = torch.randn(batch_size, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
    static_y = torch.randint(0, 10, (batch_size,), device=dev)
    suffix = "_bf16" if bf16 else ""
    results = {}
    for kind in ("student_alone", "kd", "fsp"):
        student = CifarResNet(student_depth).to(dev, memory_format=torch.channels_last).train()
        opt = _sgd(student)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                if kind == "student_alone":
                    loss = F.cross_entropy(student(static_x)[0].float(), static_y)
                else:
                    with torch.no_grad():
                        t_logits, t_maps = teacher(static_x, logits=kind == "kd")
                    s_logits, s_maps = student(static_x, logits=kind == "kd")
                    if kind == "kd":
                        loss = kd_loss(t_logits.float(), s_logits.float(), static_y)
                    else:
                        loss = fsp_loss([m.float() for m in t_maps], [m.float() for m in s_maps])
            loss.backward()
            opt.step()

        results[f"torch_graph_{kind}{suffix}"] = graph_seconds(step, opt, iters, warmup)
    return results


def _network_seconds(how, kind, teacher, student, x, y, iters, warmup, bf16, compile_mode):
    opt = _sgd(student)
    if how == "compile":
        torch._dynamo.reset()  # nothing kept from the other batch sizes' shapes
        teacher, student = (torch.compile(m, mode=compile_mode, dynamic=False)
                            for m in (teacher, student))

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            if kind == "student_alone":
                loss = F.cross_entropy(student(x).float(), y)
            else:
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = kd_loss(t_logits.float(), student(x).float(), y)
        loss.backward()
        opt.step()

    extra = {}
    if how == "compile":
        extra["compile_seconds"] = round(eager_seconds(step, opt, 1, 0, x.device), 2)
    if how == "graph":
        return graph_seconds(step, opt, iters, warmup), extra
    return eager_seconds(step, opt, iters, warmup, x.device), extra


def run_networks(teacher, make_student, x, y, ways=("graph_kd", "graph_student_alone", "eager_kd",
                                                     "compile_kd"),
                 iters=50, warmup=10, bf16=True, compile_mode="max-autotune-no-cudagraphs"):
    """The KD step (and the student trained alone) for any networks returning
    logits: `teacher` (an `nn.Module`) and a fresh student from
    `make_student()` for each way, on the static batch `x` (channels-last),
    `y`. Yields `(name, seconds per step, extra)` as each is measured, for
    the ways

    - `graph_kd`, `graph_student_alone`: the step captured in a CUDA graph;
    - `eager_kd`, `eager_student_alone`: eager PyTorch;
    - `compile_kd`, `compile_student_alone`: both networks `torch.compile`d
      with `compile_mode` (`extra["compile_seconds"]`: the first step).

    Under bfloat16 autocast with `bf16`. A way that needs CUDA (graph,
    compile) yields `(name, None, {"skipped": why})` on another device."""
    device = x.device
    torch.backends.cudnn.benchmark = True
    teacher = teacher.to(device, memory_format=torch.channels_last).eval()
    for way in ways:
        how, kind = way.split("_", 1)
        if how in ("graph", "compile") and device.type != "cuda":
            yield f"torch_{way}", None, {"skipped": f"{how} needs CUDA"}
            continue
        student = make_student().to(device, memory_format=torch.channels_last).train()
        seconds, extra = _network_seconds(how, kind, teacher, student, x, y, iters, warmup, bf16,
                                          compile_mode)
        student = None
        if device.type == "cuda":  # the last student's memory (and its graph's) back
            torch.cuda.empty_cache()
        yield f"torch_{way}", seconds, extra


def main(argv):
    """`python torch_reference.py [teacher_depth student_depth batch ...]`:
    one JSON line per measurement (gpu_throughput.py runs this in a process
    of its own, so that a CUDA error here cannot affect JAX)."""
    import json

    t_depth, s_depth = (int(a) for a in argv[:2]) if len(argv) >= 2 else (26, 8)
    for b in [int(a) for a in argv[2:]] or [128, 512]:
        for fn, kwargs in ((run_graph, {}), (run_graph, {"bf16": True}), (run, {})):
            try:
                timings = fn(t_depth, s_depth, b, **kwargs)
            except Exception as e:  # report and go on with the others
                print(json.dumps({"error": f"{fn.__name__}{kwargs}: {type(e).__name__}: {e}"}), flush=True)
                continue
            for name, seconds in timings.items():
                print(json.dumps({"name": name, "batch_size": b, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
