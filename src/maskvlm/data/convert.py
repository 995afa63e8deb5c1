"""The public caption files and caption tables, converted into the ALBEF layout the loaders read.

Three source formats are recognised, the JSON ones by their shape:

- **Karpathy splits** (``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``):
  ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}], "cocoid"? | "imgid"}]}``.
  Written as ``NAME_karpathy_train.json`` (the ``train`` and ``restval`` images, one entry per
  caption, as ALBEF trains), ``NAME_karpathy_val.json`` and ``NAME_karpathy_test.json`` (one entry
  per image with its caption list, the layout retrieval evaluation reads); NAME is the source's
  name without ``dataset_`` (``coco``, ``flickr30k``), so ``eval.k_auto`` picks the protocol's k.
- **COCO captions** (``captions_train2014.json``, ...): ``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}``. Written as one file of per-image caption lists,
  named after the source.

- **CSV / TSV tables** (``.csv``, ``.tsv``; the layout open_clip's CSV loader reads): a header
  row, then one row per image-caption pair. The image column is ``filepath`` and the caption
  column ``title`` unless named otherwise. Each row becomes an entry (a training pair, as in the
  Karpathy train split); rows of the same image share its ``image_id``, so they count as positives
  of each other, and retrieval evaluation groups them by image. Written as ``OUT/<its name>.json``.

Image paths are ``[prefix/][filepath/]filename``; pass the folder they are relative to as
``--image-root`` when training or evaluating.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

from ..config import TEXT_ENCODING
from .formats import DataError, read_json

URL = re.compile(r"(https?|s3|gs|ftp)://")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def detect_format(data: Any) -> Optional[str]:
    """'karpathy', 'coco-captions' or None (anything else, e.g. an ALBEF list)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return None
    first = data["images"][0] if data["images"] else {}
    if isinstance(first, dict) and "sentences" in first:
        return "karpathy"
    if isinstance(data.get("annotations"), list):
        return "coco-captions"
    return None


def _clean(captions: list, skipped: Counter) -> list[str]:
    out = []
    for c in captions:
        if isinstance(c, str) and c.strip():
            out.append(" ".join(c.split()))
        else:
            skipped["empty or non-string caption"] += 1
    return out


def _join(*parts: Optional[str]) -> str:
    return "/".join(p.strip("/") for p in parts if p)


def convert_karpathy(data: dict, source: Path, prefix: Optional[str] = None) -> tuple[dict[str, list], Counter]:
    """{"train" | "val" | "test": ALBEF entries} and the counts of what was left out."""
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    skipped: Counter = Counter()
    for i, im in enumerate(data["images"]):
        where = f"{source}: images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
            raise DataError(f"{where}: expected an object with a string 'filename'")
        if im.get("split") not in KARPATHY_SPLITS:
            raise DataError(f"{where}: 'split' is {im.get('split')!r}; expected one of {', '.join(KARPATHY_SPLITS)}")
        sentences = im.get("sentences")
        if not isinstance(sentences, list):
            raise DataError(f"{where}: 'sentences' must be a list of {{\"raw\": caption}} objects")
        captions = _clean([s.get("raw") if isinstance(s, dict) else None for s in sentences], skipped)
        if not captions:
            skipped["image without a caption"] += 1
            continue
        image = _join(prefix, im.get("filepath"), im["filename"])
        image_id = im.get("cocoid", im.get("imgid", i))
        split = KARPATHY_SPLITS[im["split"]]
        if split == "train":
            splits[split].extend({"image": image, "caption": c, "image_id": image_id} for c in captions)
        else:
            splits[split].append({"image": image, "caption": captions, "image_id": image_id})
    return splits, skipped


def convert_coco_captions(data: dict, source: Path, prefix: Optional[str] = None) -> tuple[list, Counter]:
    """ALBEF entries (one per image, with its caption list) and the counts of what was left out."""
    files: dict = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{source}: images[{i}]: expected an object with 'id' and a string 'file_name'")
        files[im["id"]] = im["file_name"]
    captions: dict = defaultdict(list)
    skipped: Counter = Counter()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or a.get("image_id") not in files:
            raise DataError(f"{source}: annotations[{i}]: expected an object whose 'image_id' is one of the images' "
                            "'id'")
        captions[a["image_id"]].extend(_clean([a.get("caption")], skipped))
    entries = []
    for image_id, name in files.items():
        if captions[image_id]:
            entries.append({"image": _join(prefix, name), "caption": captions[image_id], "image_id": image_id})
        else:
            skipped["image without a caption"] += 1
    return entries, skipped


