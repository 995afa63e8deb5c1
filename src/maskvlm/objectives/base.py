"""What every objective shares: its output type and the per-step state that caches the
encodings several objectives use (unmasked image/text, ITC features, masked passes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..data.formats import Batch
from ..models.model import MaskVLM
from ..models.text import TextOutput
from ..models.vit import VisionOutput
from ..train.distributed import all_gather_no_grad, all_gather_with_grad


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. sampled negatives, for tests


class ContrastivePool:
    """The ITC features of every micro-batch of one accumulated optimizer step, computed without
    gradient before the step (``train.accumulate_itc``), so that each micro-batch's ITC loss can be
    the loss of the whole accumulated batch with that micro-batch's features live.

    Summed over the micro-batches, the gradients are those of the loss over the whole batch: each
    micro-batch contributes the gradient through its own features, from every row and column of
    the loss. Under torchrun the live features are gathered from every rank with gradient, as in
    the unaccumulated step (all ranks run the same micro-batch index together)."""

    def __init__(self, image_feats: list[torch.Tensor], text_feats: list[torch.Tensor], ids: list[torch.Tensor]):
        self.local = list(zip(image_feats, text_feats, ids))  # per micro-batch, this rank's
        self.gathered = [(all_gather_no_grad(i), all_gather_no_grad(t), all_gather_no_grad(d))
                         for i, t, d in self.local]  # per micro-batch, every rank's
        self.micro = 0  # the micro-batch whose features are live

    @property
    def steps(self) -> int:
        return len(self.local)

    def features(self, image_feat: torch.Tensor, text_feat: torch.Tensor):
        """(rows: image features, text features, image ids of this rank's whole accumulated batch;
        columns: the same for every rank's), with the live micro-batch's features in place."""
        m = self.micro
        live = (all_gather_with_grad(image_feat), all_gather_with_grad(text_feat))
        rows = [(image_feat, text_feat, d) if k == m else (i, t, d) for k, (i, t, d) in enumerate(self.local)]
        cols = [(*live, d) if k == m else (i, t, d) for k, (i, t, d) in enumerate(self.gathered)]
        return tuple(torch.cat(part) for part in zip(*rows)) + tuple(torch.cat(part) for part in zip(*cols))

    def share(self, scalar: torch.Tensor) -> torch.Tensor:
        """``scalar`` (the temperature, a bias) with 1/steps of its gradient: every micro-batch's loss
        depends on it, and the gradients of the micro-batches add up."""
        return scalar.detach() + (scalar - scalar.detach()) / self.steps


class StepState:
    """Encodings of one batch, each computed at most once and shared by the objectives."""

    def __init__(self, model: MaskVLM, batch: Batch, visible_only: bool = True, joint: bool = False,
                 teacher: Optional[MaskVLM] = None, alpha: float = 0.0, pool: Optional[ContrastivePool] = None,
                 one_image_pass: bool = False):
        self.model, self.batch = model, batch
        self.one_image_pass = one_image_pass  # ``image`` is the masked image's encoding (masking.one_image_pass)
        self.visible_only, self.joint = visible_only, joint
        self.teacher = teacher  # EMA copy of the model (recipes with momentum encoders), run without gradients
        self.alpha = alpha  # momentum distillation weight at this step
        self.pool = pool  # train.accumulate_itc: the ITC features of the whole accumulated batch
        self._cache: dict[str, object] = {}

    def _get(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def image(self) -> VisionOutput:
        """The image encoding ITC, ITM and image-conditioned MLM use: the whole image, or with
        ``one_image_pass`` the masked one (no second image-encoder pass)."""
        if self.one_image_pass:
            return self.masked_image
        return self._get("image", lambda: self.model.encode_image(self.batch.images))

    @property
    def text(self) -> TextOutput:
        return self._get("text", lambda: self.model.encode_text(self.batch.input_ids, self.batch.attention_mask))

    @property
    def image_features(self) -> torch.Tensor:
        return self._get("image_features", lambda: self.model.image_features(self.image))

    @property
    def text_features(self) -> torch.Tensor:
        return self._get("text_features", lambda: self.model.text_features(self.text))

    def gathered_features(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features, image ids) of the whole global batch (all ranks)."""
        return self._get("gathered", lambda: (all_gather_with_grad(self.image_features),
                                              all_gather_with_grad(self.text_features),
                                              all_gather_no_grad(self.batch.image_ids)))

    @property
    def masked_image(self) -> VisionOutput:
        """Encoding of the block-masked image: visible patches only, or mask tokens in place."""
        def encode():
            mask = self.batch.image_mask
            if mask is None:
                raise ValueError("this objective needs image masks: the collator drew none (masking.image_ratio=0?)")
            if self.visible_only:
                return self.model.encode_image(self.batch.images, visible_idx=self.batch.index("visible_patches"))
            return self.model.encode_image(self.batch.images, masked=mask)
        return self._get("masked_image", encode)

    def at_masked_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) image tokens ([CLS] first) -> (K, D): the rows at the masked patches, in the
        order of ``tokens[:, 1:][image_mask]``, gathered without a host-device synchronisation."""
        flat = self.batch.index("masked_patches")  # b * N + n
        n = tokens.shape[1] - 1
        return tokens.reshape(-1, tokens.shape[-1]).index_select(0, flat + flat // n + 1)  # b * (N + 1) + n + 1

    def at_mlm_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (M, ...): the rows at the masked caption tokens, in row-major order."""
        return tokens.reshape(-1, *tokens.shape[2:]).index_select(0, self.batch.index("mlm_positions"))

    @property
    def masked_text(self) -> TextOutput:
        def encode():
            if self.batch.mlm_input_ids is None:
                raise ValueError("this objective needs masked text: the collator drew none (masking.text_ratio=0?)")
            return self.model.encode_text(self.batch.mlm_input_ids, self.batch.attention_mask)
        return self._get("masked_text", encode)

    @property
    def image_kv(self) -> Optional[list[torch.Tensor]]:
        """The fusion layers' keys and values of the unmasked image, projected once per step and
        shared by ITM's pairs and image-conditioned MLM (None for a model without per-image keys, or
        with sharded fusion layers: each fusion call then projects its own images)."""
        if not hasattr(self.model, "image_keys"):
            return None
        return self._get("image_kv", lambda: self.model.image_keys(self.image.hidden))

    def fuse_with_images(self, text_hidden: torch.Tensor, text_mask: torch.Tensor,
                         image_index: Optional[torch.Tensor], extra_images: Optional[torch.Tensor] = None,
                         output_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Text rows (Bt, L, D) attending to unmasked images: ``image_index`` (Bt,) names each text
        row's image, a row of this batch (0..B-1) or of ``extra_images`` (B onwards); None pairs row i
        with image i. Each image's keys and values are projected once, however many rows use it.
        ``output_positions`` (Bt, Lq): return only those tokens (Bt, Lq, D), e.g. [CLS] for ITM."""
        kv, images = self.image_kv, self.image.hidden
        if kv is None:
            if extra_images is not None:
                images = torch.cat([images, extra_images])
            return self.model.fuse(text_hidden, text_mask, images, image_index=image_index,
                                   output_positions=output_positions)
        if extra_images is not None:  # kv is not None: image_keys gives keys for these too
            kv = [torch.cat([a, b]) for a, b in zip(kv, self.model.image_keys(extra_images))]
        return self.model.fuse(text_hidden, text_mask, None, image_index=image_index, image_kv=kv,
                               output_positions=output_positions)

    @property
    def fused_masked_text(self) -> torch.Tensor:
        """The masked caption fused with the image context (B, L, D_text)."""
        if self._single_pass:
            return self._joint_masked[0]
        text = self.masked_text
        if self.joint:
            return self._get("fused_masked_text", lambda: self.model.fuse_text(text, self.image_context))
        return self._get("fused_masked_text", lambda: self.fuse_with_images(text.hidden, text.attention_mask, None))

    @property
    def fused_masked_image(self) -> torch.Tensor:
        """The masked image fused with the text context (B, 1 + N, D_image), mask tokens at masked patches."""
        if self._single_pass:
            return self._joint_masked[1]
        return self._get("fused_masked_image", lambda: self.model.fuse_image(self.masked_image, self.text_context))

    @property
    def fused_mlm_tokens(self) -> torch.Tensor:
        """(M, D_text): the fused masked caption at its masked tokens, in the order of
        :meth:`at_mlm_positions`. The text cross-modality encoder's last layer computes only these
        tokens (each row padded to the longest row's count); the others are not used."""
        def compute():
            if isinstance(self.model, MaskVLM) and not self.joint and "fused_masked_text" not in self._cache:
                text = self.masked_text  # first: its error names the cause when the collator masked no text
                positions = self.batch.index("mlm_query_positions")
                if positions.shape[1]:
                    out = self.fuse_with_images(text.hidden, text.attention_mask, None, output_positions=positions)
                    return out.reshape(-1, out.shape[-1]).index_select(0, self.batch.index("mlm_query_slots"))
            return self.at_mlm_positions(self.fused_masked_text)
        return self._get("fused_mlm_tokens", compute)

    @property
    def fused_masked_patches(self) -> torch.Tensor:
        """(K, D_image): the fused masked image at its masked patches, in the order of
        :meth:`at_masked_patches`. When every sample masks the same number of patches, the image
        cross-modality encoder's last block computes these rows alone (the others are not used)."""
        def compute():
            if isinstance(self.model, MaskVLM) and not self._single_pass and "fused_masked_image" not in self._cache:
                try:
                    positions = self.batch.index("masked_positions")
                except ValueError:  # samples mask different numbers of patches: the full output below
                    pass
                else:
                    out = self.model.fuse_image(self.masked_image, self.text_context, output_positions=positions + 1)
                    return out.reshape(-1, out.shape[-1])
            return self.at_masked_patches(self.fused_masked_image)
        return self._get("fused_masked_patches", compute)

    @property
    def _single_pass(self) -> bool:
        """A single-stream model in joint mode fuses both masked modalities in one pass."""
        return self.joint and hasattr(self.model, "joint")

    @property
    def _joint_masked(self) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.masked_text
        return self._get("joint_masked", lambda: self.model.joint(text.hidden, text.attention_mask,
                                                                  self.masked_image.hidden))

    # --- the EMA teacher (no gradients) ------------------------------------------------------
    def _teacher(self, key: str, fn):
        if self.teacher is None:
            raise ValueError("this objective needs the EMA teacher, but the task has none")

        def run():
            with torch.no_grad():
                return fn(self.teacher)
        return self._get(f"teacher_{key}", run)

    @property
    def teacher_image(self) -> VisionOutput:
        return self._teacher("image", lambda t: t.encode_image(self.batch.images))

    @property
    def teacher_text(self) -> TextOutput:
        return self._teacher("text", lambda t: t.encode_text(self.batch.input_ids, self.batch.attention_mask))

    @property
    def teacher_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher (image, text) ITC features of the unmasked pair."""
        return self._teacher("features", lambda t: (t.image_features(self.teacher_image),
                                                    t.text_features(self.teacher_text)))

    @property
    def teacher_fused_text(self) -> torch.Tensor:
        return self._teacher("fused_text", lambda t: t.fuse_text(self.teacher_text, self.teacher_image.hidden))

    @property
    def teacher_fused_image(self) -> torch.Tensor:
        return self._teacher("fused_image", lambda t: t.fuse_image(self.teacher_image, self.teacher_text))

    @property
    def image_context(self) -> torch.Tensor:
        """Image tokens the masked text attends to: unmasked image, or the masked one in joint mode."""
        return self.masked_image.hidden if self.joint else self.image.hidden

    @property
    def text_context(self) -> TextOutput:
        """Text the masked image attends to: unmasked text, or the masked one in joint mode."""
        return self.masked_text if self.joint else self.text


def accuracy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Share of rows whose argmax is the label (``weight``: a 0/1 weight per row), as a detached
    tensor: reading it back is left to whoever logs it."""
    if labels.numel() == 0:
        return torch.zeros((), device=logits.device)
    hit = (logits.argmax(-1) == labels).float()
    if weight is None:
        return hit.mean().detach()
    return ((hit * weight).sum() / weight.sum()).detach()
