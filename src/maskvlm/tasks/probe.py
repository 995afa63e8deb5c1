"""Linear-probe evaluation: frozen image features of a training image folder, a multinomial
logistic regression on them (standardised features, L2 strength chosen on a held-out share of
the training images, then refitted on all of them), accuracy on a test image folder.

Features (``kind``): ``cls`` the image encoder's [CLS] output (the usual probe), ``mean`` the
mean of its patch tokens, ``itc`` the projected, unit-length ITC embedding. For the single-stream
model these come from its joint transformer run over the image alone.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..inference import VLM, ImageLike
from ..runtime import autocast
from .zeroshot import ImageFolder, accuracy_metrics

log = logging.getLogger("maskvlm")

FEATURES = ("cls", "mean", "itc")
WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@torch.no_grad()
def image_features(vlm: VLM, images: Sequence[ImageLike], kind: str = "cls", batch_size: int = 64,
                   progress: bool = False) -> torch.Tensor:
    """(N, D) frozen features of ``images`` (float32, CPU)."""
    if kind not in FEATURES:
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {', '.join(FEATURES)}")
    if kind == "itc":
        return vlm.encode_images(list(images), batch_size)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress):
        chunk = list(images[start:start + batch_size])
        with autocast(vlm.device, vlm.precision):
            tokens = vlm.model.image_tokens(vlm.model.encode_image(vlm._image_tensor(chunk)))
        out.append((tokens[:, 0] if kind == "cls" else tokens[:, 1:].mean(1)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, vlm.config.model.vision_width)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 300
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: mean cross-entropy + weight_decay/2 ||W||^2.
    Returns (W (D, C), b (C,))."""
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _held_out(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A bool mask holding out ``fraction`` of each class's images (at least one of any class with two or more)."""
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        if len(rows) < 2:
            continue
        n = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held[rows[torch.randperm(len(rows), generator=gen)[:n]]] = True
    return held


def linear_probe(train_x: torch.Tensor, train_y: Sequence[int], test_x: torch.Tensor, test_y: Sequence[int],
                 classnames: Sequence[str], val_fraction: float = 0.2, weight_decays: Sequence[float] = WEIGHT_DECAYS,
                 seed: int = 0, device: Optional[torch.device] = None) -> dict:
    """Choose the L2 strength on a held-out share of the training features, refit on all of them,
    and report :func:`accuracy_metrics` on the test features, plus ``weight_decay`` and ``val_top1``
    (the held-out accuracy of each strength tried). The fits run in float32 on ``device`` (default:
    where the features are), on standardised features."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    device = device or train_x.device
    tx, sx = train_x.float().to(device), test_x.float().to(device)
    mean, std = tx.mean(0), tx.std(0).clamp(min=1e-6)
    xs, ts = (tx - mean) / std, (sx - mean) / std
    y = torch.as_tensor(list(train_y), device=device)
    c = len(classnames)
    held = _held_out(y.cpu(), val_fraction, seed).to(device)
    val_top1 = {}
    if held.any():
        for wd in weight_decays:
            w, b = fit_logistic(xs[~held], y[~held], c, wd)
            val_top1[wd] = 100.0 * float(((xs[held] @ w + b).argmax(1) == y[held]).float().mean())
            log.info("linear probe: weight decay %g, held-out top-1 %.1f", wd, val_top1[wd])
        best = max(val_top1, key=lambda wd: (val_top1[wd], wd))  # ties: the stronger regulariser
    else:
        best = 1e-3
        log.warning("linear probe: too few training images per class to hold any out; weight decay %g", best)
    w, b = fit_logistic(xs, y, c, best)
    metrics = accuracy_metrics((ts @ w + b).cpu(), test_y, classnames)
    metrics.update(weight_decay=best, val_top1={str(k): v for k, v in val_top1.items()},
                   train_top1=100.0 * float(((xs @ w + b).argmax(1) == y).float().mean()))
    return metrics


def evaluate_probe(vlm: VLM, train: ImageFolder, test: ImageFolder, kind: str = "cls", val_fraction: float = 0.2,
                   batch_size: int = 64, progress: bool = True, seed: int = 0) -> dict:
    """Linear-probe accuracy of ``vlm``'s frozen image features: fit on ``train``, measure on ``test``
    (the same class folders)."""
    if train.folders != test.folders:
        only_train = sorted(set(train.folders) - set(test.folders))
        only_test = sorted(set(test.folders) - set(train.folders))
        raise ValueError("the training and test folders must hold the same class folders; only in training: "
                         f"{', '.join(only_train[:5]) or '-'}; only in test: {', '.join(only_test[:5]) or '-'}")
    train_x = image_features(vlm, train.paths, kind, batch_size, progress)
    test_x = image_features(vlm, test.paths, kind, batch_size, progress)
    metrics = linear_probe(train_x, train.labels, test_x, test.labels, train.classnames, val_fraction, seed=seed,
                           device=vlm.device)
    metrics.update(features=kind, train_images=len(train.paths))
    return metrics
