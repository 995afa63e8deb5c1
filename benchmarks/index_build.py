"""Image-index build rate (``maskvlm index``) with the images decoded in the main process against
DataLoader workers, side by side in one run, with the indexes checked equal.

    python benchmarks/index_build.py                          # tiny, 1,000 JPEGs of 512 px, workers 0 1 2
    python benchmarks/index_build.py --side 256 --workers 0 4 --preset base --device cuda

The images are random scenes saved as quality-90 JPEGs (as in data_throughput.py); the model is
the preset's architecture with random weights (the time does not depend on the weights).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from data_throughput import make_jpegs  # this folder is on sys.path when the script runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--side", type=int, default=512, help="JPEG side in pixels")
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="runs/index-bench")
    args = p.parse_args()

    from maskvlm.config import build_config
    from maskvlm.data.tokenizer import train_wordpiece
    from maskvlm.inference import VLM
    from maskvlm.models.model import build_model
    from maskvlm.runtime import report_header
    from maskvlm.search import ImageIndex, build_index

    work = Path(args.work)
    make_jpegs(work / f"jpeg{args.side}", args.images, args.side)
    images = work / f"jpeg{args.side}" / "img"
    cfg = build_config("maskvlm", args.preset)
    tokenizer = train_wordpiece(["a scene with shapes"] * 10, vocab_size=100)
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    folder = build_model(cfg).save_pretrained(work / f"model-{args.preset}", cfg, tokenizer)
    vlm = VLM.from_pretrained(folder, device=args.device)
    build_index(vlm, folder, images, work / "warm-up", args.batch_size, progress=False, rebuild=True)  # first touch
    rows, first = [], None
    for workers in args.workers:
        out = work / f"index-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        stats = build_index(vlm, folder, images, out, args.batch_size, progress=False, workers=workers)
        index = ImageIndex(out)
        same = first is None or (index.paths == first.paths and
                                 np.array_equal(np.asarray(index.embeddings), np.asarray(first.embeddings)))
        first = first or index
        rows.append((workers, stats.added / stats.seconds, same))
    base = rows[0][1]
    lines = [*report_header(args.device, f"preset {args.preset} ({cfg.model.image_size} px), {args.images} JPEGs of "
                                         f"{args.side} px, batch {args.batch_size}"), "",
             "| workers | images/s | vs first row | index |", "|---|---|---|---|"]
    lines += [f"| {w} | {rate:.0f} | {rate / base:.2f}x | {'the same' if same else 'DIFFERENT'} |"
              for w, rate, same in rows]
    print("\n".join(lines))
    return 0 if all(same for *_, same in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
