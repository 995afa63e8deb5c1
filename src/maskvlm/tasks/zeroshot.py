"""Zero-shot image classification: each class name is written into prompt templates, the ITC text
features of a class's prompts are averaged into one class embedding, and every image takes the
class whose embedding is most similar to its ITC image feature. Optionally the ITM head re-scores
each image's top-k classes (match probability averaged over the templates).

The data is an image folder: one sub-folder per class (``root/<class>/<image>``), the layout of
ImageNet-style evaluation sets; sub-folder names become class names (``_`` read as a space) unless
a class-name file gives them. Or a JSON list of ``{"image": path, "label": class name}`` (paths
relative to the file's folder, or to ``image_root``), for sets whose images share one folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from ..config import TEXT_ENCODING
from ..inference import VLM, ImageLike

log = logging.getLogger("maskvlm")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Prompts that suit photographs and drawings alike; ``{}`` is replaced by the class name.
DEFAULT_TEMPLATES = ("a {}.", "a photo of a {}.", "an image of a {}.", "a picture showing a {}.")


@dataclass
class ImageFolder:
    """Images with class indices, and the class names in index order."""
    paths: list[Path]
    labels: list[int]
    classnames: list[str]
    folders: list[str]  # the sub-folder of each class


def read_classnames(path: Path) -> list[str]:
    """Class names from a JSON list or a text file with one name per line (blank lines ignored)."""
    try:
        text = Path(path).read_text(encoding=TEXT_ENCODING)
    except FileNotFoundError:
        raise FileNotFoundError(f"class-name file not found: {path}") from None
    if Path(path).suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"{path}: expected a JSON list of non-empty strings")
        return [n.strip() for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_labelled_list(path: Path, classnames: Optional[Sequence[str]] = None,
                       image_root: Optional[str | Path] = None) -> ImageFolder:
    """A JSON list of ``{"image": path, "label": class name}``. The classes are ``classnames`` when
    given (every label must be one of them), else the sorted distinct labels."""
    try:
        entries = json.loads(Path(path).read_text(encoding=TEXT_ENCODING))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{\"image\": ..., \"label\": ...}}")
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("label"), str)
                and e["label"].strip()):
            raise ValueError(f"{path}: entry {i} needs string fields 'image' and 'label' (non-empty); got {e!r}")
    names = list(classnames) if classnames is not None else sorted({e["label"].strip() for e in entries})
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({e["label"].strip() for e in entries} - set(index))
    if unknown:
        raise ValueError(f"{path}: labels not among the {len(names)} class names: {', '.join(unknown[:5])}")
    if len(names) < 2:
        raise ValueError(f"{path}: needs at least 2 classes; found {len(names)}")
    root = Path(image_root) if image_root else Path(path).parent
    return ImageFolder([root / e["image"] for e in entries], [index[e["label"].strip()] for e in entries], names,
                       names)


def load_image_folder(root: str | Path, classnames: Optional[Sequence[str]] = None,
                      image_root: Optional[str | Path] = None) -> ImageFolder:
    """Every image under ``root/<class>/`` (sub-folders sorted by name give the class order).
    ``classnames`` replaces the folder names, in the same order. A ``.json`` file is read by
    :func:`load_labelled_list` instead."""
    root = Path(root)
    if root.suffix == ".json" and root.is_file():
        return load_labelled_list(root, classnames, image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise ValueError(f"{root}: expected one sub-folder per class (at least 2), found {len(folders)}; "
                         "the layout is ROOT/<class name>/<image files>")
    if classnames is not None and len(classnames) != len(folders):
        raise ValueError(f"{len(classnames)} class names given for the {len(folders)} class folders of {root} "
                         f"(first folders: {', '.join(folders[:3])}); give one name per folder, in sorted order")
    names = list(classnames) if classnames is not None else [f.replace("_", " ").strip() for f in folders]
    paths, labels, empty = [], [], []
    for index, folder in enumerate(folders):
        files = sorted(p for p in (root / folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            empty.append(folder)
        paths += files
        labels += [index] * len(files)
    if not paths:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    if empty:
        log.warning("%s: %d class folder(s) hold no images (%s); they stay candidate classes", root, len(empty),
                    ", ".join(empty[:5]))
    return ImageFolder(paths, labels, names, folders)


def _check_templates(templates: Sequence[str]) -> list[str]:
    if not templates:
        raise ValueError("no prompt templates given")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each prompt template needs exactly one '{{}}' where the class name goes; got {bad[0]!r}")
    return list(templates)


@torch.no_grad()
def class_embeddings(vlm: VLM, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
                     ) -> torch.Tensor:
    """(C, E) unit-length class embeddings: the mean of each class's unit-length prompt features."""
    templates = _check_templates(templates)
    prompts = [t.format(name) for name in classnames for t in templates]
    feats = vlm.encode_texts(prompts).view(len(classnames), len(templates), -1)
    mean = feats.mean(1)
    return mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def classify(vlm: VLM, images: Sequence[ImageLike], classnames: Sequence[str],
             templates: Sequence[str] = DEFAULT_TEMPLATES, rerank: int = 0, batch_size: int = 64,
             progress: bool = False) -> torch.Tensor:
    """(N, C) class scores of each image, higher is better: cosine similarity to the class
    embeddings; with ``rerank`` = k > 0, each image's top-k classes are scored by the ITM match
    probability averaged over the templates instead (placed above the rest, whose ITC order stays)."""
    templates = _check_templates(templates)
    emb = class_embeddings(vlm, classnames, templates)
    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc="classify", disable=not progress):
        chunk = list(images[start:start + batch_size])
        sim = vlm.encode_images(chunk, batch_size) @ emb.t()
        if rerank > 0:
            sim = _itm_rerank(vlm, chunk, sim, classnames, templates, min(rerank, len(classnames)), batch_size)
        scores.append(sim)
    return torch.cat(scores) if scores else torch.zeros(0, len(classnames))


