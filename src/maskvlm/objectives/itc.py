"""Image-text contrastive loss (InfoNCE, both directions) with a learnable temperature, its
momentum-distilled form (ALBEF) and the sigmoid form (SigLIP). Captions that share an image id
are all positives (multi-positive targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..train.distributed import all_gather_no_grad
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


def _accumulated(state: StepState, loss_fn, scalars: list[torch.Tensor]):
    """(loss to backpropagate, the whole accumulated batch's loss, accuracy) with ``train.accumulate_itc``.
    ``loss_fn(rows_img, rows_txt, rows_ids, cols_img, cols_txt, cols_ids, *scalars)``. The trainer
    divides every micro-batch's loss by the number of micro-batches; this loss already is the whole
    batch's, so it is multiplied back."""
    pool = state.pool
    loss, acc = loss_fn(*pool.features(state.image_features, state.text_features),
                        *(pool.share(s) for s in scalars))
    return loss * pool.steps, loss.detach(), acc


class ITC(nn.Module):
    def forward(self, state: StepState) -> ObjectiveOutput:
        temp = state.model.itc_head.temperature()
        if state.pool is not None:
            loss, value, acc = _accumulated(
                state, lambda ri, rt, rd, ci, ct, cd, tp: itc_loss(ri, rt, rd, tp, ci, ct, cd), [temp])
            return ObjectiveOutput(loss, {"itc_loss": value, "itc_acc": acc, "temp": temp.detach()})
        all_img, all_txt, all_ids = state.gathered_features()
        loss, acc = itc_loss(state.image_features, state.text_features, state.batch.image_ids, temp,
                             all_img, all_txt, all_ids)
        return ObjectiveOutput(loss, {"itc_acc": acc, "temp": temp.detach()})


def sigmoid_itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor, temp: torch.Tensor,
                     bias: torch.Tensor, all_text_feat: torch.Tensor | None = None,
                     all_image_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid image-text loss (SigLIP): every (image, caption) pair is its own binary problem,
    logit ``image . text / temp + bias``, label 1 when the caption belongs to the image (same image
    id) and 0 otherwise. Summed over the captions and averaged over this rank's images, against the
    captions of the whole pool (all ranks; defaults to the local batch): every pair of the global
    batch counts once, and DDP's gradient averaging gives the gradient of the global loss.
    Returns (loss, image-to-text accuracy)."""
    all_text_feat = text_feat if all_text_feat is None else all_text_feat
    all_image_ids = image_ids if all_image_ids is None else all_image_ids
    positives = (image_ids[:, None] == all_image_ids[None, :]).float()
    logits = image_feat @ all_text_feat.t() / temp + bias
    loss = -F.logsigmoid((2 * positives - 1) * logits).sum(dim=1).mean()
    hit = positives.gather(1, logits.argmax(dim=1, keepdim=True)).mean()
    return loss, hit.detach()


class SigmoidITC(nn.Module):
    """ITC with the sigmoid loss (``model.itc_loss=sigmoid``); the head holds the logit bias."""

    def forward(self, state: StepState) -> ObjectiveOutput:
        head = state.model.itc_head
        if head.bias is None:
            raise ValueError("the sigmoid ITC loss needs the ITC head's logit bias: build the model with "
                             "model.itc_loss=sigmoid")
        temp = head.temperature()
        metrics = {"temp": temp.detach(), "itc_bias": head.bias.detach()}
        if state.pool is not None:
            loss, value, acc = _accumulated(
                state, lambda ri, rt, rd, ci, ct, cd, tp, b: sigmoid_itc_loss(ri, rt, rd, tp, b, ct, cd),
                [temp, head.bias])
            return ObjectiveOutput(loss, {"itc_loss": value, "itc_acc": acc, **metrics})
        _, all_txt, all_ids = state.gathered_features()
        loss, acc = sigmoid_itc_loss(state.image_features, state.text_features, state.batch.image_ids, temp,
                                     head.bias, all_txt, all_ids)
        return ObjectiveOutput(loss, {"itc_acc": acc, **metrics})


def soft_targets(positives: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Ground-truth distribution over candidates (uniform over positives), mixed with the teacher's
    softmax with weight ``alpha`` (momentum distillation)."""
    targets = positives / positives.sum(dim=1, keepdim=True)
    if teacher_logits is not None and alpha > 0:
        targets = alpha * F.softmax(teacher_logits, dim=1) + (1 - alpha) * targets
    return targets


class MomentumITC(nn.Module):
    """ITC against the EMA teacher's features: the candidates are the teacher features of the
    global batch plus a queue of earlier teacher features, and the targets are distilled from
    the teacher's own similarities with weight ``alpha`` (ALBEF)."""

    def __init__(self, queue_size: int, dim: int):
        super().__init__()
        from .queue import FeatureQueue
        self.queue = FeatureQueue(queue_size, dim) if queue_size > 0 else None

    def forward(self, state: StepState) -> ObjectiveOutput:
        temp = state.model.itc_head.temperature()
        image_feat, text_feat, ids = state.image_features, state.text_features, state.batch.image_ids
        with torch.no_grad():
            t_image, t_text = state.teacher_features
            all_image, all_text, all_ids = (all_gather_no_grad(t_image), all_gather_no_grad(t_text),
                                            all_gather_no_grad(ids))
            n_batch = all_image.shape[0]
            if self.queue is not None:
                q_image, q_text, q_ids = self.queue.contents()
                all_image, all_text = torch.cat([all_image, q_image]), torch.cat([all_text, q_text])
                all_ids = torch.cat([all_ids, q_ids])
            positives = (ids[:, None] == all_ids[None, :]).float()
            targets_i2t = soft_targets(positives, t_image @ all_text.t() / temp, state.alpha)
            targets_t2i = soft_targets(positives, t_text @ all_image.t() / temp, state.alpha)
        logits_i2t = image_feat @ all_text.t() / temp
        logits_t2i = text_feat @ all_image.t() / temp
        loss_i2t = -(F.log_softmax(logits_i2t, dim=1) * targets_i2t).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(logits_t2i, dim=1) * targets_t2i).sum(dim=1).mean()
        hit = positives.gather(1, logits_i2t.argmax(dim=1, keepdim=True)).mean().detach()
        if self.queue is not None and state.model.training:
            self.queue.enqueue(all_image[:n_batch], all_text[:n_batch], all_ids[:n_batch])
        return ObjectiveOutput((loss_i2t + loss_t2i) / 2, {"itc_acc": hit, "temp": temp.detach(),
                                                          "alpha": torch.tensor(state.alpha)})
