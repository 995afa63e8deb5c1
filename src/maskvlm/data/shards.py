"""Tar shards in the img2dataset / webdataset layout: each sample is ``{key}.{jpg|png|webp}``,
``{key}.txt`` (the caption) and ``{key}.json`` (``key``, ``caption``, ``image_id`` and the
source path), written by ``maskvlm data shard`` and summarised by ``maskvlm data inspect``.
Training reads them with :mod:`maskvlm.data.stream`.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Optional

from .formats import DataError, load_annotations, resolve_image_root
from .stream import IMAGE_EXTS, listed_count, shard_samples
from .tokenizer import encodable

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
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; it names the folder to write the shards into")
    written = sorted(out.glob("[0-9][0-9][0-9][0-9][0-9].tar"))
    if written:  # rewritten, they could change under a run streaming them, and fewer would leave stale ones
        raise FileExistsError(f"{out} already holds {len(written)} shards ({written[0].name} ...); choose another "
                              "--out, or remove them first")
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, e in enumerate(entries):
        path = root / e["image"]
        if path.suffix.lower().lstrip(".") not in IMAGE_EXTS:
            raise DataError(f"{annotations}: entry {i}: {path.name} is not .jpg, .jpeg, .png or .webp")
        if not path.is_file():
            raise DataError(f"{annotations}: entry {i}: image file not found: {path} (is --image-root right?)")
        captions = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        for n, caption in enumerate(captions):
            key = f"{i:09d}" if len(captions) == 1 else f"{i:09d}_{n}"
            samples.append((key, path, caption, e.get("image_id", e["image"])))
    now = time.time()
    shards, counts = [], {}
    bar = tqdm(total=len(samples), desc="write shards", unit="sample", disable=not progress)
    for s, start in enumerate(range(0, len(samples), shard_size)):
        name = f"{s:05d}.tar"
        tmp = out / f".{name}.tmp"
        with tarfile.open(tmp, "w") as tar:
            for key, path, caption, image_id in samples[start:start + shard_size]:
                ext = ".jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()
                _add(tar, key + ext, path.read_bytes(), now)
                caption = encodable([caption])[0]  # a lone surrogate cannot be written as UTF-8
                _add(tar, key + ".txt", caption.encode("utf-8"), now)
                meta = {"key": key, "caption": caption, "image_id": image_id, "source": str(path)}
                _add(tar, key + ".json", json.dumps(meta).encode("utf-8"), now)
                bar.update(1)
        tmp.rename(out / name)
        shards.append(name)
        counts[name] = len(samples[start:start + shard_size])
    bar.close()
    summary = {"source": str(annotations), "samples": len(samples), "shards": len(shards), "shard_size": shard_size,
               "pattern": str(out / (f"{{00000..{len(shards) - 1:05d}}}.tar" if shards else "none")),
               "counts": counts}  # read by the stream to split shards without scanning them
    (out / "shards.json").write_text(json.dumps(summary, indent=2))
    return summary


def inspect_shards(paths: list[Path], show: int = 3) -> str:
    """Counts per shard and the first ``show`` samples (key, caption, image format and size). A
    shard holding fewer or more samples than ``shards.json`` / ``_stats.json`` lists is flagged
    (a copy cut between two members reads as a complete, shorter archive)."""
    from PIL import Image

    lines, total, shown, summaries = [], 0, 0, {}
    for path in paths:
        n, exts, examples = 0, set(), []
        for sample in shard_samples(path):
            n += 1
            image_ext = next((e for e in sample if e in IMAGE_EXTS), None)
            exts.add(image_ext or "no image")
            if shown < show:
                size = Image.open(io.BytesIO(sample[image_ext])).size if image_ext else None
                caption = sample.get("txt", b"").decode("utf-8", errors="replace")
                examples.append(f"  {sample['__key__']}: {image_ext} {size}, caption {caption!r}")
                shown += 1
        total += n
        listed = listed_count(path, summaries)
        mismatch = f"; MISMATCH: {listed} listed next to it (cut or replaced?)" if listed not in (None, n) else ""
        lines += [f"{path}: {n} samples ({', '.join(sorted(exts))}){mismatch}", *examples]
    lines.append(f"{len(paths)} shard{'s' * (len(paths) != 1)}, {total} samples")
    return "\n".join(lines)
