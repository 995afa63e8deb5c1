"""Data pipeline throughput: decoded + augmented + tokenised + masked samples/s per DataLoader
worker from JPEG files (256 px and 512 px sources), next to the trainer's consumption rate (a
timed bf16 pre-training step) at the tiny and base presets. This tells how many workers keep a
device busy.

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --presets tiny --workers 1 2 --samples 2000
    python benchmarks/data_throughput.py --presets base --device cuda --workers 1 4 8   # on a GPU machine
    python benchmarks/data_throughput.py --sources 512 1024 --workers 1 --decode reduced full  # JPEG decode scaling

Each source image is a random scene saved as a quality-90 JPEG, read either as files (annotation
JSON) or from webdataset tar shards of the same JPEGs (``maskvlm data shard``, 250 per shard,
read by the training stream with a 1,000-sample shuffle buffer).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from step_throughput import _maskvlm_step  # this folder is on sys.path when the script runs


def make_jpegs(folder: Path, n: int, side: int) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    ann = folder / "train.json"
    if ann.exists() and len(json.loads(ann.read_text())) == n:
        return ann
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        arr = (rng.random((side // 8, side // 8, 3)) * 255).astype("uint8")
        im = Image.fromarray(arr).resize((side, side), Image.BICUBIC)
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y, r = rng.integers(0, side, 2).tolist() + [int(rng.integers(side // 16, side // 4))]
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.integers(0, 255, 3).tolist()))
        im.save(folder / "img" / f"{i:06d}.jpg", quality=90)
        entries.append({"image": f"img/{i:06d}.jpg", "caption": f"a scene with three shapes number {i} on the left",
                        "image_id": i})
    ann.write_text(json.dumps(entries))
    return ann


def make_shards(ann: Path) -> str:
    """The JPEGs of ``ann`` as tar shards of 250 samples next to it (written once)."""
    from maskvlm.data.shards import write_shards

    out = ann.parent / "shards"
    summary = out / "shards.json"
    if not summary.exists():
        write_shards(ann, None, out, shard_size=250, progress=False)
    return json.loads(summary.read_text())["pattern"]


def loader_rate(cfg, ann: Path, workers: int, samples: int, shards: str | None = None,
                reduced_decode: bool = True) -> float:
    """Samples/s out of the DataLoader: from the JPEG files of ``ann``, or from ``shards``;
    ``reduced_decode``: data.reduced_decode (JPEGs decoded at 1/2-1/8 scale where the crops allow)."""
    from torch.utils.data import DataLoader

    from maskvlm.data.formats import EpochSampler, PairDataset, PretrainCollator
    from maskvlm.data.stream import open_stream
    from maskvlm.data.tokenizer import train_wordpiece
    from maskvlm.data.transforms import ImageTransform

    m, d = cfg.model, cfg.data
    transform = ImageTransform(m.image_size, d.mean, d.std, train=True, crop_scale=d.crop_scale, hflip=d.hflip,
                               reduced_decode=reduced_decode)
    files = PairDataset(ann, None, transform)
    tok = train_wordpiece(files.captions(), 500)
    grid = (m.image_size // m.patch_size,) * 2
    collate = PretrainCollator(tok, d.max_text_len, cfg.masking.text_ratio, cfg.masking.image_ratio, grid,
                               cfg.masking.image_block)
    bs = 32
    if shards:
        ds = open_stream(shards, None, transform, shuffle_buffer=1000)
        ds.configure(bs, num_workers=workers)
        extra = {}
    else:
        ds = files
        extra = {"sampler": EpochSampler(len(ds), 0)}
    loader = DataLoader(ds, batch_size=bs, collate_fn=collate, drop_last=True, num_workers=workers,
                        persistent_workers=False, prefetch_factor=4 if workers else None, **extra)
    it = iter(loader)
    for _ in range(max(1, 2 * workers)):  # warm-up: workers started, first batches out
        next(it)
    t, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch)
        if n >= samples:
            break
    return n / (time.perf_counter() - t)


def consumption_rate(cfg, batch: int, device: torch.device, steps: int) -> float:
    """Samples/s of bf16 pre-training steps at this preset on ``device`` (random inputs)."""
    _, step = _maskvlm_step(cfg, device, batch)
    for _ in range(1 if device.type == "cpu" else 3):  # warm-up (cuDNN/cuBLAS choices on a GPU)
        step("bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step("bf16")
    sync()
    return batch * steps / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--sources", nargs="+", type=int, default=[256, 512], help="JPEG side in pixels")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--decode", nargs="+", default=["reduced"], choices=["reduced", "full"],
                   help="reduced: JPEGs decoded at 1/2-1/8 scale where every crop allows it (data.reduced_decode, "
                        "the default); full: always at full size. Give both to compare them side by side")
    p.add_argument("--samples", type=int, default=1000, help="samples timed per setting")
    p.add_argument("--work", default="runs/data-bench")
    p.add_argument("--device", default="cpu", help="where the trainer's consumption rate is measured (cpu or cuda)")
    p.add_argument("--consume-batch", type=int, default=0,
                   help="batch of the consumption measurement (default: 64 at tiny; 4 at base on CPU, 64 on a GPU)")
    args = p.parse_args()

    from maskvlm.config import build_config
    from maskvlm.runtime import report_header

    device = torch.device(args.device)
    where = "GPU" if device.type == "cuda" else "CPU"
    lines = [*report_header(args.device), "",
             "| preset (image px) | source JPEG | decode | input | workers | samples/s | per worker | trainer consumes "
             f"({where} bf16) | workers needed |", "|---|---|---|---|---|---|---|---|---|"]
    for preset in args.presets:
        cfg = build_config("maskvlm", preset, overrides=["model.vocab_size=1000"])  # step_throughput.VOCAB
        batch = args.consume_batch or (64 if preset == "tiny" or device.type == "cuda" else 4)
        consume = consumption_rate(cfg, batch, device, steps=2 if device.type == "cpu" else 20)
        for side in args.sources:
            ann = make_jpegs(Path(args.work) / f"jpeg{side}", max(args.samples + 256, 1200), side)
            shards = make_shards(ann)
            for source, pattern in (("files", None), ("shards", shards)):
                for w in args.workers:
                    for decode in args.decode:
                        rate = loader_rate(cfg, ann, w, args.samples, pattern, reduced_decode=decode == "reduced")
                        need = math.ceil(consume / (rate / max(w, 1)))
                        lines.append(f"| {preset} ({cfg.model.image_size}) | {side} px | {decode} | {source} | {w} | "
                                     f"{rate:.0f} | {rate / max(w, 1):.0f} | {consume:.1f} samples/s | {need} |")
                        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
