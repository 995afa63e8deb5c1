"""An on-disk image embedding index and text / image search over it.

Index folder layout:
  ``meta.json``        model it was built with (path + weight-file fingerprint), embed_dim, count
  ``paths.txt``        one image path per line (relative to the indexed folder), row order
  ``embeddings.f16``   float16 matrix (count x embed_dim), L2-normalised ITC image features,
                       read through ``numpy.memmap`` so a large index is never loaded whole

Building is incremental: images already listed are skipped and new rows are appended, batch by
batch with ``meta.json`` following, so a build that stops part-way keeps its rows and the same
command continues it. Search is
exact (chunked matrix products over the memory map) unless ``faiss`` is installed, in which case
an inner-product flat index is used. ``--rerank`` re-scores the top candidates with the ITM head."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data.formats import DataError, open_image
from .folder_lock import hold_folder
from .inference import VLM
from .tasks.retrieval import itc_weight_of
from .tasks.zeroshot import IMAGE_SUFFIXES

log = logging.getLogger("maskvlm")
META, PATHS, EMBEDDINGS = "meta.json", "paths.txt", "embeddings.f16"
# paths.txt holds one relative path a line, as the file system gave it: a name that is not valid UTF-8
# (an archive from another system) is kept byte for byte ("surrogateescape"), and lines are split on
# "\n" alone, as str.splitlines() would also split a name at \x85 or \u2028
PATHS_TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}
ROW_ITEM_BYTES = np.dtype(np.float16).itemsize  # one embedding value on disk


def model_fingerprint(model_dir: Path) -> str:
    """Identifies the weights: size and a hash of the first and last MiB of model.safetensors."""
    path = Path(model_dir) / "model.safetensors"
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Identifies a model by its weights as loaded (so a checkpoint and its ``maskvlm export`` copy
    agree): every tensor's name and shape and its first and last 256 values."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(torch.cat([flat[:256], flat[-256:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def built_with(meta: dict, vlm: VLM, model_dir: Optional[Path]) -> bool:
    """Whether the index ``meta`` describes was built with ``vlm``'s weights (indexes written before
    2026-11-24 hold only the fingerprint of their model.safetensors file)."""
    if "weights" in meta:
        return meta["weights"] == weights_fingerprint(vlm.model)
    return model_dir is not None and (Path(model_dir) / "model.safetensors").is_file() and \
        meta.get("fingerprint") == model_fingerprint(model_dir)


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), as sorted relative paths."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: not a folder")
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    lines = [p for p in found if "\n" not in p]
    if len(lines) < len(found):  # paths.txt holds a path a line
        log.warning("%d image(s) under %s have a line break in their name and are left out, e.g. %r",
                    len(found) - len(lines), folder, next(p for p in found if "\n" in p))
    return lines


@dataclass
class IndexStats:
    added: int
    skipped_existing: int
    unreadable: int
    total: int
    seconds: float


def _write_meta(out: Path, meta: dict) -> None:
    """meta.json replaced in one step (a reader never sees half of it)."""
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / META)


def _complete_rows(out: Path, dim: int) -> list[str]:
    """The paths of the rows both files hold whole. A build stopped part-way (Ctrl-C, a kill, a
    full disk) can leave the embeddings a batch ahead of the paths, or a row or a line cut short;
    both files are cut back to the rows they share, which the build then continues from."""
    row = dim * ROW_ITEM_BYTES
    text = (out / PATHS).read_text(**PATHS_TEXT) if (out / PATHS).exists() else ""
    paths = text.split("\n")[:-1]  # the last part is "" or a line cut short
    size = (out / EMBEDDINGS).stat().st_size if (out / EMBEDDINGS).exists() else 0
    n = min(len(paths), size // row)
    if size != n * row:
        with open(out / EMBEDDINGS, "r+b" if size else "wb") as f:
            f.truncate(n * row)
    if text != "".join(p + "\n" for p in paths[:n]):
        (out / PATHS).write_text("".join(p + "\n" for p in paths[:n]), **PATHS_TEXT)
    return paths[:n]


class _Pixels(Dataset):
    """(relative path, transformed image or None, why not) for each path: decoding and resizing
    run in DataLoader workers."""

    def __init__(self, root: Path, paths: list[str], transform):
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = open_image(self.root / self.paths[i], decode_scale=getattr(self.transform, "decode_scale", None))
            return self.paths[i], self.transform(image)[0], ""
        except (DataError, OSError) as e:
            return self.paths[i], None, str(e)


def build_index(vlm: VLM, model_dir: Path, images: Path, out: Path, batch_size: int = 256,
                progress: bool = True, rebuild: bool = False, workers: int = 0) -> IndexStats:
    """Add the images under ``images`` that ``out`` does not list yet, decoded by ``workers``
    DataLoader processes (0: in this one). Rows are written batch by batch and ``meta.json``
    follows each batch, so a stopped build keeps what it wrote: the index is searchable as it
    stands, and the same command continues it."""
    start = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; it names the index folder")
    found = list_images(images)
    if not found and (rebuild or not (out / META).exists()):
        raise FileNotFoundError(f"--images {images}: no image files in it or below it (looked for "
                                f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    with hold_folder(out, "index build", "choose another --out"):  # one build at a time
        fingerprint = model_fingerprint(model_dir)
        meta_path = out / META
        dim = vlm.config.model.embed_dim
        if meta_path.exists() and not rebuild:
            meta = json.loads(meta_path.read_text())
            if not built_with(meta, vlm, model_dir):
                raise ValueError(f"{out} was built with another model ({meta['model']}); pass --rebuild to re-index "
                                 "with this one")
            if Path(meta["images"]).resolve() != images.resolve():
                raise ValueError(f"{out} indexes {meta['images']}, not {images}; use another --out")
            existing = _complete_rows(out, dim)
            if len(existing) != meta["count"]:
                log.info("%s: continuing a build that stopped part-way: %d rows kept (%s said %d)", out, len(existing),
                         META, meta["count"])
        else:
            for name in (PATHS, EMBEDDINGS):
                (out / name).unlink(missing_ok=True)
            existing = []
        meta = {"model": str(model_dir), "fingerprint": fingerprint, "weights": weights_fingerprint(vlm.model),
                "images": str(images), "embed_dim": dim, "count": len(existing), "dtype": "float16"}
        _write_meta(out, meta)  # from the start: a first build stopped part-way is continued, not redone
        known = set(existing)
        todo = [p for p in found if p not in known]
        added, unreadable = 0, 0
        loader = DataLoader(_Pixels(images, todo, vlm.transform), batch_size=batch_size, num_workers=workers,
                            collate_fn=list)  # a batch: the list of its samples, in order
        with open(out / EMBEDDINGS, "ab") as emb, open(out / PATHS, "a", **PATHS_TEXT) as paths:
            bar = tqdm(total=len(todo), desc="index images", disable=not progress, unit="img")
            for batch in loader:
                for rel, _, why in batch:
                    if why:
                        unreadable += 1
                        log.warning("skipping unreadable image %s (%s)", rel, why)
                good = [(rel, pixels) for rel, pixels, why in batch if not why]
                if good:
                    feats = vlm.encode_pixels(torch.stack([p for _, p in good])).numpy().astype(np.float16)
                    emb.write(feats.tobytes())
                    emb.flush()  # rows first, then the paths that commit them
                    paths.write("".join(rel + "\n" for rel, _ in good))
                    paths.flush()
                    added += len(good)
                    _write_meta(out, {**meta, "count": len(existing) + added})
                bar.update(len(batch))
            bar.close()
        return IndexStats(added, len(existing), unreadable, len(existing) + added, time.perf_counter() - start)


class ImageIndex:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not (self.folder / META).is_file():
            raise FileNotFoundError(f"{folder}: no {META} (build it with `maskvlm index`)")
        self.meta = json.loads((self.folder / META).read_text())
        n, d = self.meta["count"], self.meta["embed_dim"]
        # the first ``count`` rows: a build in progress (or stopped) may have written a batch more
        self.paths = (self.folder / PATHS).read_text(**PATHS_TEXT).split("\n")[:n] if n else []
        rows = (self.folder / EMBEDDINGS).stat().st_size // (ROW_ITEM_BYTES * d) if n else 0
        if len(self.paths) < n or rows < n:
            raise ValueError(f"{folder}: {META} says {n} images but {PATHS} has {len(self.paths)} lines and "
                             f"{EMBEDDINGS} {rows} rows; run `maskvlm index` again to repair it")
        self.embeddings = np.memmap(self.folder / EMBEDDINGS, dtype=np.float16, mode="r", shape=(n, d))
        self._faiss = None

    def __len__(self) -> int:
        return len(self.paths)

    def search(self, query: np.ndarray, top_k: int, chunk: int = 65536, use_faiss: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row indices) of the ``top_k`` rows with the largest inner product with ``query`` (D,)."""
        k = min(top_k, len(self))
        if k == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        q = query.astype(np.float32).reshape(1, -1)
        if use_faiss:
            try:
                import faiss
            except ImportError:
                faiss = None
            if faiss is not None:
                if self._faiss is None:
                    self._faiss = faiss.IndexFlatIP(q.shape[1])
                    for s in range(0, len(self), chunk):
                        self._faiss.add(np.ascontiguousarray(self.embeddings[s:s + chunk], dtype=np.float32))
                scores, idx = self._faiss.search(q, k)
                return scores[0], idx[0]
        best_scores = np.full(0, -np.inf, np.float32)
        best_idx = np.zeros(0, np.int64)
        for s in range(0, len(self), chunk):
            block = np.asarray(self.embeddings[s:s + chunk], dtype=np.float32) @ q[0]
            take = min(k, len(block))
            part = np.argpartition(-block, take - 1)[:take]
            best_scores = np.concatenate([best_scores, block[part]])
            best_idx = np.concatenate([best_idx, part + s])
            if len(best_scores) > k:
                keep = np.argpartition(-best_scores, k - 1)[:k]
                best_scores, best_idx = best_scores[keep], best_idx[keep]
        order = np.argsort(-best_scores, kind="stable")
        return best_scores[order], best_idx[order]


