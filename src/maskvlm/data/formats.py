"""Annotation-JSON datasets (ALBEF/BLIP layout: a list of ``{"image", "caption", "image_id"}``
with ``caption`` a string or a list), the ``Batch`` dataclass and the pre-training collator
that tokenises captions and applies the masking policies."""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..config import TEXT_ENCODING
from ..masking import (IGNORE_INDEX, bert_mask, block_mask, mask_to_indices, maskable_tokens, modality_aware_ratios,
                       random_patch_mask)
from .tokenizer import TextTokenizer
from .transforms import ImageTransform, swap_left_right


class DataError(ValueError):
    """An input file or entry is malformed; the message names the file, entry and field."""


def sample_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (the same in every process and worker)."""
    return zlib.crc32(json.dumps(parts).encode()) * 2654435761 % (2 ** 63 - 1)


def load_annotations(path: str | Path, strict: bool = True) -> list[dict]:
    """Read and check an annotation JSON file: a list of objects with ``image`` and ``caption``.
    With ``strict=False`` captions are not checked here (training data: a bad caption is skipped
    and counted when the sample is drawn)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        from .convert import format_hint
        raise DataError(format_hint(path, data) or
                        f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the annotation list is empty")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is {type(entry).__name__}, expected an object")
        if not isinstance(entry.get("image"), str):
            raise DataError(f"{path}: entry {i} has no string field 'image'")
        caption = entry.get("caption")
        if not strict:
            continue
        ok = isinstance(caption, str) or (isinstance(caption, list) and caption
                                          and all(isinstance(c, str) for c in caption))
        if not ok:
            raise DataError(f"{path}: entry {i} field 'caption' must be a string or a non-empty list of strings")
    return data


def root_hint(missing: str) -> str:
    """What to check when images are not found (``missing``: their paths)."""
    hint = "Is the image root right? Set it with --image-root / data.image_root"
    if re.search(r"\b(https?|s3|gs|ftp):/", missing):  # joined to the root, '//' reads as '/' (convert.URL)
        return ("The image paths are URLs: maskvlm reads local image files (or webdataset shards); download the "
                "images first and write their local paths in the 'image' field")
    if "\\" in missing and os.sep == "/":
        hint = "The image paths hold backslashes (Windows separators?): write them with / here. " + hint
    return hint


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with open(path, encoding=TEXT_ENCODING) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(not_text(path, e)) from None


def not_text(path: Path, error: UnicodeDecodeError) -> str:
    return f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); expected a JSON annotation file"


def read_json_lines(path: str | Path) -> list[tuple[int, dict]]:
    """A JSON-lines file (one object per line, blank lines ignored) as (line number, object) pairs, so
    that a later error about an entry names its line; errors here name the line too."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    out = []
    try:
        lines = path.read_text(encoding=TEXT_ENCODING).split("\n")  # not splitlines(): JSON strings may hold U+2028
    except UnicodeDecodeError as e:
        raise DataError(not_text(path, e)) from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e})") from None
            if not isinstance(entry, dict):
                raise DataError(f"{path}: line {n} is {type(entry).__name__}, expected an object")
            out.append((n, entry))
    if not out:
        raise DataError(f"{path}: no entries")
    return out


_REQUIRED = object()


def require(entry: dict, key: str, types, where: str, text: bool = False, default: Any = _REQUIRED) -> Any:
    """``entry[key]`` if present and of ``types``; else a DataError naming ``where`` and the field.
    ``text``: a string the model reads (a question, a statement), which must not be blank.
    ``default``: an optional field, returned when ``key`` is absent (a present one is still checked)."""
    allowed = types if isinstance(types, tuple) else (types,)
    if default is not _REQUIRED and isinstance(entry, dict) and key not in entry:
        return default
    value = entry.get(key) if isinstance(entry, dict) else None
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        names = "/".join(t.__name__ for t in allowed)
        got = "missing" if value is None else f"got {type(value).__name__} {value!r}"[:80]
        raise DataError(f"{where}: field '{key}' must be {names} ({got})")
    if text and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def check_labels_all_or_none(path: Path, unlabelled: Sequence[str], total: int, field: str) -> None:
    """An evaluation file is scored in full or not at all: an error when some of its ``total``
    entries lack ``field`` (``unlabelled`` names them) and others have it."""
    if unlabelled and len(unlabelled) < total:
        more = f", nor do {len(unlabelled) - 1} more entries," if len(unlabelled) > 1 else ""
        raise DataError(f"{path}: {unlabelled[0]} has no '{field}'{more} while {total - len(unlabelled)} have one. "
                        f"Figures over the labelled entries alone would be over a smaller set than the file: "
                        f"give every entry its '{field}', or none of them (predictions only)")


def check_images(paths: Sequence[Path], owners: Sequence[str]) -> None:
    """Fail early, naming the entry, when an image file an entry refers to does not exist."""
    seen: set = set()
    for path, owner in zip(paths, owners):
        if path in seen:
            continue
        seen.add(path)
        if not path.is_file():
            missing = sum(1 for p in set(paths) if not p.is_file())
            raise DataError(f"{owner}: image file not found: {path} ({missing} of {len(set(paths))} images missing; "
                            "is the image root right? set it with --image-root / data.image_root)")


def resolve_image_root(annotation_path: str | Path, image_root: Optional[str]) -> Path:
    return Path(image_root) if image_root else Path(annotation_path).parent


class BadSample(DataError):
    """One sample cannot be used; ``reason`` is one of :data:`SKIP_REASONS` (counted when skipped)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


