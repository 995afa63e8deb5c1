"""What VQA, NLVR2 and SNLI-VE share: examples of (image(s), text, label), their dataset and
collator, a classifier on the fused [CLS] of the text cross-modality encoder, and the
prediction loop used for evaluation. Each task module supplies its loader and metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data.formats import TaskBatch, open_image, sample_seed
from ..data.tokenizer import TextTokenizer
from ..data.transforms import ImageTransform
from ..models.layers import init_weights
from ..models.model import MaskVLM
from ..runtime import autocast
from ..train.distributed import gather_shares, rank_share


@dataclass
class Example:
    id: Any  # question_id / identifier / pairID: how predictions are reported
    images: list[Path]  # one image (VQA, VE) or two (NLVR2)
    text: str
    label: Optional[int] = None  # class index (NLVR2, VE); None when the split has no labels
    soft: dict[int, float] = field(default_factory=dict)  # VQA: answer index -> soft score
    answers: Optional[list[str]] = None  # VQA: the annotators' raw answers, for the official metric
    kind: str = ""  # VQA answer type ("yes/no", "number", "other") for the per-type breakdown
    question_type: str = ""  # VQA question type ("what color is the", "how many"): the official per-type table


class ExampleDataset(Dataset):
    """Keys are ``(epoch, index)`` (or an index): augmentation depends only on seed, epoch and index."""

    def __init__(self, examples: list[Example], transform: ImageTransform, seed: int = 0,
                 files: Optional[list[Path]] = None, sizes: Optional[list[int]] = None):
        self.examples, self.transform, self.seed = examples, transform, seed
        # the "::"-separated files the examples came from, in order, and how many each gave
        self.files, self.sizes = files or [], sizes or [len(examples)]

    def __len__(self) -> int:
        return len(self.examples)

    def source_sizes(self) -> list[int]:
        """Examples per training file, for ``data.train_weights``."""
        return list(self.sizes)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        ex = self.examples[index]
        gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        scale = getattr(self.transform, "decode_scale", None)
        images = torch.stack([self.transform(open_image(p, decode_scale=scale), gen)[0] for p in ex.images])
        return dict(images=images if len(ex.images) > 1 else images[0], text=ex.text, label=ex.label, soft=ex.soft,
                    index=index)


class ExampleCollator:
    """Stacks images ((B, 3, H, W), or (B, 2, 3, H, W) for pairs) and tokenises the texts; targets
    are class indices (``labels``) or, with ``num_soft`` > 0, dense soft scores (``targets``)."""

    def __init__(self, tokenizer: TextTokenizer, max_len: int, num_soft: int = 0):
        self.tokenizer, self.max_len, self.num_soft = tokenizer, max_len, num_soft

    def __call__(self, samples: list[dict]) -> TaskBatch:
        ids, mask = self.tokenizer([s["text"] for s in samples], self.max_len)
        out = dict(images=torch.stack([s["images"] for s in samples]), input_ids=ids, attention_mask=mask,
                   index=torch.tensor([s["index"] for s in samples]))
        if self.num_soft:
            targets = torch.zeros(len(samples), self.num_soft)
            for row, s in enumerate(samples):
                for j, score in s["soft"].items():
                    targets[row, j] = score
            out["targets"] = targets
        elif all(s["label"] is not None for s in samples):
            out["labels"] = torch.tensor([s["label"] for s in samples])
        return TaskBatch(**out)


class ClassifierHead(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear."""

    def __init__(self, in_dim: int, hidden: int, num_outputs: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden),
                                 nn.Linear(hidden, num_outputs))
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FusedClassifier(nn.Module):
    """The pre-trained model plus a head on the fused [CLS] of (text, image). With image pairs
    (NLVR2) the text is fused with each image and the two [CLS] vectors are concatenated.

    ``soft=True`` trains with binary cross-entropy against soft scores (VQA; summed over answers,
    averaged over questions), otherwise with cross-entropy against class indices."""

    def __init__(self, model: MaskVLM, num_outputs: int, num_images: int = 1, hidden: int = 0, soft: bool = False):
        super().__init__()
        self.model = model
        self.num_images, self.soft = num_images, soft
        width = model.config.text_width
        self.head = ClassifierHead(width * num_images, hidden or 2 * width, num_outputs)

    def logits(self, batch: TaskBatch) -> torch.Tensor:
        images = batch.images
        text = self.model.encode_text(batch.input_ids, batch.attention_mask)
        if images.dim() == 5:  # (B, n, 3, H, W): fuse the text with each image
            b, n = images.shape[:2]
            image = self.model.encode_image(images.flatten(0, 1))
            hidden = text.hidden.repeat_interleave(n, dim=0)
            mask = text.attention_mask.repeat_interleave(n, dim=0)
            fused = self.model.fuse(hidden, mask, image.hidden)[:, 0].reshape(b, -1)
        else:
            image = self.model.encode_image(images)
            fused = self.model.fuse_text(text, image.hidden)[:, 0]
        return self.head(fused).float()

    def forward(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(batch)
        if self.soft:
            loss = F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="sum") / len(batch)
            best = logits.argmax(-1, keepdim=True)
            score = batch.targets.gather(1, best).mean()  # soft score of the predicted answer
            return loss, {"cls_loss": loss.detach(), "vqa_score": score.detach() * 100}
        loss = F.cross_entropy(logits, batch.labels)
        acc = (logits.argmax(-1) == batch.labels).float().mean() * 100
        return loss, {"cls_loss": loss.detach(), "acc": acc.detach()}


@torch.no_grad()
def predict(module: FusedClassifier, dataset: ExampleDataset, collator: ExampleCollator, batch_size: int,
            device: torch.device, precision: str, progress: bool = False, num_workers: int = 0,
            split_over_ranks: bool = False) -> torch.Tensor:
    """Logits (N, num_outputs) for every example of ``dataset``, in order. With ``split_over_ranks``
    (every rank of a torchrun job calls this at the same time) each rank runs a 1/world share of
    the examples and every rank gets all the logits."""
    was_training = module.training
    module.eval()
    n = len(dataset)
    if split_over_ranks:
        dataset = Subset(dataset, rank_share(n).tolist())
    # a private generator: evaluating during training must not shift the training RNG stream
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers,
                        generator=torch.Generator())
    out = []
    try:
        with autocast(device, precision):
            for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
                out.append(module.logits(batch.to(device)).cpu())
    finally:
        module.train(was_training)
    logits = torch.cat(out)
    return gather_shares(logits, n) if split_over_ranks else logits


def accuracy_by(predicted: list[int], examples: list[Example], names: list[str]) -> dict[str, float]:
    """Accuracy (%) overall and per gold class."""
    correct = [p == ex.label for p, ex in zip(predicted, examples)]
    metrics = {"acc": 100.0 * sum(correct) / len(correct)}
    for c, name in enumerate(names):
        rows = [ok for ok, ex in zip(correct, examples) if ex.label == c]
        if rows:
            metrics[f"acc_{name}"] = 100.0 * sum(rows) / len(rows)
    return metrics
