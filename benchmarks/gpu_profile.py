"""Where a pre-training step spends its time on a GPU: the host-device synchronisations it makes
(``torch.cuda.set_sync_debug_mode``, with the line of our code that asked for each), and a
``torch.profiler`` summary (host time per operator, device time per kernel, launches per step).

    python benchmarks/gpu_profile.py                         # base, 224 px, batch 64, bf16
    python benchmarks/gpu_profile.py --batch-size 128 --trace runs/trace.json.gz
    python benchmarks/gpu_profile.py --preset tiny --device cpu   # the profile part only, without a GPU

Same step as ``step_throughput.py`` (forward + backward + AdamW on random inputs).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings

import torch
from step_throughput import _maskvlm_step, _sizes, _sync  # this folder is on sys.path when the script runs


def sync_sites(step, dtype: str) -> collections.Counter:
    """file:line -> number of synchronising calls made there during one step (CUDA only)."""
    sites: collections.Counter = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(dtype)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{w.filename.split('/src/')[-1]}:{w.lineno}"] += 1
    return sites


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--device", default="cuda")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 5 warm-up steps)")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--trace", default=None, help="also write a Chrome trace here (.json or .json.gz)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from maskvlm.runtime import report_header

    device = torch.device(args.device)
    cfg = _sizes(args.preset, [f"model.image_size={args.image_size}", *args.override])
    _, step = _maskvlm_step(cfg, device, args.batch_size)
    for _ in range(5):
        step(args.dtype)
    _sync(device)
    print("\n".join(report_header(args.device, f"preset {args.preset} at {args.image_size} px, batch "
                                               f"{args.batch_size}, {args.dtype}")))
    if device.type == "cuda":
        sites = sync_sites(step, args.dtype)
        print(f"\nhost-device synchronisations in one step: {sum(sites.values())}")
        for site, n in sites.most_common():
            print(f"  {n:4d}  {site}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step(args.dtype)
        _sync(device)
    wall = (time.perf_counter() - t) / args.steps
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    device_us = sum(e.self_device_time_total for e in events) if device.type == "cuda" else 0
    print(f"\nwall per step under the profiler: {wall * 1e3:.1f} ms; device busy per step: "
          f"{device_us / args.steps / 1e3:.1f} ms; kernel launches per step: {launches / args.steps:.0f}")
    print("\nby host time (self):")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    if device.type == "cuda":
        print("\nby device time (self):")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
