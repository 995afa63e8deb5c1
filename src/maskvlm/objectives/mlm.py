"""Image-conditioned masked language modelling: the masked caption, through the text encoder
and the text cross-modality encoder attending to the image, predicts its masked tokens.
With momentum distillation (ALBEF) the target mixes the one-hot token with the EMA
teacher's prediction: ``(1 - alpha) * CE(token) + alpha * CE(teacher softmax)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ObjectiveOutput, StepState, accuracy


class MLM(nn.Module):
    def __init__(self, distill: bool = False):
        super().__init__()
        self.distill = distill

    def forward(self, state: StepState) -> ObjectiveOutput:
        model, labels = state.model, state.batch.mlm_labels
        # only masked positions reach the vocabulary
        logits = model.mlm_head(state.fused_mlm_tokens).float()
        target = state.at_mlm_positions(labels)
        if not target.numel():
            return ObjectiveOutput(logits.sum() * 0, {"mlm_acc": accuracy(logits, target)})
        loss = F.cross_entropy(logits, target)
        if self.distill and state.alpha > 0:
            soft = self.teacher_probs(state)
            distill = -(soft * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
            loss = (1 - state.alpha) * loss + state.alpha * distill
        return ObjectiveOutput(loss, {"mlm_acc": accuracy(logits, target)})

    @staticmethod
    @torch.no_grad()
    def teacher_probs(state: StepState) -> torch.Tensor:
        teacher = state.teacher
        if teacher is None:
            raise ValueError("MLM distillation needs the EMA teacher (momentum.alpha > 0 creates it)")
        text = teacher.encode_text(state.batch.mlm_input_ids, state.batch.attention_mask)
        fused = teacher.fuse_text(text, state.teacher_image.hidden)
        return F.softmax(teacher.mlm_head(state.at_mlm_positions(fused)).float(), dim=-1)
