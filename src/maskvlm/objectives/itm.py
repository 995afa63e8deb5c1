"""Image-text matching: a binary head on the fused CLS for positive pairs and hard negatives.
For each text one negative image and for each image one negative text are drawn with
probability softmax(ITC similarity), never from the same image id."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ObjectiveOutput, StepState, accuracy


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, image_ids: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sim_i2t (B, B) local image-to-text similarity. Returns (negative text for each image,
    negative image for each text, valid (B,) bool: both negatives exist for that row)."""
    allowed = image_ids[:, None] != image_ids[None, :]  # symmetric
    valid = allowed.any(dim=1)
    weights_i2t = F.softmax(sim_i2t.float(), dim=1).masked_fill(~allowed, 0)
    weights_t2i = F.softmax(sim_i2t.t().float(), dim=1).masked_fill(~allowed, 0)
    # Rows with no allowed candidate draw uniformly and are then dropped from the loss.
    fallback = (~valid)[:, None].float()
    neg_text = torch.multinomial(weights_i2t + fallback, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(weights_t2i + fallback, 1, generator=generator).squeeze(1)
    return neg_text, neg_image, valid


class ITM(nn.Module):
    def forward(self, state: StepState) -> ObjectiveOutput:
        model, batch = state.model, state.batch
        image, text = state.image, state.text
        sim = state.image_features @ state.text_features.t() / model.itc_head.temperature()
        neg_text, neg_image, valid = sample_hard_negatives(sim.detach(), batch.image_ids)
        b = len(batch)
        text_hidden = torch.cat([text.hidden, text.hidden, text.hidden[neg_text]])
        text_mask = torch.cat([text.attention_mask, text.attention_mask, text.attention_mask[neg_text]])
        image_hidden = torch.cat([image.hidden, image.hidden[neg_image], image.hidden])
        fused = model.fuse(text_hidden, text_mask, image_hidden)
        logits = model.itm_logits(fused).float()
        labels = torch.zeros(3 * b, dtype=torch.long, device=logits.device)
        labels[:b] = 1
        keep = torch.cat([torch.ones(b, dtype=torch.bool, device=valid.device), valid, valid])
        loss = F.cross_entropy(logits[keep], labels[keep])
        return ObjectiveOutput(loss, {"itm_acc": accuracy(logits[keep], labels[keep])},
                               {"neg_text": neg_text, "neg_image": neg_image, "valid": valid})