def search(vlm: VLM, index: ImageIndex, text: Optional[str] = None, image: Optional[Path] = None,
           top_k: int = 10, rerank: bool = False, candidates: int = 0,
           model_dir: Optional[Path] = None) -> list[tuple[str, float]]:
    """Ranked (path, score) pairs for a text or image query. With ``rerank`` (text queries), the
    ITC top ``candidates`` (default 4 x top_k) are re-scored by the ITM match log-odds plus the ITC
    logit (cosine / temperature), as retrieval's ``--score itm+itc``: the ITM probability alone
    ranked worse than the cosine with a short-trained head (README, "Search")."""
    if (text is None) == (image is None):
        raise ValueError("give exactly one query: a text or an image")
    if text is not None and not text.strip():
        raise ValueError("the text query is empty")
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: expected 1 or more")
    if ("weights" in index.meta or model_dir is not None) and not built_with(index.meta, vlm, model_dir):
        where = model_dir or "this model"
        raise ValueError(f"{index.folder} was built with {index.meta['model']}, and {where} holds other weights: their "
                         "embeddings do not compare. Search with the model the index was built with, or re-index "
                         f"with this one (maskvlm index --checkpoint {where} --images {index.meta['images']} "
                         f"--out {index.folder} --rebuild)")
    if text is not None:
        query = vlm.encode_texts([text])[0].numpy()
    else:
        query = vlm.encode_images([image])[0].numpy()
    pool = max(top_k, candidates or 4 * top_k) if rerank else top_k
    scores, idx = index.search(query, pool)
    paths = [index.paths[i] for i in idx]
    if rerank:
        if text is None:
            raise ValueError("--rerank scores image-text pairs with ITM; it needs a text query")
        root = Path(index.meta["images"])
        log_odds = vlm.itm_score([root / p for p in paths], [text] * len(paths), log_odds=True).numpy()
        combined = log_odds + itc_weight_of("itm+itc", vlm.model) * scores
        order = np.argsort(-combined, kind="stable")[:top_k]
        return [(paths[i], float(combined[i])) for i in order]
    return [(p, float(s)) for p, s in zip(paths, scores)]
