"""Tar shards in the img2dataset / webdataset layout: each sample is ``{key}.{jpg|png|webp}``,
``{key}.txt`` (the caption) and ``{key}.json`` (``key``, ``caption``, ``image_id`` and the
source path), written by ``maskvlm data shard`` and summarised by ``maskvlm data inspect``.

Only writing and inspecting live here; streaming training input from shards is future work.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Iterator, Optional

from .formats import DataError, load_annotations, resolve_image_root

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    tar.addfile(info, io.BytesIO(data))


def write_shards(annotations: Path, image_root: Optional[str], out: Path, shard_size: int = 1000,
                 progress: bool = True) -> dict:
    """One sample per caption (a caption list gives one sample per caption, keys ``{entry}_{n}``).
    Missing images are an error naming the entry; shards are written to ``.tmp`` names and
    renamed when complete. Returns a summary, also written to ``out/shards.json``."""
    from tqdm import tqdm

    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: expected a positive number of samples per shard")
    entries = load_annotations(annotations)
    root = resolve_image_root(annotations, image_root)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, e in enumerate(entries):
        path = root / e["image"]
        if path.suffix.lower() not in IMAGE_EXTS:
            raise DataError(f"{annotations}: entry {i}: {path.name} is not .jpg, .jpeg, .png or .webp")
        if not path.is_file():
            raise DataError(f"{annotations}: entry {i}: image file not found: {path} (is --image-root right?)")
        captions = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        for n, caption in enumerate(captions):
            key = f"{i:09d}" if len(captions) == 1 else f"{i:09d}_{n}"
            samples.append((key, path, caption, e.get("image_id", e["image"])))
    now = time.time()
    shards = []
    bar = tqdm(total=len(samples), desc="write shards", unit="sample", disable=not progress)
    for s, start in enumerate(range(0, len(samples), shard_size)):
        name = f"{s:05d}.tar"
        tmp = out / f".{name}.tmp"
        with tarfile.open(tmp, "w") as tar:
            for key, path, caption, image_id in samples[start:start + shard_size]:
                ext = ".jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()
                _add(tar, key + ext, path.read_bytes(), now)
                _add(tar, key + ".txt", caption.encode("utf-8"), now)
                meta = {"key": key, "caption": caption, "image_id": image_id, "source": str(path)}
                _add(tar, key + ".json", json.dumps(meta).encode("utf-8"), now)
                bar.update(1)
        tmp.rename(out / name)
        shards.append(name)
    bar.close()
    summary = {"source": str(annotations), "samples": len(samples), "shards": len(shards), "shard_size": shard_size,
               "pattern": str(out / (f"{{00000..{len(shards) - 1:05d}}}.tar" if shards else "none"))}
    (out / "shards.json").write_text(json.dumps(summary, indent=2))
    return summary


def iter_shard(path: Path) -> Iterator[dict[str, bytes]]:
    """Samples of one tar shard as {extension: bytes} dicts (with "__key__"), in file order. A
    truncated shard raises DataError naming it and how many samples were read."""
    current: dict[str, bytes] = {}
    count = 0
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if current and current["__key__"] != key:
                    yield current
                    count += 1
                    current = {}
                current["__key__"] = key
                current[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable or truncated tar shard after {count} samples ({e})") from None
    if current:
        yield current


def inspect_shards(paths: list[Path], show: int = 3) -> str:
    """Counts per shard and the first ``show`` samples (key, caption, image format and size)."""
    from PIL import Image

    lines, total, shown = [], 0, 0
    for path in paths:
        n, exts, examples = 0, set(), []
        for sample in iter_shard(path):
            n += 1
            image_ext = next((e for e in sample if "." + e in IMAGE_EXTS), None)
            exts.add(image_ext or "no image")
            if shown < show:
                size = Image.open(io.BytesIO(sample[image_ext])).size if image_ext else None
                caption = sample.get("txt", b"").decode("utf-8", errors="replace")
                examples.append(f"  {sample['__key__']}: {image_ext} {size}, caption {caption!r}")
                shown += 1
        total += n
        lines += [f"{path}: {n} samples ({', '.join(sorted(exts))})", *examples]
    lines.append(f"{len(paths)} shard{'s' * (len(paths) != 1)}, {total} samples")
    return "\n".join(lines)


def expand_pattern(pattern: str) -> list[Path]:
    """``dir/{00000..00012}.tar`` -> the 13 paths; a plain path or glob is returned as found."""
    import glob
    import re

    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo)
        paths = [Path(pattern[:m.start()] + f"{i:0{width}d}" + pattern[m.end():]) for i in range(int(lo), int(hi) + 1)]
    else:
        paths = [Path(p) for p in sorted(glob.glob(pattern))] or [Path(pattern)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                     if len(missing) > 1 else ""))
    return paths