def _itm_rerank(vlm: VLM, images: list, sim: torch.Tensor, classnames: Sequence[str], templates: list[str],
                k: int, batch_size: int) -> torch.Tensor:
    top = sim.topk(k, dim=1).indices  # (n, k)
    pairs_img, pairs_txt = [], []
    for i, row in enumerate(top.tolist()):
        for c in row:
            for t in templates:
                pairs_img.append(images[i])
                pairs_txt.append(t.format(classnames[c]))
    prob = vlm.itm_score(pairs_img, pairs_txt, batch_size).view(len(images), k, len(templates)).mean(-1)
    out = sim - 10.0  # every re-ranked class (ITM probability in [0, 1]) above the others (cosine >= -1)
    return out.scatter(1, top, prob + 1.0)


def accuracy_metrics(scores: torch.Tensor, labels: Sequence[int], classnames: Sequence[str]) -> dict:
    """Top-1 / top-5 accuracy, mean per-class recall (over classes with images), chance level and
    each class's recall, in percent."""
    labels_t = torch.as_tensor(list(labels))
    c = scores.shape[1]
    ranked = scores.argsort(dim=1, descending=True)
    hit1 = ranked[:, 0] == labels_t
    hit5 = (ranked[:, :min(5, c)] == labels_t[:, None]).any(1)
    per_class = {}
    for index, name in enumerate(classnames):
        rows = labels_t == index
        if rows.any():
            per_class[name] = 100.0 * float(hit1[rows].float().mean())
    return {"images": len(labels_t), "classes": c, "top1": 100.0 * float(hit1.float().mean()),
            "top5": 100.0 * float(hit5.float().mean()),
            "mean_per_class": sum(per_class.values()) / max(len(per_class), 1),
            "chance_top1": 100.0 / c, "per_class": per_class}


def evaluate_zero_shot(vlm: VLM, folder: ImageFolder, templates: Sequence[str] = DEFAULT_TEMPLATES,
                       rerank: int = 0, batch_size: int = 64, progress: bool = True) -> dict:
    """Zero-shot classification metrics of ``folder`` (see :func:`accuracy_metrics`), plus the
    predictions (path, predicted class, true class)."""
    scores = classify(vlm, folder.paths, folder.classnames, templates, rerank, batch_size, progress)
    metrics = accuracy_metrics(scores, folder.labels, folder.classnames)
    best = scores.argmax(1).tolist()
    metrics.update(templates=list(templates), rerank=rerank, predictions=[
        {"image": str(p), "predicted": folder.classnames[b], "label": folder.classnames[y]}
        for p, b, y in zip(folder.paths, best, folder.labels)])
    return metrics


def format_report(metrics: dict, title: str, worst: int = 5) -> str:
    lines = [title,
             f"  top-1 accuracy            {metrics['top1']:6.1f}",
             f"  top-5 accuracy            {metrics['top5']:6.1f}",
             f"  mean per-class accuracy   {metrics['mean_per_class']:6.1f}",
             f"  chance (top-1)            {metrics['chance_top1']:6.1f}"]
    per_class = sorted(metrics["per_class"].items(), key=lambda kv: kv[1])
    if per_class:
        lines.append("  lowest classes: " + ", ".join(f"{n} {v:.0f}" for n, v in per_class[:worst]))
    return "\n".join(lines)
