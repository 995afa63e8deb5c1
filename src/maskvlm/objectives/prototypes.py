"""SemMIM's prototype space and its two objectives.

* ``PrototypeSpace``: K learnable unit vectors in the ITC embedding space (``model.embed_dim``),
  and the teacher-side assignment of features to prototypes: Sinkhorn-Knopp equipartition
  (default) or DINO-style centering + sharpening (``prototypes.assign``).
* ``ProtoAgreement``: swapped prediction between two augmented views of each image: the
  student's global image feature of one view predicts the teacher's assignment of the other.
* ``ProtoMIM``: the student's fused outputs at masked patches predict the prototype
  assignment of the teacher's text-fused patch features of the unmasked image (cross-entropy).

Choices the paper leaves open, and what we chose (docs/recipes.md explains them):
the prototypes live in the ITC space, so the global feature is the ITC image feature and the
patch features go through the same ``vision_proj``; the student's masked-patch predictor is a
two-layer MLP into that space; the prototypes are learned through the student side only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..train.distributed import is_distributed
from .base import ObjectiveOutput, StepState
from .latent import projector


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Soft assignments (B, K), rows summing to 1, of B samples to K prototypes whose total use is
    pushed towards equal (columns sum to B/K): Sinkhorn-Knopp on ``exp(scores / eps)``. In a
    distributed run the column sums cover the global batch."""
    q = scores.float() / eps
    top = q.max()
    if is_distributed():  # one shift for every rank, so the global normalisation stays consistent
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp(q - top).t()  # (K, B)
    n = torch.tensor(float(q.shape[1]), device=q.device)
    n = _all_reduce(n)
    k = q.shape[0]
    q /= _all_reduce(q.sum())
    for _ in range(iters):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(1e-12)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-12)
        q /= n
    return (q * n).t()


class PrototypeSpace(nn.Module):
    def __init__(self, num: int, dim: int, assign: str = "sinkhorn", sinkhorn_eps: float = 0.05,
                 sinkhorn_iters: int = 3, teacher_temp: float = 0.04, center_momentum: float = 0.9):
        super().__init__()
        if assign not in ("sinkhorn", "centering"):
            raise ValueError(f"prototypes.assign={assign!r}: expected 'sinkhorn' or 'centering'")
        self.weight = nn.Parameter(F.normalize(torch.randn(num, dim), dim=-1))
        self.assign_mode = assign
        self.eps, self.iters = sinkhorn_eps, sinkhorn_iters
        self.teacher_temp, self.center_momentum = teacher_temp, center_momentum

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (N, K) of unit-length ``features`` to the prototypes."""
        return features.float() @ F.normalize(self.weight.float(), dim=-1).t()

    @torch.no_grad()
    def assign(self, teacher_features: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Target distributions (N, K) of the teacher's features. ``center`` (K,) is the running
        mean of teacher scores used (and updated in place) by the ``centering`` mode."""
        scores = self.scores(teacher_features).detach()
        if self.assign_mode == "sinkhorn":
            return sinkhorn(scores, self.eps, self.iters)
        targets = F.softmax((scores - center) / self.teacher_temp, dim=-1)
        batch_mean = _all_reduce(scores.sum(dim=0)) / _all_reduce(torch.tensor(float(len(scores)),
                                                                                device=scores.device))
        center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)
        return targets


def swapped_cross_entropy(targets: torch.Tensor, student_scores: torch.Tensor, temp: float) -> torch.Tensor:
    return -(targets * F.log_softmax(student_scores / temp, dim=-1)).sum(dim=-1).mean()


def usage_entropy(targets: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the mean assignment: log K when every prototype is used equally, 0 at collapse."""
    p = targets.mean(dim=0).clamp_min(1e-12)
    return -(p * p.log()).sum().detach()


class ProtoAgreement(nn.Module):
    def __init__(self, space: PrototypeSpace, student_temp: float):
        super().__init__()
        self.space = space
        self.student_temp = student_temp
        self.register_buffer("center", torch.zeros(space.weight.shape[0]))

    def forward(self, state: StepState) -> ObjectiveOutput:
        images2 = state.batch.images2
        if images2 is None:
            raise ValueError("the prototype agreement objective needs two views per image (data two_views)")
        model, teacher = state.model, state.teacher
        s1 = state.image_features
        s2 = model.image_features(model.encode_image(images2))
        t1 = state.teacher_features[0]
        with torch.no_grad():
            t2 = teacher.image_features(teacher.encode_image(images2))
            targets = self.space.assign(torch.cat([t1, t2]), self.center)
        q1, q2 = targets.chunk(2)
        loss = (swapped_cross_entropy(q2, self.space.scores(s1), self.student_temp)
                + swapped_cross_entropy(q1, self.space.scores(s2), self.student_temp)) / 2
        return ObjectiveOutput(loss, {"proto_usage": usage_entropy(targets)})


class ProtoMIM(nn.Module):
    def __init__(self, space: PrototypeSpace, student_temp: float, vision_width: int, embed_dim: int):
        super().__init__()
        self.space = space
        self.student_temp = student_temp
        self.predictor = projector(vision_width, embed_dim)
        self.register_buffer("center", torch.zeros(space.weight.shape[0]))

    def forward(self, state: StepState) -> ObjectiveOutput:
        mask = state.batch.image_mask
        if mask is None:
            raise ValueError("prototype MIM needs image masks (masking.image_ratio is 0)")
        teacher = state.teacher
        with torch.no_grad():
            patches = state.at_masked_patches(state.teacher_fused_image)  # teacher: unmasked image, text fused in
            targets = self.space.assign(F.normalize(teacher.itc_head.vision_proj(patches).float(), dim=-1),
                                        self.center)
        pred = F.normalize(self.predictor(state.fused_masked_patches).float(), dim=-1)
        loss = swapped_cross_entropy(targets, self.space.scores(pred), self.student_temp)
        hit = (pred.detach() @ self.space.weight.detach().float().t()).argmax(-1) == targets.argmax(-1)
        return ObjectiveOutput(loss, {"proto_mim_acc": hit.float().mean(), "proto_mim_usage": usage_entropy(targets)})
