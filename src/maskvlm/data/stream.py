"""Streaming training input from webdataset tar shards (the img2dataset layout: ``{key}.jpg|png|webp``,
``{key}.txt``, ``{key}.json``), read with the ``webdataset`` package's tar iterator.

Every rank and dataloader worker reads its own stream. For epoch ``e`` the stream of a worker is a
deterministic function of (seed, e, rank, worker, the shard lists and their sample counts):

* Shards of each source are shuffled per pass (seeded by epoch and pass) and dealt to the
  ``ranks x workers`` slots so that each slot's sample count matches its share of the epoch. The
  slots of one pass are disjoint and together cover every shard: no duplicates and no gaps.
* ``resampled`` draws shards with replacement instead (an endless stream; for very large data).
* Several sources are mixed sample by sample with the given weights. A source that runs out
  before the epoch ends starts its next pass (reshuffled).
* A shuffle buffer of ``shuffle_buffer`` samples mixes samples across the shards of a worker.
* An epoch is ``samples_per_epoch`` samples (default: all samples of all sources); each rank
  takes ``samples_per_epoch // (ranks x batch)`` batches, spread over its workers the way the
  ``DataLoader`` visits them (round robin).

Guarantees (tested in tests/data/test_stream.py):

* One pass of one source (no ``samples_per_epoch``, not resampled) yields every sample exactly
  once over all ranks and workers. Training epochs are exactly one such pass when every slot's
  share equals its quota, i.e. shards of equal size in a number divisible by ranks x workers; the
  log says so at the start, or how many samples per epoch are left out or repeated otherwise.
* Resuming mid-epoch continues each worker's stream with exactly the raw sample that an
  uninterrupted run would have read next. The samples already consumed this epoch are passed
  over by reading tar headers only (no image bytes, no decoding), so resuming costs a scan of the
  headers of the shards read so far in the epoch. Resume with the same number of processes and
  ``data.num_workers``; with another layout the rest of the epoch is skipped (logged).
* A bad sample (unreadable image, missing caption) is replaced by the worker's previous good
  sample with fresh augmentation (the next good one at the start of a stream) and counted, so
  batch shapes and stream positions stay fixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .formats import (BadSample, DataError, _warn_bad_sample, augment_pair, open_image, planned_decode, sample_seed,
                      valid_captions)
from .transforms import ImageTransform

log = logging.getLogger("maskvlm")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # the same members webdataset's tar iterator leaves out
_PASS_END = object()  # marks the end of a source's pass in a reader's stream


def expand_shards(pattern: str) -> list[Path]:
    """``dir/{00000..00012}.tar`` -> 13 paths (brace expansion, also ``{a,b}``); a glob is expanded
    too; every file must exist (the error names the first missing one)."""
    import glob

    from braceexpand import braceexpand

    if "://" in pattern or pattern.startswith("pipe:"):
        raise DataError(f"shards {pattern!r}: only local shard files are supported (copy or mount them first)")
    paths: list[Path] = []
    for p in braceexpand(pattern):
        paths += [Path(g) for g in sorted(glob.glob(p))] if any(c in p for c in "*?[") else [Path(p)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise FileNotFoundError(f"shard not found: {missing[0] if missing else pattern}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return paths


# --- reading one shard ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ref:
    """A member's place in its shard (header-only reading); its bytes are read when needed."""
    offset: int
    size: int


