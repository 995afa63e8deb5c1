"""Image-conditioned masked language modelling: the masked caption, through the text encoder
and the text cross-modality encoder attending to the image, predicts its masked tokens."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..masking import IGNORE_INDEX
from .base import ObjectiveOutput, StepState, accuracy


class MLM(nn.Module):
    def forward(self, state: StepState) -> ObjectiveOutput:
        model, labels = state.model, state.batch.mlm_labels
        fused = model.fuse_text(state.masked_text, state.image_context)
        selected = labels != IGNORE_INDEX
        logits = model.mlm_head(fused[selected]).float()  # only masked positions reach the vocabulary
        target = labels[selected]
        loss = F.cross_entropy(logits, target) if target.numel() else logits.sum() * 0
        return ObjectiveOutput(loss, {"mlm_acc": accuracy(logits, target)})