TABLE_SEPARATORS = {".csv": ",", ".tsv": "\t"}


def convert_table(source: Path, image_key: str = "filepath", caption_key: str = "title",
                  separator: Optional[str] = None, prefix: Optional[str] = None) -> tuple[list, Counter]:
    """ALBEF entries from a CSV/TSV table with a header row (one entry per row, in order; rows of
    the same image share its ``image_id``) and the counts of what was left out."""
    if separator is None:
        separator = TABLE_SEPARATORS.get(source.suffix.lower())
        if separator is None:
            raise DataError(f"{source}: a table needs a separator: name the file .csv or .tsv, or pass --separator")
    if len(separator) != 1:
        raise DataError(f"separator {separator!r}: expected one character (',' or a tab, '\\t')")
    ids: dict[str, int] = {}
    entries: list = []
    skipped: Counter = Counter()
    try:
        with open(source, newline="", encoding=TEXT_ENCODING) as f:
            reader = csv.DictReader(f, delimiter=separator)
            missing = [k for k in (image_key, caption_key) if k not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{source}: no column {', '.join(map(repr, missing))}; the header has "
                                f"{', '.join(map(repr, reader.fieldnames or []))} (choose the columns with "
                                "--image-column and --caption-column)")
            for row in reader:
                image = (row.get(image_key) or "").strip()
                if not image:
                    skipped["row without an image path"] += 1
                    continue
                path = _join(prefix, image)
                for caption in _clean([row.get(caption_key)], skipped):
                    entries.append({"image": path, "caption": caption, "image_id": ids.setdefault(path, len(ids))})
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise DataError(f"{source}: unreadable as a table: {e}") from None
    return entries, skipped


def convert(source: str | Path, out: str | Path, prefix: Optional[str] = None, image_key: str = "filepath",
            caption_key: str = "title", separator: Optional[str] = None) -> dict:
    """Convert ``source`` into ALBEF-layout files under ``out``; returns a summary with the files
    written, their image and caption counts and what was skipped. ``image_key``, ``caption_key``
    and ``separator`` apply to CSV/TSV tables."""
    source, out = Path(source), Path(out)
    table = source.suffix.lower() in TABLE_SEPARATORS or separator is not None
    data = None if table else read_json(source)
    kind = "table" if table else detect_format(data)
    if kind == "table":
        entries, skipped = convert_table(source, image_key, caption_key, separator, prefix)
        files = {out / f"{source.stem}.json": entries}
    elif kind == "karpathy":
        splits, skipped = convert_karpathy(data, source, prefix)
        base = source.stem.removeprefix("dataset_")
        files = {out / f"{base}_karpathy_{name}.json": entries for name, entries in splits.items()}
    elif kind == "coco-captions":
        entries, skipped = convert_coco_captions(data, source, prefix)
        files = {out / f"{source.stem}.json": entries}
    else:
        raise DataError(f"{source}: neither a Karpathy split file (an object whose 'images' have 'sentences') nor a "
                        "COCO captions file (an object with 'images' and 'annotations'); a CSV/TSV table needs the "
                        ".csv or .tsv suffix or --separator")
    urls = [e["image"] for entries in files.values() for e in entries if URL.match(e["image"])]
    if urls:
        total = sum(len(entries) for entries in files.values())
        raise DataError(f"{source}: {len(urls)} of {total} image paths are URLs (e.g. {urls[0]}); maskvlm reads local "
                        "image files or webdataset shards: download the images first (a downloader that writes "
                        "webdataset shards feeds `maskvlm pretrain --shards` directly)")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for path, entries in files.items():
        with open(path, "w", encoding="utf-8") as f:
            json.dump(entries, f, ensure_ascii=False)
        images = {e["image"] for e in entries}
        written[str(path)] = {"images": len(images), "captions": sum(
            1 if isinstance(e["caption"], str) else len(e["caption"]) for e in entries)}
    return {"format": kind, "files": written, "skipped": dict(skipped)}


def format_hint(path: Path, data: Any) -> Optional[str]:
    """For a caption file in a convertible format, the command that converts it."""
    kind = detect_format(data)
    if kind is None:
        return None
    name = "a Karpathy split file" if kind == "karpathy" else "a COCO captions file"
    return f"{path} is {name}; convert it first: maskvlm data convert {path} --out DIR"
