"""Image-text contrastive loss (InfoNCE, both directions) with a learnable temperature.
Captions that share an image id are all positives (multi-positive targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ObjectiveOutput, StepState


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor, temp: torch.Tensor,
             all_image_feat: torch.Tensor | None = None, all_text_feat: torch.Tensor | None = None,
             all_image_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Local features (B, E) against the candidate pool (all ranks; defaults to the local batch).
    Returns (loss, image-to-text accuracy)."""
    all_image_feat = image_feat if all_image_feat is None else all_image_feat
    all_text_feat = text_feat if all_text_feat is None else all_text_feat
    all_image_ids = image_ids if all_image_ids is None else all_image_ids
    positives = (image_ids[:, None] == all_image_ids[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    logits_i2t = image_feat @ all_text_feat.t() / temp
    logits_t2i = text_feat @ all_image_feat.t() / temp
    loss_i2t = -(F.log_softmax(logits_i2t, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(logits_t2i, dim=1) * targets).sum(dim=1).mean()
    hit = positives.gather(1, logits_i2t.argmax(dim=1, keepdim=True)).mean()
    return (loss_i2t + loss_t2i) / 2, hit.detach()


class ITC(nn.Module):
    def forward(self, state: StepState) -> ObjectiveOutput:
        all_img, all_txt, all_ids = state.gathered_features()
        temp = state.model.itc_head.temperature()
        loss, acc = itc_loss(state.image_features, state.text_features, state.batch.image_ids, temp,
                             all_img, all_txt, all_ids)
        return ObjectiveOutput(loss, {"itc_acc": acc, "temp": temp.detach()})
