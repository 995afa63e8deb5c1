"""Pre-training step throughput on one GPU with each memory/speed switch on and off: samples/s,
allocator peak memory and model FLOP utilisation (MFU) of the ``base`` preset at 224 px in bf16.

    python benchmarks/gpu_step.py                                    # base, 224 px, cuda, bf16
    python benchmarks/gpu_step.py --batch-size 64 128 256 --repeats 20
    python benchmarks/gpu_step.py --preset tiny --device cpu --repeats 3   # a quick check without a GPU

Each variant runs in its own subprocess (its own peak memory) through the same step as
``step_throughput.py``: forward + backward + AdamW on random images and captions. The variants:

- default: the trainer's defaults (visible-patch-only masked pass, fused AdamW, bf16 autocast)
- each switch flipped alone: ``train.compile=true``, ``train.activation_checkpointing=true``,
  ``train.fused_adamw=false``, ``masking.visible_only=false``, and fp32 instead of bf16
- ``train.compile=true train.compile_mode=reduce-overhead``: compiled stacks replayed as CUDA
  graphs (fewer kernel launches from the host)
- ``train.freeze=[visual_encoder]`` and ``masking.one_image_pass=true``: switches that change what is
  trained (a frozen image encoder; every objective on the masked image, one image-encoder pass)
- "- shared image keys (per pair)": not a switch; the fusion path from before ITM's pairs and MLM
  shared each image's cross-attention keys/values (put back by the benchmark for comparison)
- ``train.keep_host_memory=false``: on CPU, glibc returns freed memory to the kernel again (page
  faults when the next step re-allocates it); no effect on a GPU's device memory
- "- last layer at read tokens only": not a switch; the last fusion layers compute every token
  again, not only [CLS] (ITM) and the masked patches (MIM) that the losses read
- "+ bf16 LayerNorm outputs (tried)": not a switch; every LayerNorm returns bf16 under autocast
  (no cast before the next linear layer; BERT-style layers then keep a bf16 residual stream)
- "- head-layout key/value gather": not a switch; ITM's and MLM's rows gather their image's
  cross-attention keys/values in the projection's layout again, and the attention products copy
  them once more per row

``--batch-size`` takes several sizes; each variant runs at each size.

MFU = model FLOPs per step (``FlopCounterMode``, forward + backward) / step time / the measured
peak of a large matrix product in the same dtype on the same device.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from step_throughput import matmul_peak, run_worker  # this folder is on sys.path when the script runs

VARIANTS = [  # (name, dtype, overrides)
    ("default", "bf16", []),
    ("+ torch.compile", "bf16", ["train.compile=true"]),
    ("+ torch.compile, CUDA graphs", "bf16", ["train.compile=true", "train.compile_mode=reduce-overhead"]),
    ("+ activation checkpointing", "bf16", ["train.activation_checkpointing=true"]),
    ("- fused AdamW", "bf16", ["train.fused_adamw=false"]),
    ("- visible-only masked pass", "bf16", ["masking.visible_only=false"]),
    ("fp32 (no autocast)", "fp32", []),
    ("+ frozen image encoder", "bf16", ["train.freeze=[visual_encoder]"]),
    ("+ one image pass (FLIP-style)", "bf16", ["masking.one_image_pass=true"]),
    # not a switch: the fusion path before each image's keys/values were shared by its pairs
    ("- shared image keys (per pair)", "bf16", ["bench.per_pair_image_keys=true"]),
    # not a switch: last fusion layers computing every token instead of only those the losses read
    ("- last layer at read tokens only", "bf16", ["bench.full_last_layer=true"]),
    ("- keep host memory (CPU)", "bf16", ["train.keep_host_memory=false"]),
    # not a switch: a tried change (LayerNorm outputs in bf16, fewer autocast casts), not adopted
    ("+ bf16 LayerNorm outputs (tried)", "bf16", ["bench.bf16_layer_norm=true"]),
    # not a switch: image keys/values gathered per row before the head split, copied again per row
    ("- head-layout key/value gather", "bf16", ["bench.gathered_kv=true"]),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--device", default="cuda")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, nargs="+", default=[64])
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation happens here)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--only", nargs="+", default=None, help="variant names to run (default: all)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu --preset tiny to check "
                         "the script")
    from maskvlm.runtime import report_header

    device = torch.device(args.device)
    peaks = {dt: matmul_peak(dt, device) for dt in ("bf16", "fp32")}
    rows = []
    for batch in args.batch_size:
        for name, dtype, overrides in VARIANTS:
            if args.only and name not in args.only:
                continue
            print(f"running {name} at batch {batch} ...", file=sys.stderr, flush=True)
            try:
                r = run_worker("maskvlm", dtype, args.preset, args.device, batch, args.warmup, args.repeats,
                               [f"model.image_size={args.image_size}", *overrides])
            except RuntimeError as e:  # e.g. out of memory: the other variants still run
                rows.append({"name": name, "batch": batch, "error": str(e)[:120]})
                continue
            med = statistics.median(r["times"])
            r.update(name=name, median_s=med, samples_per_s=r["batch"] / med,
                     mfu=r["flops_per_step"] / med / peaks[dtype])
            rows.append(r)
            # each result as it comes (a run stopped by a time limit keeps what it measured)
            print(f"  {med:.3f} s/step, {r['samples_per_s']:.1f} samples/s, MFU {100 * r['mfu']:.1f}%, "
                  f"{r['peak_bytes'] / 2 ** 30:.2f} GiB", file=sys.stderr, flush=True)
    lines = [*report_header(args.device, f"preset {args.preset} at {args.image_size} px, batch {args.batch_size}, "
                            f"{args.warmup} warm-up steps, {args.repeats} timed (median, min-max); matmul peak bf16 "
                            f"{peaks['bf16'] / 1e12:.1f} TFLOP/s, fp32 {peaks['fp32'] / 1e12:.1f} TFLOP/s"), "",
             "| variant | batch | dtype | step s (median, min-max) | samples/s | vs default | GFLOP/sample | MFU | "
             "peak memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['batch']} | | failed: {r['error']} | | | | | |")
            continue
        base = next((d for d in rows if d["name"] == "default" and d["batch"] == r["batch"] and "error" not in d),
                    None)
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        spread = f"{min(r['times']):.3f}-{max(r['times']):.3f}"
        lines.append(f"| {r['name']} | {r['batch']} | {r['dtype']} | {r['median_s']:.3f} ({spread}) | "
                     f"{r['samples_per_s']:.1f} | "
                     f"{ratio} | {r['flops_per_step'] / r['batch'] / 1e9:.1f} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_bytes'] / 2 ** 30:.2f} GiB ({r['memory']}) |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
