"""Image-text matching: a binary head on the fused CLS for positive pairs and hard negatives.
For each text one negative image and for each image one negative text are drawn with
probability softmax(ITC similarity), never from the same image id. Under torchrun the
candidates are the whole gathered batch (every rank's encodings, gradients flowing back)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..train.distributed import all_gather_no_grad, all_gather_with_grad, global_max, world_size
from .base import ObjectiveOutput, StepState, accuracy


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, image_ids: torch.Tensor, generator: torch.Generator | None = None,
                          sim_t2i: torch.Tensor | None = None, candidate_ids: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sim_i2t (B, G): local images against the candidate texts; sim_t2i (B, G): local texts against
    the candidate images (default: the local batch, sim_i2t transposed). Returns (negative text for
    each image, negative image for each text, valid (B,) bool: both negatives exist for that row),
    as indices into the candidates."""
    if sim_t2i is None:
        sim_t2i = sim_i2t.t()
    candidate_ids = image_ids if candidate_ids is None else candidate_ids
    allowed = image_ids[:, None] != candidate_ids[None, :]
    valid = allowed.any(dim=1)
    return _draw(sim_i2t, allowed, valid, generator), _draw(sim_t2i, allowed, valid, generator), valid


def _draw(sim: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor, generator) -> torch.Tensor:
    """One candidate per row of ``sim`` with probability softmax(row) over the allowed candidates.
    Rows with no allowed candidate draw uniformly and are then dropped from the loss. In a diverging
    step the similarities can be NaN or infinite: their weights are zeroed (``nan_to_num``) and a row
    left with no weight draws uniformly too, so the draw succeeds, the step's loss comes out
    non-finite and the trainer skips it (and stops after train.max_nonfinite_in_row), rather than
    torch.multinomial raising mid-forward. All on the device, nothing read back to the host."""
    weights = torch.nan_to_num(F.softmax(sim.float(), dim=1), 0.0, 0.0, 0.0).masked_fill(~allowed, 0)
    uniform = (~valid | (weights.sum(dim=1) <= 0))[:, None].float()
    return torch.multinomial(weights + uniform, 1, generator=generator).squeeze(1)


class ITM(nn.Module):
    def __init__(self, global_negatives: bool = True):
        super().__init__()
        self.global_negatives = global_negatives

    def forward(self, state: StepState) -> ObjectiveOutput:
        model, batch = state.model, state.batch
        image, text = state.image, state.text
        temp = model.itc_head.temperature()
        text_hidden, text_mask = text.hidden, text.attention_mask
        if self.global_negatives and world_size() > 1:
            all_img, all_txt, all_ids = state.gathered_features()
            neg_text, neg_image, valid = sample_hard_negatives(
                (state.image_features @ all_txt.t() / temp).detach(), batch.image_ids, None,
                (state.text_features @ all_img.t() / temp).detach(), all_ids)
            # captions of different ranks differ in padded length: pad to the longest first
            text_hidden, text_mask = pad_tokens(text_hidden, text_mask, global_max(text_hidden.shape[1]))
            text_pool, mask_pool = all_gather_with_grad(text_hidden), all_gather_no_grad(text_mask)
            # the negative images come from every rank: they join this batch's images as rows B..2B-1
            extra_images = all_gather_with_grad(image.hidden).index_select(0, neg_image)
        else:
            sim = state.image_features @ state.text_features.t() / temp
            neg_text, neg_image, valid = sample_hard_negatives(sim.detach(), batch.image_ids)
            text_pool, mask_pool, extra_images = text_hidden, text_mask, None
        b = len(batch)
        rows = torch.arange(b, device=neg_image.device)
        text_hidden = torch.cat([text_hidden, text_hidden, text_pool.index_select(0, neg_text)])
        text_mask = torch.cat([text_mask, text_mask, mask_pool.index_select(0, neg_text)])
        # (text, image) pairs: positives, (text, negative image), (negative text, image); each image's
        # fusion keys/values are projected once and shared with MLM (StepState.image_kv)
        image_index = torch.cat([rows, neg_image if extra_images is None else rows + b, rows])
        # only [CLS] reaches the ITM head: the last fusion layer computes that token alone
        cls = torch.zeros(3 * b, 1, dtype=torch.long, device=rows.device)
        fused = state.fuse_with_images(text_hidden, text_mask, image_index, extra_images, output_positions=cls)
        logits = model.itm_logits(fused).float()
        labels = torch.zeros(3 * b, dtype=torch.long, device=logits.device)
        labels[:b] = 1
        # rows without a negative are weighted out (no boolean selection: it would wait for the device)
        keep = torch.cat([torch.ones(b, device=valid.device), valid.float(), valid.float()])
        loss = (F.cross_entropy(logits, labels, reduction="none") * keep).sum() / keep.sum()
        return ObjectiveOutput(loss, {"itm_acc": accuracy(logits, labels, keep)},
                               {"neg_text": neg_text, "neg_image": neg_image, "valid": valid})


def pad_tokens(hidden: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (B, L, D) token states and their (B, L) mask to ``length`` tokens (masked-out zeros)."""
    extra = length - hidden.shape[1]
    if extra <= 0:
        return hidden, mask
    return F.pad(hidden, (0, 0, 0, extra)), F.pad(mask, (0, extra))
