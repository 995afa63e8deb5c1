"""Host cost of a pre-training step, maskvlm against Hugging Face FLAVA side by side: the time to
issue one step's operators when there is almost no arithmetic, and how many ATen operator calls
the step makes (forward, autograd backward and optimizer).

    python benchmarks/host_overhead.py                       # CPU, base depth, 64-wide, 4 samples
    python benchmarks/host_overhead.py --device cuda         # the same on a GPU
    python benchmarks/host_overhead.py --top 20              # also the most frequent operators
    python benchmarks/host_overhead.py --override model.hidden_dropout=0 --override model.attention_dropout=0

Why: on a GPU, a step whose kernels finish faster than the host issues them is bound by this cost,
whatever the GPU (the ``base`` preset at batch 64 on an H100: a 141 ms step with the GPU busy for
77 ms; benchmarks/RESULTS.md). The step here keeps the preset's depth (every layer and every
objective) but shrinks the widths (``--width``, 2 heads, MLP 4x), the images (64 px, so 16 patches)
and the batch (``--batch-size``), so the time left is mostly dispatch, autograd bookkeeping and
allocation. On a CPU the kernels still run on the host thread, so the time is an upper bound on
the issue cost; the operator counts are exact on any device.

Matched as in ``step_throughput.py`` (same layers, heads, captions of 32 tokens, bf16 autocast by
default). Two settings differ on purpose (the first is a column of the report): maskvlm's recipe carries
its dropout (``base``: 0.1 on hidden states and attention probabilities; FLAVA's default is none),
and FLAVA's AdamW is built with ``foreach=True``, the implementation torch picks by default on a
GPU (on a CPU it would otherwise loop over the parameters one by one, about 10 operators each).
maskvlm's is its fused AdamW, as the trainer builds it. Attention is each library's default on the
device: on a CPU in bf16 maskvlm writes it out (matmul, softmax, matmul, as FLAVA does); on a GPU it
calls ``scaled_dot_product_attention``, one operator where the written-out form takes about ten.
(Forcing ``model.attention=sdpa`` on a CPU measures something else: torch's CPU flash-attention
kernel takes about 0.56 ms per backward call at these sizes, a quarter of the narrow step.)

``--py-spy-summary FILE`` reads a raw profile written by ``py-spy record --native --subprocesses -f
raw -o FILE -- python benchmarks/host_overhead.py --libs maskvlm --rounds 1 --repeats 60`` and
splits the samples inside the step by where they ended: the Python interpreter, torch's
Python bindings, torch's C++ dispatch and autograd, kernels, and the C library (allocation).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from step_throughput import _flava_step, _maskvlm_step, _sizes, run_result, time_steps  # this folder is on sys.path

NARROW = ["model.vision_heads=2", "model.text_heads=2", "model.image_cross_heads=2", "model.image_size=64",
          "model.patch_size=16", "model.embed_dim=32"]


def narrow_overrides(width: int) -> list[str]:
    return [f"model.vision_width={width}", f"model.text_width={width}", f"model.text_intermediate={4 * width}",
            *NARROW]


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _count_ops(step, dtype: str) -> dict:
    """ATen operators of one step (a function of its own, so a profile can leave it out)."""
    with _OpCounter() as counter:
        step(dtype)
    return dict(counter.counts)


def worker(lib: str, preset: str, dtype: str, device_name: str, width: int, batch_size: int, warmup: int,
           repeats: int, overrides=(), threads: int = 0) -> dict:

    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    cfg = _sizes(preset, narrow_overrides(width) + (list(overrides) if lib == "maskvlm" else []))
    if lib == "maskvlm":
        module, step = _maskvlm_step(cfg, device, batch_size)
    else:
        module, step = _flava_step(cfg, device, batch_size, foreach=True)
    for _ in range(max(warmup, 1)):
        step(dtype)
    times = time_steps(step, dtype, device, repeats)
    return {"lib": lib, "times": times, "ops": _count_ops(step, dtype),
            "params": sum(p.numel() for p in module.parameters()),
            "tensors": sum(1 for _ in module.parameters()),
            "dropout": cfg.model.hidden_dropout if lib == "maskvlm" else 0.0}


def run_worker(lib: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--preset", args.preset, "--dtype", args.dtype,
           "--device", args.device, "--width", str(args.width), "--batch-size", str(args.batch_size),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads),
           *[f"--override={o}" for o in args.override]]
    return run_result(cmd)


# Where a py-spy sample ended, by the frame's module (raw format: "frame;frame;... count").
_KERNEL = re.compile(r"at::native::|kernel|dnnl|mkl|gemm|cublas|cudnn|::vec")


def _leaf_category(frame: str) -> str:
    m = re.search(r"\(([^()]*)\)$", frame)
    where = m.group(1) if m else ""
    if ".py" in where:
        return "Python interpreter (a Python frame on top)"
    if "libgomp" in where or "libiomp" in where:
        return "OpenMP (fork/join of intra-op threads)"
    if "libtorch_python" in where:
        return "torch Python bindings"
    if "libtorch" in where or "libc10" in where:
        return "kernels" if _KERNEL.search(frame) else "torch C++ dispatch, autograd, other"
    if "libc.so" in where or "libstdc++" in where:
        return "C/C++ runtime (malloc, free, ...)"
    if "python" in where:
        return "Python interpreter (a Python frame on top)"
    return "other or unresolved"


def py_spy_summary(path: str, inside: str = "_step.<locals>.step (step_throughput.py") -> list[str]:
    """Share of the samples inside ``inside`` (the step closure; the step whose operators are counted
    is left out) by where each sample ended."""
    total, by = 0, collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if inside not in stack or "_count_ops" in stack or not n.isdigit():
                continue
            total += int(n)
            by[_leaf_category(stack.split(";")[-1])] += int(n)
    if not total:
        raise SystemExit(f"{path}: no samples inside {inside!r}; record with --native --subprocesses "
                         "(see this script's docstring)")
    lines = [f"{total} samples inside the step", "", "| where the sample ended | share |", "|---|---|"]
    lines += [f"| {k} | {100 * v / total:.1f}% |" for k, v in by.most_common()]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", help="whose depth to keep (default base)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=64, help="every layer's width (2 heads, MLP 4x)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per library, alternating")
    p.add_argument("--libs", nargs="+", default=["maskvlm", "flava"], choices=["maskvlm", "flava"])
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads on a CPU (default 1, so that a profile shows one thread's work; on "
                        "the 2-core development VM the step took the same time with 2; 0: torch's default)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="maskvlm config override, e.g. model.hidden_dropout=0 (FLAVA's setting)")
    p.add_argument("--top", type=int, default=0, help="also list each library's N most frequent operators")
    p.add_argument("--py-spy-summary", metavar="FILE", help="summarise a raw py-spy profile instead (see above)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.py_spy_summary:
        print("\n".join(py_spy_summary(args.py_spy_summary)))
        return 0
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.preset, args.dtype, args.device, args.width,
                                            args.batch_size, args.warmup, args.repeats, args.override, args.threads)))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: leave out --device to measure on the CPU")
    from maskvlm.runtime import report_header

    rows = {}
    for r in range(args.rounds):  # the libraries alternate, so a slow spell of a shared machine hits both
        for lib in args.libs:
            print(f"round {r + 1}/{args.rounds}: {lib} ...", file=sys.stderr, flush=True)
            result = run_worker(lib, args)
            if lib in rows:
                rows[lib]["times"] += result["times"]
            else:
                rows[lib] = result
    rows = list(rows.values())
    lines = [*report_header(args.device, f"{args.preset} depth, width {args.width}, 64 px, batch {args.batch_size}, "
                            f"{args.dtype}, {args.threads or 'default'} thread(s), {args.rounds} rounds of "
                            f"{args.warmup} warm-up + {args.repeats} timed steps (median, min-max of all)"
                            + (f"; maskvlm overrides: {' '.join(args.override)}" if args.override else "")), "",
             "| library | params (tensors) | dropout | step ms (median, min-max) | ATen operators per step | "
             "us per operator |", "|---|---|---|---|---|---|"]
    for r in rows:
        med, n = statistics.median(r["times"]), sum(r["ops"].values())
        r["median"], r["n_ops"] = med, n
        lines.append(f"| {r['lib']} | {r['params'] / 1e6:.2f}M ({r['tensors']}) | {r['dropout']:g} | {1e3 * med:.1f} "
                     f"({1e3 * min(r['times']):.1f}-{1e3 * max(r['times']):.1f}) | {n} | {1e6 * med / n:.1f} |")
    if len(rows) == 2:
        a, f = rows
        lines += ["", f"- maskvlm / FLAVA: step time {a['median'] / f['median']:.2f}x, operators "
                  f"{a['n_ops'] / f['n_ops']:.2f}x"]
    for r in rows if args.top else ():
        lines += ["", f"{r['lib']}: the {args.top} most frequent operators", ""]
        lines += [f"    {n:6d}  {op}" for op, n in collections.Counter(r["ops"]).most_common(args.top)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
