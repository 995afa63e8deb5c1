"""Image search, measured: how often a caption finds its own image in the top 5, and how long
index building and queries take, optionally on a large generated image folder.

    python benchmarks/search.py --checkpoint runs/pre --annotations data/synthetic/test.json
    python benchmarks/search.py --checkpoint runs/pre --scale 100000     # + a 100k-image index

Prints a markdown block (machine, command, figures) for benchmarks/RESULTS.md and the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


from maskvlm.train.checkpoint import model_folder
from maskvlm.inference import VLM
from maskvlm.runtime import report_header
from maskvlm.search import ImageIndex, build_index, search


def own_image_rate(vlm: VLM, folder: Path, annotations: Path, out: Path, top_k: int, rerank: bool) -> dict:
    entries = json.loads(annotations.read_text())
    # index only the folder holding this split's images, so the other splits are not distractors
    sub = Path(entries[0]["image"]).parent
    if any(Path(e["image"]).parent != sub for e in entries):
        raise ValueError(f"{annotations}: expected every image in one folder ({sub})")
    images_dir = annotations.parent / sub
    stats = build_index(vlm, folder, images_dir, out, progress=False, rebuild=True)
    index = ImageIndex(out)
    hits = total = 0
    times = []
    for e in entries:
        captions = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        for caption in captions:
            t = time.perf_counter()
            ranked = search(vlm, index, text=caption, top_k=top_k, rerank=rerank)
            times.append(time.perf_counter() - t)
            hits += Path(e["image"]).name in [p for p, _ in ranked]
            total += 1
    return {"images": stats.total, "queries": total, "hit_rate": 100.0 * hits / total,
            "index_seconds": stats.seconds, "query_ms_median": 1000 * statistics.median(times)}


def scale_test(vlm: VLM, folder: Path, n: int, work: Path) -> dict:
    from maskvlm.data.synthetic import ensure_synthetic
    t = time.perf_counter()
    root = ensure_synthetic(work / f"images-{n}", n, 1, 1, vlm.config.model.image_size, 7, progress=True)
    generate_s = time.perf_counter() - t
    images = root / "images" / "train"
    stats = build_index(vlm, folder, images, work / f"index-{n}", batch_size=512, progress=True, rebuild=True)
    index = ImageIndex(work / f"index-{n}")
    queries = ["a small blue circle to the left of a small yellow square", "two red triangles",
               "a large green square above a purple circle", "three yellow circles on a striped background"]
    times = []
    for q in queries * 3:
        t = time.perf_counter()
        search(vlm, index, text=q, top_k=10)
        times.append(time.perf_counter() - t)
    size_mb = (work / f"index-{n}" / "embeddings.f16").stat().st_size / 2 ** 20
    return {"images": stats.total, "generate_seconds": generate_s, "index_seconds": stats.seconds,
            "images_per_second": stats.total / stats.seconds, "query_ms_median": 1000 * statistics.median(times),
            "embeddings_mib": size_mb}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--annotations", default="data/synthetic/test.json", help="retrieval JSON (one entry per image)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--scale", type=int, default=0, help="also index this many generated images")
    p.add_argument("--work", default="runs/search-bench")
    args = p.parse_args()
    folder = model_folder(args.checkpoint)
    vlm = VLM.from_pretrained(folder)
    work = Path(args.work)
    lines = [*report_header(), ""]
    for rerank in (False, True):
        r = own_image_rate(vlm, folder, Path(args.annotations), work / "index-own", args.top_k, rerank)
        lines.append(f"- {'ITM re-ranked' if rerank else 'ITC'} search, {r['queries']} caption queries over "
                     f"{r['images']} images: own image in the top {args.top_k} for {r['hit_rate']:.1f}%; "
                     f"median query {r['query_ms_median']:.1f} ms (index built in {r['index_seconds']:.1f} s)")
    if args.scale:
        s = scale_test(vlm, folder, args.scale, work)
        lines.append(f"- {s['images']} generated images: index built in {s['index_seconds']:.0f} s "
                     f"({s['images_per_second']:.0f} images/s, {s['embeddings_mib']:.1f} MiB of float16 "
                     f"embeddings; generating the images took {s['generate_seconds']:.0f} s); median text query "
                     f"(encode + exact top-10) {s['query_ms_median']:.1f} ms")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
