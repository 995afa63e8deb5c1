"""One text-encoder call for both captions of a step, or two: a tried optimisation, measured.

A pre-training step encodes each caption twice with the unimodal text encoder: as written (ITC,
ITM) and with its MLM mask. Concatenating the two batches makes one call of 2B rows instead of two
calls of B, so half the operators are issued for the same arithmetic. This times forward +
backward of the text encoder alone, in bf16 autocast, both ways side by side (alternating rounds),
for three shapes:

- ``tiny``: the tiny preset's text encoder at the main job's batch of 64,
- ``base``: the base preset's text encoder (768 wide) at batch 16,
- ``base-narrow``: the base preset's depth at 64-wide layers, batch 4, so the time is mostly the
  host issuing operators (the situation of a host-bound GPU step).

    python benchmarks/text_merge.py
    python benchmarks/text_merge.py --shapes tiny --rounds 5 --repeats 20

Result on the development CPU (benchmarks/RESULTS.md, optimisation log): slower at tiny, equal at
base, faster only where the host bounds the step, which CUDA graphs already address. Not adopted.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_throughput import time_steps  # this folder is on sys.path

from maskvlm.models.text import TextEncoder

SHAPES = {  # name: (width, layers, heads, MLP width, batch)
    "tiny": (192, 2, 3, 768, 64),
    "base": (768, 6, 12, 3072, 16),
    "base-narrow": (64, 6, 2, 256, 4),
}
VOCAB, TEXT_LEN, MASK_ID = 1000, 32, 4


def _steps(name: str):
    width, layers, heads, mlp, batch = SHAPES[name]
    torch.manual_seed(0)
    enc = TextEncoder(VOCAB, width, layers, heads, mlp, 64)
    ids = torch.randint(5, VOCAB, (batch, TEXT_LEN))
    masked = ids.clone()
    masked[:, 3::4] = MASK_ID  # a quarter of the tokens, roughly the MLM ratio
    attn = torch.ones(batch, TEXT_LEN, dtype=torch.long)

    def two_calls(dtype="bf16"):  # the signature time_steps calls; always bf16 here
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = enc(ids, attn).hidden, enc(masked, attn).hidden
        (a.float().sum() + b.float().sum()).backward()

    def one_call(dtype="bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = enc(torch.cat([ids, masked]), torch.cat([attn, attn])).hidden
        a, b = h[:batch], h[batch:]
        (a.float().sum() + b.float().sum()).backward()

    return batch, two_calls, one_call


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best round's median counts")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    args = p.parse_args()
    from maskvlm.runtime import report_header

    rows = []
    for name in args.shapes:
        batch, two, one = _steps(name)
        for f in (two, one):
            for _ in range(args.warmup):
                f()
        best = {"two": [], "one": []}
        for _ in range(args.rounds):
            for key, f in (("two", two), ("one", one)):
                best[key].append(statistics.median(time_steps(f, "bf16", torch.device("cpu"), args.repeats)))
        t2, t1 = min(best["two"]), min(best["one"])
        rows.append(f"| {name} | {batch} | {t2 * 1e3:.2f} | {t1 * 1e3:.2f} | {t2 / t1:.2f}x |")
        print(rows[-1], flush=True)
    print("\n".join(["", *report_header(), "",
                     "| shape | batch | two calls ms | one call ms | speed-up of one call |", "|---|---|---|---|---|",
                     *rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