SKIP_REASONS = ("missing file", "empty file", "not an image", "corrupt image", "image too large", "bad caption",
                "truncated shard")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: EXIF orientation applied, 16-bit and float images scaled by their
    range, transparency composited onto white, grey / palette / CMYK converted."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.round().astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def open_image(path: Path, max_pixels: Optional[int] = None, data: Optional[bytes] = None,
               decode_scale: Optional[Callable[[int, int], int]] = None) -> Image.Image:
    """Decode an image as RGB (see :func:`to_rgb`). Raises :class:`BadSample` naming the file and why:
    missing, empty, not an image, truncated/corrupt, or more than ``max_pixels`` pixels. With ``data``
    the bytes are decoded (e.g. a member of a tar shard) and ``path`` only names them in messages.
    ``decode_scale(width, height)`` (e.g. :meth:`ImageTransform.decode_scale`), given the size the
    image is shown at (EXIF orientation applied): a JPEG is decoded reduced by the factor it returns
    (1, 2, 4 or 8; libjpeg's DCT scaling), and ``info[FULL_SIZE]`` keeps its full size, by which
    :class:`ImageTransform` places its crop. Other formats are decoded whole."""
    import io
    import warnings

    from PIL.JpegImagePlugin import JpegImageFile

    from .transforms import FULL_SIZE

    path = Path(path)
    try:
        if (len(data) if data is not None else path.stat().st_size) == 0:
            raise BadSample("empty file", f"image file is empty (0 bytes): {path}")
    except FileNotFoundError:
        raise BadSample("missing file", f"image file not found: {path}") from None
    source = io.BytesIO(data) if data is not None else path
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                if limit and im.width * im.height > limit:
                    raise BadSample("image too large", f"{path}: {im.width}x{im.height} pixels is more than the "
                                    f"limit of {limit} (data.max_image_pixels); refused as a possible "
                                    "decompression bomb")
                full = None
                if decode_scale is not None and isinstance(im, JpegImageFile):
                    turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
                    full = (im.height, im.width) if turned else im.size
                    scale = decode_scale(*full)
                    if scale > 1:
                        im.draft(None, (im.width // scale, im.height // scale))
                im.load()
                rgb = to_rgb(im)
                if full is not None and rgb.size != full:
                    rgb.info[FULL_SIZE] = full
                return rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("image too large", f"{path}: refused as a possible decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadSample("not an image", f"{path}: not a readable image file (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, BadSample):
            raise
        raise BadSample("corrupt image", f"cannot read image {path}: {e}") from None


class PairDataset(Dataset):
    """Image-caption pairs for pre-training. An entry with several captions yields one of them
    per visit (chosen from the sample's seed). Keys are ``(epoch, index)`` from :class:`EpochSampler`
    (or a plain index), so augmentation depends only on the seed, epoch and index."""

    def __init__(self, annotation_path: str | Path, image_root: Optional[str], transform: ImageTransform,
                 seed: int = 0, swap_on_flip: bool = True, two_views: bool = False,
                 max_pixels: Optional[int] = None):
        self.two_views = two_views  # also return a second, independently augmented view as "image2"
        # several files separated by "::" are concatenated (e.g. COCO, VG, CC3M and SBU, as ALBEF
        # pre-trains); each file's image paths are relative to image_root, or else to its own folder
        self.files = [Path(p) for p in str(annotation_path).split("::")]
        self.annotation_path = self.files[0] if len(self.files) == 1 else Path(str(annotation_path))
        self.entries, self.starts, self.roots = [], [], []
        ids: dict[Any, int] = {}
        self.image_ids = []
        for number, path in enumerate(self.files):
            entries = load_annotations(path, strict=False)
            self.starts.append(len(self.entries))
            self.roots.append(resolve_image_root(path, image_root))
            self.entries += entries
            prefix = f"{number}:" if len(self.files) > 1 else ""  # image ids of different files never collide
            self.image_ids += [ids.setdefault(prefix + str(e.get("image_id", e["image"])), len(ids)) for e in entries]
        self.root = self.roots[0]
        self.transform = transform
        self.max_pixels = max_pixels  # images above this are refused (data.max_image_pixels)
        self.max_tries = 32  # consecutive bad samples before giving up
        self.seed = seed
        self.swap_on_flip = swap_on_flip

    def _source(self, index: int) -> tuple[Path, Path, int]:
        """(annotation file, image root, index within that file) of entry ``index``."""
        number = bisect.bisect_right(self.starts, index) - 1
        return self.files[number], self.roots[number], index - self.starts[number]

    def __len__(self) -> int:
        return len(self.entries)

    def source_sizes(self) -> list[int]:
        """Entries per annotation file, in the order of ``data.train``'s "::"-separated files."""
        return [end - start for start, end in zip(self.starts, self.starts[1:] + [len(self.entries)])]

    def captions(self) -> list[str]:
        """Every usable caption (for training a tokenizer)."""
        out = []
        for e in self.entries:
            out += valid_captions(e.get("caption"))
        return out

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        """The sample at ``key``; a bad one (unreadable image, no usable caption) is replaced by
        another index drawn from the sample's seed, so batch shapes stay fixed and resuming sees
        the same replacement. The sample's ``skipped`` dict counts the replaced ones by reason."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        skipped: dict[str, int] = {}
        gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index, -2))
        for _ in range(self.max_tries):
            try:
                sample = self._load(epoch, index)
                sample["skipped"] = skipped
                return sample
            except BadSample as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                _warn_bad_sample(e)
                last = e
                index = int(torch.randint(len(self.entries), (), generator=gen))
        raise DataError(f"{self._source(index)[0]}: {self.max_tries} bad samples in a row ({skipped}), the last: "
                        f"{last}. {root_hint(str(last) if last.reason == 'missing file' else '')}")

    def _load(self, epoch: int, index: int) -> dict:
        entry = self.entries[index]
        path, root, local = self._source(index)
        captions = valid_captions(entry.get("caption"))
        if not captions:
            raise BadSample("bad caption", f"{path}: entry {local} has no usable caption "
                            f"(got {entry.get('caption')!r}; expected a non-empty string or list of strings)")
        seed = sample_seed(self.seed, epoch, index)
        gen = torch.Generator().manual_seed(seed)
        pil = open_image(root / entry["image"], self.max_pixels, decode_scale=planned_decode(self.transform, gen,
                                                                                          self.two_views))

        def pick(gen: torch.Generator) -> str:
            caption = entry["caption"]
            if isinstance(caption, list):
                caption = caption[int(torch.randint(len(caption), (), generator=gen))]
                if caption not in captions:  # a bad item of the list: take a good one, still seeded
                    caption = captions[int(torch.randint(len(captions), (), generator=gen))]
            return caption
        sample = augment_pair(pil, pick, self.transform, gen, self.swap_on_flip, self.two_views)
        sample.update(image_id=self.image_ids[index], index=index, seed=seed)
        return sample


def planned_decode(transform, gen: torch.Generator, two_views: bool) -> Optional[Callable[[int, int], int]]:
    """The ``decode_scale`` for :func:`open_image` of a training pair about to be augmented with
    ``gen``: suited to the crop ``transform`` will draw from it (see
    :meth:`ImageTransform.decode_scale`); with two views, to any crop. None for a transform without
    one."""
    scale = getattr(transform, "decode_scale", None)
    if scale is None or two_views:
        return scale
    return lambda width, height: scale(width, height, gen)


def augment_pair(pil: Image.Image, pick_caption, transform: ImageTransform, gen: torch.Generator,
                 swap_on_flip: bool = True, two_views: bool = False) -> dict:
    """The training view of one pair, all randomness from ``gen`` in a fixed order: crop/flip, then
    the caption (``pick_caption(gen)``), mirrored when the image was flipped, then the second view."""
    image, flipped = transform(pil, gen)
    caption = pick_caption(gen)
    if flipped and swap_on_flip:
        caption = swap_left_right(caption)
    sample = dict(image=image, caption=caption)
    if two_views:
        sample["image2"] = transform(pil, gen)[0]
    return sample


def valid_captions(caption: Any) -> list[str]:
    """The usable captions of an entry: non-blank strings (a string or a list of them)."""
    items = caption if isinstance(caption, list) else [caption]
    return [c for c in items if isinstance(c, str) and c.strip()]


_WARNED: dict[str, int] = {}
WARN_PER_REASON = 5


def _warn_bad_sample(e: BadSample) -> None:
    """Log the first few bad samples of each reason (per process); all are counted."""
    n = _WARNED.get(e.reason, 0)
    _WARNED[e.reason] = n + 1
    if n < WARN_PER_REASON:
        logging.getLogger("maskvlm").warning("skipping a bad sample (%s): %s%s", e.reason, e,
                                             " (further ones of this kind are counted, not logged)"
                                             if n == WARN_PER_REASON - 1 else "")


def mixed_order(sizes: list[int], weights: list[float], seed: int, epoch: int) -> list[int]:
    """One epoch of ``sum(sizes)`` indices into sources concatenated in order, source ``i`` taking
    the share ``weights[i] / sum(weights)`` of it (largest remainders round the counts), shuffled.

    Each source is read as an endless stream of passes, each pass a fresh permutation of its
    samples, and epoch ``e`` takes the stream's next stretch. So a source drawn less than its size
    per epoch shows every sample before any repeats, and one drawn more repeats its samples evenly.
    Depends only on (seed, epoch): a resumed run sees the same order."""
    total, weight_sum = sum(sizes), float(sum(weights))
    exact = [total * w / weight_sum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    out: list[int] = []
    offset = 0
    for source, (size, count) in enumerate(zip(sizes, counts)):
        if count and size:
            first = epoch * count  # where this epoch's stretch of the source's stream begins
            taken: list[int] = []
            while len(taken) < count:
                pass_number, within = divmod(first + len(taken), size)
                gen = torch.Generator().manual_seed(sample_seed(seed, source, pass_number, -2))
                perm = torch.randperm(size, generator=gen).tolist()
                taken.extend(perm[within: within + count - len(taken)])
            out.extend(offset + i for i in taken)
        offset += size
    gen = torch.Generator().manual_seed(sample_seed(seed, epoch, -3))
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


class EpochSampler(Sampler):
    """Seeded permutation per epoch yielding ``(epoch, index)`` keys; can start mid-epoch.

    The order depends only on (seed, epoch), so resuming at ``start`` samples into an epoch sees
    exactly the samples an uninterrupted run would have seen next. With ``mix`` the epoch mixes
    several sources by weight (:func:`mixed_order`) instead of permuting. With ``world`` > 1 each rank
    takes every ``world``-th index of the permutation (from ``rank``), cut to equal length: no
    sample twice in an epoch, at most ``world - 1`` left out."""

    def __init__(self, size: int, seed: int, epoch: int = 0, start: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, mix: Optional[tuple[list[int], list[float]]] = None):
        self.size, self.seed, self.epoch, self.start, self.shuffle = size, seed, epoch, start, shuffle
        self.rank, self.world = rank, world
        self.mix = mix  # (source sizes, weights): each epoch mixes the sources by weight (mixed_order)

    def order(self) -> list[int]:
        if self.mix is not None:
            full = mixed_order(*self.mix, self.seed, self.epoch)
        elif not self.shuffle:
            full = list(range(self.size))
        else:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            full = torch.randperm(self.size, generator=gen).tolist()
        if self.world == 1:
            return full
        return full[self.rank::self.world][: self.size // self.world]

    def __iter__(self):
        for i in self.order()[self.start:]:
            yield (self.epoch, i)

    def __len__(self) -> int:
        return self.size // self.world - self.start


def padded_positions(selected: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B, C): the positions of each row's True entries in order, padded with other
    positions up to C = the largest count (``padded_slots`` says which entries are real)."""
    width = int(selected.sum(dim=1).max()) if selected.numel() else 0
    return torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :width]


def padded_slots(selected: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (K,): the entries b * C + j of ``padded_positions(selected)`` that are real, row-major."""
    counts = selected.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    return (torch.arange(width, device=selected.device) < counts[:, None]).flatten().nonzero().squeeze(1)


# Index tensors derived from a batch's masks: name -> (the field they come from, how).
#   visible_patches (B, V): the unmasked patches of each image (visible-only encoding)
#   masked_patches (K,): the masked patches, flat over (B, N), in row-major order
#   masked_positions (B, K / B): the masked patches of each image (equal counts per image only)
#   mlm_positions (M,): the masked caption tokens, flat over (B, L), in row-major order
#   mlm_query_positions (B, C), mlm_query_slots (M,): the masked caption tokens of each row, padded
#     to the longest row's count, and which of those B * C slots are real (``padded_slots``)
_DERIVED = {
    "visible_patches": ("image_mask", lambda m: mask_to_indices(~m)),
    "masked_patches": ("image_mask", lambda m: m.flatten().nonzero().squeeze(1)),
    "masked_positions": ("image_mask", lambda m: mask_to_indices(m)),
    "mlm_positions": ("mlm_labels", lambda labels: (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)),
    "mlm_query_positions": ("mlm_labels", lambda labels: padded_positions(labels != IGNORE_INDEX)),
    "mlm_query_slots": ("mlm_labels", lambda labels: padded_slots(labels != IGNORE_INDEX)),
}


@dataclass
class Batch:
    """A collated batch. Masked views are present only when an objective needs them."""
    images: torch.Tensor  # (B, 3, H, W), normalised
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    image_ids: torch.Tensor  # (B,) integer id of the underlying image (captions of one image share it)
    mlm_input_ids: Optional[torch.Tensor] = None  # (B, L) after BERT masking
    mlm_labels: Optional[torch.Tensor] = None  # (B, L), -100 where not masked
    image_mask: Optional[torch.Tensor] = None  # (B, N) bool, True = masked patch
    images2: Optional[torch.Tensor] = None  # (B, 3, H, W) a second augmented view (two-view objectives)
    mask_modes: Optional[torch.Tensor] = None  # (B,) modality-aware masking mode of each sample
    skipped: Optional[dict] = None  # bad samples replaced while building this batch, by reason
    # index(name) cache: name -> (the source tensor it was derived from, the index)
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: (fn(v) if isinstance(v, torch.Tensor) else v)
                        for f in fields(self) if f.name != "_derived" for v in [getattr(self, f.name)]})

    def index(self, name: str) -> torch.Tensor:
        """An index tensor derived from the masks (see ``_DERIVED``). Gathering rows with it
        (``index_select``) needs no host-device synchronisation, unlike boolean-mask indexing,
        whose result size the host must read back. :meth:`to` derives the indices on the host
        before moving a batch to a GPU; a mask replaced since (e.g. text-guided masking) is
        derived again from the new mask."""
        source_name, derive = _DERIVED[name]
        source = getattr(self, source_name)
        if source is None:
            raise ValueError(f"batch has no {source_name}, so no {name}")
        cached = self._derived.get(name)
        if cached is not None and cached[0] is source:
            return cached[1]
        value = derive(source)
        self._derived[name] = (source, value)
        return value

    def _with_indices(self, moved: "Batch", fn) -> "Batch":
        """Give ``moved`` (this batch with ``fn`` applied to each tensor) the mask indices, derived
        here on the host and passed through ``fn`` too."""
        for name, (source_name, _) in _DERIVED.items():
            source = getattr(self, source_name)
            if source is None or source.device.type != "cpu":
                continue
            try:
                value = self.index(name)
            except ValueError:  # rows with different visible counts: the objective that needs them says so
                continue
            moved._derived[name] = (getattr(moved, source_name), fn(value))
        return moved

    def to(self, device, non_blocking: bool = False) -> "Batch":
        def move(t):
            return t.to(device, non_blocking=non_blocking)
        if torch.device(device).type == "cpu":
            return self._map(move)
        return self._with_indices(self._map(move), move)  # derived here: no waiting for the device later

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True), in its pinning thread
        def pin(t):
            return t.pin_memory()
        return self._with_indices(self._map(pin), pin)  # the indices too, so their copy is asynchronous

    def __len__(self) -> int:
        return self.images.shape[0]


class TaskBatch:
    """A collated fine-tuning batch: named tensors (``images`` first dimension = batch size)."""

    def __init__(self, **tensors):
        self.__dict__.update(tensors)

    def _map(self, fn) -> "TaskBatch":
        return TaskBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})

    def to(self, device, non_blocking: bool = False) -> "TaskBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TaskBatch":
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return self.images.shape[0]


def merge_counts(counts) -> dict:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in (c or {}).items():
            out[k] = out.get(k, 0) + v
    return out


class PretrainCollator:
    """Stacks images, tokenises captions, and draws the text and image masks for the batch."""

    def __init__(self, tokenizer: TextTokenizer, max_len: int, text_ratio: float = 0.0, image_ratio: float = 0.0,
                 grid: Sequence[int] = (0, 0), image_block: int = 2, modality_aware: Optional[tuple] = None,
                 fixed_len: bool = False):
        self.modality_aware = modality_aware  # (mode probabilities, heavy ratio, light ratio) or None
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.fixed_len = fixed_len  # captions padded to max_len (fixed shapes) instead of to the longest
        self.text_ratio = text_ratio
        self.image_ratio = image_ratio
        self.grid = tuple(grid)
        self.image_block = image_block
        self.random_ids = tokenizer.ordinary_ids()

    def __call__(self, samples: list[dict]) -> Batch:
        images = torch.stack([s["image"] for s in samples])
        ids, attn = self.tokenizer([s["caption"] for s in samples], self.max_len, self.fixed_len)
        batch = Batch(images=images, input_ids=ids, attention_mask=attn,
                      image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
                      skipped=merge_counts(s.get("skipped") for s in samples))
        if "image2" in samples[0]:
            batch.images2 = torch.stack([s["image2"] for s in samples])
        gen = torch.Generator().manual_seed(sample_seed(*[s["seed"] for s in samples]))
        if self.modality_aware is not None:
            return self._modality_aware(batch, gen)
        if self.text_ratio > 0:
            maskable = maskable_tokens(ids, attn, self.tokenizer.special_ids)
            batch.mlm_input_ids, batch.mlm_labels = bert_mask(ids, maskable, self.text_ratio, self.tokenizer.mask_id,
                                                              self.random_ids, gen)
        if self.image_ratio > 0:
            batch.image_mask = block_mask(len(samples), self.grid, self.image_ratio, self.image_block, gen)
        return batch

    def _modality_aware(self, batch: Batch, gen: torch.Generator) -> Batch:
        probs, heavy, light = self.modality_aware
        batch.mask_modes, text_ratios, image_ratios = modality_aware_ratios(len(batch), probs, heavy, light, gen)
        maskable = maskable_tokens(batch.input_ids, batch.attention_mask, self.tokenizer.special_ids)
        batch.mlm_input_ids, batch.mlm_labels = bert_mask(batch.input_ids, maskable, text_ratios,
                                                          self.tokenizer.mask_id, self.random_ids, gen)
        batch.image_mask = random_patch_mask(image_ratios, self.grid[0] * self.grid[1], gen)
        return batch


class RetrievalDataset(Dataset):
    """Images of a retrieval split (one entry per image, caption list) for evaluation.

    Exposes ``texts``, ``txt2img`` (image index of each text) and ``img2txt`` (text indices of
    each image). Entries with a single string caption are grouped by ``image`` path."""

    def __init__(self, annotation_path: str | Path, image_root: Optional[str], transform: ImageTransform):
        entries = load_annotations(annotation_path)
        self.root = resolve_image_root(annotation_path, image_root)
        self.transform = transform
        self.images: list[str] = []
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        index: dict[str, int] = {}
        for n, e in enumerate(entries):
            if any(not c.strip() for c in ([e["caption"]] if isinstance(e["caption"], str) else e["caption"])):
                # ranked as a query it would count in the figures; skipping it would change them too
                raise DataError(f"{annotation_path}: entry {n} ({e['image']}) has an empty caption; an evaluation "
                                "ranks every caption, so remove it or write it")
            if e["image"] not in index:
                index[e["image"]] = len(self.images)
                self.images.append(e["image"])
                self.img2txt.append([])
            i = index[e["image"]]
            for caption in [e["caption"]] if isinstance(e["caption"], str) else e["caption"]:
                self.img2txt[i].append(len(self.texts))
                self.txt2img.append(i)
                self.texts.append(caption)
        # An evaluation cannot skip an image without changing its figures, so a missing one is an
        # error, and it is found here, before any work (a training run's first validation comes
        # after steps that would otherwise be trained for nothing).
        missing = [p for p in self.images if not (self.root / p).is_file()]
        if missing:
            raise DataError(f"{annotation_path}: {len(missing)} of {len(self.images)} images not found under "
                            f"{self.root} (e.g. {', '.join(missing[:3])}); an evaluation needs every image. "
                            f"{root_hint(' '.join(missing[:3]))}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.root / self.images[i]
        image, _ = self.transform(open_image(path, decode_scale=getattr(self.transform, "decode_scale", None)))
        return image
