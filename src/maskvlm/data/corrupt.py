"""A copy of an annotation dataset with a share of its samples broken in the ways web data breaks:
for testing that training skips, counts and reports them (``maskvlm data corrupt``).

Kinds that make a sample unusable (skipped and counted): a missing file, an empty file, a
truncated image, a text file with an image extension, an image with more pixels than allowed
(a decompression bomb), an empty / blank / non-string caption. Kinds that must be converted and
used (not skipped): grayscale, RGBA, palette, CMYK, 16-bit, EXIF-rotated and tiny images.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

SKIP_KINDS = ("missing file", "empty file", "truncated image", "not an image", "decompression bomb",
              "empty caption", "blank caption", "non-string caption")
CONVERT_KINDS = ("grayscale", "rgba", "palette", "cmyk jpeg", "16-bit", "exif rotated", "tiny")


def _write_kind(kind: str, src: Path, dst: Path) -> str:
    """Write the broken or unusual variant of image ``src`` at ``dst`` (extension may change); returns its name."""
    im = Image.open(src).convert("RGB")
    if kind == "missing file":
        return dst.name  # never written
    if kind == "empty file":
        dst.write_bytes(b"")
    elif kind == "truncated image":
        data = src.read_bytes()
        dst.write_bytes(data[: min(len(data) - 1, max(40, len(data) * 2 // 3))])  # header kept, pixels cut
    elif kind == "not an image":
        dst.write_text("<html><body>404 not found</body></html>\n")
    elif kind == "decompression bomb":
        Image.new("1", (10_000, 10_000)).save(dst)  # 100M pixels, a few kB on disk
    elif kind == "grayscale":
        im.convert("L").save(dst)
    elif kind == "rgba":
        rgba = im.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(dst)
    elif kind == "palette":
        im.convert("P", palette=Image.ADAPTIVE, colors=16).save(dst)
    elif kind == "cmyk jpeg":
        dst = dst.with_suffix(".jpg")
        im.convert("CMYK").save(dst, quality=95)
    elif kind == "16-bit":
        import numpy as np
        arr = (np.asarray(im.convert("L"), dtype=np.uint16) * 257)
        Image.fromarray(arr).save(dst)  # mode I;16
    elif kind == "exif rotated":
        dst = dst.with_suffix(".jpg")
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        im.transpose(Image.Transpose.ROTATE_90).save(dst, exif=exif, quality=95)
    elif kind == "tiny":
        im.resize((4, 4)).save(dst)
    else:
        raise ValueError(f"unknown corruption kind {kind!r}")
    return dst.name


def corrupt_dataset(src_json: Path, out_dir: Path, rate: float, seed: int = 0, image_root: Path | None = None,
                    converted_rate: float | None = None) -> dict:
    """Copy ``src_json`` into ``out_dir`` (unchanged entries keep pointing at the original images);
    break ``rate`` of the entries in the skip kinds (cycled) and give ``converted_rate`` (default:
    the same) unusual but valid images. Each changed entry gets its own image file, so exactly
    those entries are affected. Returns the counts written to ``out_dir/corruption.json``."""
    if not 0 <= rate < 1:
        raise ValueError(f"--rate {rate}: expected a share in [0, 1)")
    src_json = Path(src_json)
    root = Path(image_root) if image_root else src_json.parent
    entries = json.loads(src_json.read_text())
    out_dir = Path(out_dir)
    n_bad = round(rate * len(entries))
    n_conv = round((rate if converted_rate is None else converted_rate) * len(entries))
    if n_bad + n_conv > len(entries):
        raise ValueError(f"--rate {rate}: {n_bad} broken and {n_conv} converted entries (the same share of each) "
                         f"are more than the {len(entries)} entries of {src_json}; use a smaller rate")
    (out_dir / "broken").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    chosen = rng.sample(range(len(entries)), n_bad + n_conv)
    counts: dict[str, int] = {}
    # unchanged entries point at the original images by absolute path (nothing is copied)
    entries = [dict(e, image=str((root / e["image"]).resolve())) for e in entries]
    for j, i in enumerate(chosen):
        kinds = SKIP_KINDS if j < n_bad else CONVERT_KINDS
        kind = kinds[j % len(kinds)] if j < n_bad else kinds[(j - n_bad) % len(kinds)]
        counts[kind] = counts.get(kind, 0) + 1
        e = dict(entries[i])
        if kind.endswith("caption"):
            e["caption"] = {"empty caption": "", "blank caption": "   \n", "non-string caption": 42}[kind]
        else:
            src = Path(e["image"])
            name = _write_kind(kind, src, out_dir / "broken" / f"{i:07d}{Path(e['image']).suffix or '.png'}")
            e["image"] = f"broken/{name}"
        entries[i] = e
    (out_dir / src_json.name).write_text(json.dumps(entries))
    summary = {"source": str(src_json), "entries": len(entries), "rate": rate, "broken": n_bad,
               "converted": n_conv, "kinds": counts}
    (out_dir / "corruption.json").write_text(json.dumps(summary, indent=2))
    return summary
