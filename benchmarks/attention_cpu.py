"""Forward+backward time of one attention call: SDPA (default kernel choice), SDPA forced to the
math backend, and maskvlm's explicit ``math_attention``, in fp32 and bf16, at the shapes the tiny
and base presets use. Run: python benchmarks/attention_cpu.py"""

from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from maskvlm.models.layers import math_attention

SHAPES = {  # (batch, heads, queries, keys, head_dim)
    "tiny ViT self-attn (64 px, patch 8)": (64, 3, 65, 65, 64),
    "tiny ITM cross-attn (3B texts -> image)": (192, 3, 32, 65, 64),
    "base ViT self-attn (224 px, patch 16)": (8, 12, 197, 197, 64),
}


def timed(fn, repeats=7):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'shape':42s}{'dtype':>6s}{'sdpa ms':>10s}{'sdpa-math ms':>14s}{'explicit ms':>13s}{'sdpa/explicit':>15s}")
    for name, (b, h, lq, lk, d) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for n in (lq, lk, lk))
            mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
            mask[:, :, :, -3:] = False

            def sdpa():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().sum().backward()

            def sdpa_math():
                with sdpa_kernel(SDPBackend.MATH):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().sum().backward()

            def explicit():
                math_attention(q, k, v, mask, 0.0).float().sum().backward()
            a, m, e = timed(sdpa), timed(sdpa_math), timed(explicit)
            tag = "bf16" if dtype == torch.bfloat16 else "fp32"
            print(f"{name:42s}{tag:>6s}{a * 1e3:10.1f}{m * 1e3:14.1f}{e * 1e3:13.1f}{a / e:15.2f}")


if __name__ == "__main__":
    main()