def _keep(name: str) -> bool:
    return not (("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name))


def _members(path: Path, headers_only: bool) -> Iterator[dict]:
    if headers_only:  # tarfile seeks over the data of each member: only the 512-byte headers are read
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.isreg() and _keep(info.name):
                    yield dict(fname=info.name, data=_Ref(info.offset_data, info.size), __url__=str(path))
                tar.members = []
    else:
        from webdataset.tariterators import tar_file_iterator
        with open(path, "rb") as f:
            for member in tar_file_iterator(f):
                member["__url__"] = str(path)
                yield member


def shard_samples(path: Path, headers_only: bool = False) -> Iterator[dict]:
    """Samples of one shard as ``{"__key__", "__url__", ext: bytes}`` in file order (webdataset's
    grouping by key). ``headers_only`` gives the same samples with :class:`_Ref` placeholders
    instead of bytes (see :func:`materialise`). A damaged shard raises DataError naming it."""
    from webdataset.tariterators import group_by_keys

    count = 0
    try:
        for sample in group_by_keys(_members(Path(path), headers_only)):
            count += 1
            yield sample
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated tar shard after {count} samples ({e})") from None


def _shard_or_error(path: Path, mode: dict, expected: Optional[int] = None) -> Iterator[dict]:
    """A shard's samples in a training stream: a damaged shard ends with one error item (counted
    as a bad sample) instead of stopping the run. So does a shard that ends cleanly with fewer
    samples than ``expected`` (its count in shards.json / _stats.json, or from the start-up scan):
    a tar cut exactly between two members reads as a shorter, complete archive."""
    count = 0
    try:
        for sample in shard_samples(path, mode["headers_only"]):
            count += 1
            yield sample
    except DataError as e:
        yield {"__key__": "", "__url__": str(path), "__error__": str(e)}
        return
    if expected is not None and count < expected:
        yield {"__key__": "", "__url__": str(path),
               "__error__": f"{path}: ended after {count} of its {expected} samples (cut between two members?)"}


def materialise(sample: dict, keys: Optional[Sequence[str]] = None) -> dict:
    """Replace the :class:`_Ref` placeholders of a header-only sample by the member bytes (only
    those of ``keys`` when given; the others are left out)."""
    if keys is not None:
        sample = {k: v for k, v in sample.items() if k.startswith("__") or k in keys}
    refs = {k: v for k, v in sample.items() if isinstance(v, _Ref)}
    if not refs:
        return sample
    out = dict(sample)
    with open(sample["__url__"], "rb") as f:
        for k, ref in refs.items():
            f.seek(ref.offset)
            out[k] = f.read(ref.size)
    return out


def listed_count(path: Path, summaries: Optional[dict] = None) -> Optional[int]:
    """A shard's sample count as listed next to it: in ``shards.json`` (written by ``maskvlm data
    shard``) or img2dataset's ``{shard}_stats.json``; None when neither lists it. ``summaries``
    caches the parsed ``shards.json`` per folder across calls."""
    summaries = {} if summaries is None else summaries
    folder = path.parent
    if folder not in summaries:
        f = folder / "shards.json"
        summaries[folder] = json.loads(f.read_text()).get("counts", {}) if f.is_file() else {}
    n = summaries[folder].get(path.name)
    stats = path.with_name(path.name[:-len(path.suffix)] + "_stats.json") if path.suffix else None
    if n is None and stats is not None and stats.is_file():
        n = json.loads(stats.read_text()).get("successes")
    return None if n is None else int(n)


def count_samples(paths: Sequence[Path]) -> list[int]:
    """Samples per shard: as listed next to the shards (:func:`listed_count`) when they are, else
    by reading the tar headers."""
    counts, scanned = [], 0
    summaries: dict[Path, dict] = {}
    for p in paths:
        n = listed_count(p, summaries)
        if n is None:
            n = sum(1 for _ in shard_samples(p, headers_only=True))
            scanned += 1
        counts.append(int(n))
    if scanned:
        log.info("counted the samples of %d shards from their tar headers (no shards.json or _stats.json)", scanned)
    return counts


# --- the stream ---------------------------------------------------------------------------------
@dataclass
class Source:
    pattern: str
    weight: float
    paths: list[Path]
    counts: list[int]

    @classmethod
    def open(cls, pattern: str, weight: float = 1.0) -> "Source":
        if not weight > 0:
            raise DataError(f"shards {pattern!r}: weight must be positive (got {weight})")
        paths = expand_shards(pattern)
        return cls(pattern, float(weight), paths, count_samples(paths))

    @property
    def size(self) -> int:
        return sum(self.counts)


def deal_shards(order: Sequence[int], counts: Sequence[int], targets: Sequence[float]) -> list[list[int]]:
    """Deal shards (in ``order``) to slots: each goes to the slot furthest below its target sample
    count (ties: lowest slot). Disjoint and covering by construction."""
    slots: list[list[int]] = [[] for _ in targets]
    filled = [0] * len(targets)
    for shard in order:
        s = max(range(len(targets)), key=lambda i: (targets[i] - filled[i], -i))
        slots[s].append(shard)
        filled[s] += counts[shard]
    return slots


def stable_id(text: str) -> int:
    """A 63-bit integer id for a string key (image ids of streamed samples)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class ShardStream(IterableDataset):
    """Pre-training pairs streamed from tar shards; see the module docstring for the guarantees.

    ``configure(batch_size, rank, world, num_workers)`` and ``set_position(epoch, batch)`` are
    called by the trainer before each epoch's ``DataLoader`` is made; without ``configure`` one
    pass is iterated (every source once, no quota)."""

    max_bad_in_row = 32

    def __init__(self, sources: Sequence[Source], transform: ImageTransform, seed: int = 0,
                 shuffle_buffer: int = 1000, resampled: bool = False, samples_per_epoch: Optional[int] = None,
                 two_views: bool = False, max_pixels: Optional[int] = None, swap_on_flip: bool = True):
        if not sources:
            raise DataError("no shard sources given")
        self.sources = list(sources)
        self.transform, self.seed, self.two_views, self.max_pixels = transform, seed, two_views, max_pixels
        self.swap_on_flip = swap_on_flip
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.resampled = resampled
        self.total = sum(s.size for s in self.sources)
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise DataError(f"data.samples_per_epoch={samples_per_epoch}: expected a positive number or null")
        self.samples_per_epoch = samples_per_epoch or self.total
        self.batch_size: Optional[int] = None
        self.rank, self.world, self.num_workers = 0, 1, 0
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.samples_per_epoch

    # --- layout -----------------------------------------------------------------------------------
    def configure(self, batch_size: Optional[int], rank: int = 0, world: int = 1, num_workers: int = 0) -> None:
        """The reader layout; ``batch_size=None`` iterates one pass per epoch with no quota."""
        self.batch_size, self.rank, self.world, self.num_workers = batch_size, rank, world, num_workers
        slots = world * max(1, num_workers)
        if not self.resampled:
            for s in self.sources:
                if len(s.paths) < slots:
                    raise DataError(f"shards {s.pattern!r}: {len(s.paths)} shards for {slots} readers ({world} "
                                    f"processes x {max(1, num_workers)} workers); every reader needs its own "
                                    "shards. Write smaller shards (maskvlm data shard --shard-size), lower "
                                    "data.num_workers, or set data.resampled=true")
        if batch_size is not None and self.batches_per_rank() == 0:
            raise DataError(f"data.samples_per_epoch={self.samples_per_epoch} is fewer than one batch of "
                            f"{batch_size} per process ({world} processes)")

    def layout(self) -> dict:
        return {"world": self.world, "num_workers": self.num_workers, "batch_size": self.batch_size}

    def set_position(self, epoch: int, batch_in_epoch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, batch_in_epoch

    def batches_per_rank(self) -> int:
        return self.samples_per_epoch // (self.world * self.batch_size)

    def consumed(self, worker: int, workers: int, batches: int) -> int:
        """Samples of a worker's stream in the first ``batches`` batches of its rank this epoch (the
        DataLoader takes batches from its workers in turn)."""
        return (batches // workers + (worker < batches % workers)) * self.batch_size

    def quota(self, worker: int, workers: int) -> int:
        """Samples a worker yields per epoch."""
        return self.consumed(worker, workers, self.batches_per_rank())

    def _targets(self, source: Source, workers: int) -> list[float]:
        """Each slot's share of ``source`` in one pass: proportional to its quota."""
        if self.batch_size is None:
            quotas = [1.0] * (self.world * workers)
        else:
            quotas = [float(self.quota(w, workers)) for _ in range(self.world) for w in range(workers)]
        total = sum(quotas) or 1.0
        return [source.size * q / total for q in quotas]

    def describe(self) -> str:
        """One line for the log: sizes, split and whether epochs are exactly one pass."""
        workers = max(1, self.num_workers)
        head = (f"{len(self.sources)} shard source{'s' * (len(self.sources) > 1)}, "
                f"{sum(len(s.paths) for s in self.sources)} shards, {self.total} samples; epoch = "
                f"{self.samples_per_epoch} samples")
        if self.batch_size is None:
            return head
        if self.resampled:
            return head + " (resampled: shards drawn with replacement)"
        if len(self.sources) > 1 or self.samples_per_epoch != self.total:
            return head + " (mixed or declared epoch: sources restart when they run out)"
        src = self.sources[0]
        off = 0
        for slot, share in enumerate(deal_shards(range(len(src.paths)), src.counts, self._targets(src, workers))):
            off += abs(sum(src.counts[i] for i in share) - self.quota(slot % workers, workers))
        if off == 0:
            return head + ": every sample exactly once per epoch"
        readers = self.world * workers
        return head + (f": the shards do not split into whole batches over {readers} reader"
                       f"{'s' * (readers > 1)} (processes x workers), so about {off} samples per epoch are left "
                       "out or repeated (equal shards, a multiple of processes x workers in number, and batches "
                       "that divide them make it exact)")

    # --- iteration --------------------------------------------------------------------------------
    def _source_items(self, index: int, epoch: int, slot: int, workers: int, mode: dict) -> Iterator[dict]:
        src = self.sources[index]
        if self.resampled:
            rng = random.Random(sample_seed(self.seed, epoch, slot, index, 7))
            while True:
                shard = rng.randrange(len(src.paths))
                yield from _shard_or_error(src.paths[shard], mode, src.counts[shard])
        targets = self._targets(src, workers)
        passes = 1 if self.batch_size is None else None
        p = 0
        while passes is None or p < passes:
            order = list(range(len(src.paths)))
            random.Random(sample_seed(self.seed, epoch, p, index, 3)).shuffle(order)
            for shard in deal_shards(order, src.counts, targets)[slot]:
                yield from _shard_or_error(src.paths[shard], mode, src.counts[shard])
            yield _PASS_END
            p += 1

    def raw_items(self, epoch: int, slot: int, workers: int, mode: Optional[dict] = None) -> Iterator[dict]:
        """The raw samples (bytes or header refs) of one reader's stream: sources mixed by weight,
        then the shuffle buffer. Depends only on its arguments and the shard lists."""
        mode = mode if mode is not None else {"headers_only": False}
        rng = random.Random(sample_seed(self.seed, epoch, slot, 11))
        live = [(self._source_items(i, epoch, slot, workers, mode), s.weight) for i, s in enumerate(self.sources)]
        buffer: list[dict] = []

        def pull():
            while live:
                k = rng.choices(range(len(live)), weights=[w for _, w in live])[0] if len(live) > 1 else 0
                try:
                    return next(live[k][0])
                except StopIteration:
                    live.pop(k)
            return None

        draining, exhausted = False, False
        while True:
            # the buffer is emptied at the end of a pass so that passes do not overlap
            while not draining and len(buffer) < self.shuffle_buffer:
                item = pull()
                if item is None:
                    exhausted = draining = True
                elif item is _PASS_END:
                    draining = True
                else:
                    buffer.append(item)
            if not buffer:
                if exhausted:
                    return
                draining = False
                continue
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()

    def _decode(self, item: dict, seed: int) -> tuple:
        if "__error__" in item:
            raise BadSample("truncated shard", item["__error__"] + "; the rest of the shard is skipped")
        name = f"{item['__url__']}:{item['__key__']}"
        ext = next((e for e in IMAGE_EXTS if e in item), None)
        if ext is None:
            raise BadSample("missing file", f"{name}: no image member (.jpg, .jpeg, .png or .webp)")
        meta = _meta(item)
        caption = _caption(item, meta)
        if caption is None:
            raise BadSample("bad caption", f"{name}: no usable caption in .txt or .json")
        # the decode suits the crop of this sample's seed (_sample); a stand-in for a later bad sample
        # is cropped from it too, then perhaps from fewer pixels than the model's size
        pil = open_image(Path(f"{name}.{ext}"), self.max_pixels, data=item[ext],
                         decode_scale=planned_decode(self.transform, torch.Generator().manual_seed(seed),
                                                     self.two_views))
        # several captions of one image share its id (ITC does not treat them as negatives)
        image_id = str(meta["image_id"]) if "image_id" in meta else name
        return pil, caption, stable_id(image_id), name

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A new DataLoader asks its workers in turn from worker 0, but after ``start_batch`` batches the
        # next batch is due from worker start_batch % workers: rotate so that order continues.
        worker = (worker + self.start_batch) % workers
        if workers != max(1, self.num_workers):
            raise RuntimeError(f"configured for {self.num_workers} workers, iterated by {workers}")
        slot = self.rank * workers + worker
        quota = self.quota(worker, workers) if self.batch_size is not None else None
        skip = self.consumed(worker, workers, self.start_batch) if self.batch_size is not None else 0
        mode = {"headers_only": skip > 0}
        emitted, debt, last = skip, [], None  # the quota counts the samples consumed before a resume
        for i, item in enumerate(self.raw_items(self.epoch, slot, workers, mode)):
            if i < skip:
                if i == skip - 1:
                    mode["headers_only"] = False
                continue
            if quota is not None and emitted >= quota:
                return
            seed = sample_seed(self.seed, self.epoch, slot, i)
            try:
                decoded = self._decode(materialise(item), seed)
            except BadSample as e:
                _warn_bad_sample(e)
                if last is None:  # nothing good seen yet in this stream: the next good one stands in
                    debt.append((seed, {e.reason: 1}))
                    if len(debt) > self.max_bad_in_row:
                        raise DataError(f"{self.max_bad_in_row} bad samples in a row at the start of a shard "
                                        f"stream, the last: {e}") from None
                    continue
                yield self._sample(last, seed, {e.reason: 1})
                emitted += 1
                continue
            last = decoded
            yield self._sample(decoded, seed, {})
            emitted += 1
            for s, skipped in debt:
                if quota is not None and emitted >= quota:
                    return
                yield self._sample(decoded, s, skipped)
                emitted += 1
            debt = []

    def _sample(self, decoded: tuple, seed: int, skipped: dict) -> dict:
        pil, caption, image_id, key = decoded
        gen = torch.Generator().manual_seed(seed)
        sample = augment_pair(pil, lambda g: caption, self.transform, gen, self.swap_on_flip, self.two_views)
        sample.update(image_id=image_id, seed=seed, skipped=skipped, key=key)
        return sample

    def captions(self, limit: int = 200_000) -> list[str]:
        """Captions from the first shards (for training a tokenizer), at most ``limit``. Only the
        text members are read, not the images."""
        out: list[str] = []
        for src in self.sources:
            for path in src.paths:
                for item in shard_samples(path, headers_only=True):
                    item = materialise(item, ("txt", "json"))
                    caption = _caption(item, _meta(item))
                    if caption is not None:
                        out.append(caption)
                    if len(out) >= limit:
                        return out
        return out


def _meta(item: dict) -> dict:
    """The sample's ``.json`` member as a dict ({} when absent or not a JSON object)."""
    try:
        meta = json.loads(item["json"]) if "json" in item else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _caption(item: dict, meta: dict) -> Optional[str]:
    """The caption: the ``.txt`` member, else the ``caption`` field of the ``.json``; None if neither
    is a non-blank string."""
    caption = item.get("txt", b"").decode("utf-8", errors="replace")
    if valid_captions(caption):
        return caption
    caption = meta.get("caption")
    return caption if valid_captions(caption) else None


def open_stream(shards, weights, transform: ImageTransform, **kwargs) -> ShardStream:
    """``shards``: a pattern or a list of them (one source each); ``weights``: one per source or None."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    weights = list(weights) if weights else [1.0] * len(patterns)
    if len(weights) != len(patterns):
        raise DataError(f"data.shard_weights has {len(weights)} values for {len(patterns)} shard sources")
    return ShardStream([Source.open(p, w) for p, w in zip(patterns, weights)], transform, **kwargs)
