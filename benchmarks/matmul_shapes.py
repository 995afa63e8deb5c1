"""Matrix-product throughput at the shapes of a model's linear layers, next to a large square
product, in one run: do the layers' products already run at the machine's peak?

    python benchmarks/matmul_shapes.py                      # tiny preset widths (192, 576, 768), bf16, CPU
    python benchmarks/matmul_shapes.py --width 384 --dtype fp32

Rows are the tokens of a batch (batch x sequence); columns the (in, out) widths of the fused
QKV, MLP and output projections. Each cell is GFLOP/s, the best of --repeats after 3 warm-ups.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def rate(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=192, help="model width (tiny: 192)")
    p.add_argument("--rows", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 12288])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--square", type=int, default=4096, help="side of the reference square product")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    from maskvlm.runtime import report_header

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    d = args.width
    shapes = [(d, 3 * d, "QKV"), (d, 4 * d, "MLP in"), (4 * d, d, "MLP out"), (d, d, "output proj")]
    lines = [*report_header(args.device, f"{args.dtype}, width {d}"), "",
             "| rows | " + " | ".join(f"{name} ({k} x {n})" for k, n, name in shapes) + " |",
             "|---|" + "---|" * len(shapes)]
    for m in args.rows:
        cells = [f"{rate(m, k, n, dtype, device, args.repeats):.0f}" for k, n, _ in shapes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    sq = args.square
    lines += ["", f"square {sq}^3 product: {rate(sq, sq, sq, dtype, device, max(3, args.repeats // 3)):.0f} GFLOP/s"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
