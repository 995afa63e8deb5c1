"""The pre-training task: the model plus the recipe's objectives. One call runs every
objective whose weight is non-zero on a batch and returns the weighted loss and metrics."""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..data.formats import Batch
from ..models.model import MaskVLM
from ..objectives import ITC, ITM, MIM, MLM, StepState
from ..objectives.base import ContrastivePool
from ..objectives.itc import MomentumITC, SigmoidITC
from ..objectives.latent import MRM, FeatureMIM
from ..objectives.recon import RECON
from ..objectives.prototypes import PrototypeSpace, ProtoAgreement, ProtoMIM
from ..masking import text_guided_mask
from ..train.ema import EMATeacher


def build_objectives(config: Config) -> dict[str, nn.Module]:
    loss, mo, m = config.loss, config.momentum, config.model
    momentum_itc = mo.queue_size > 0 or mo.alpha > 0
    available = {
        "itc": lambda: (MomentumITC(mo.queue_size, m.embed_dim) if momentum_itc else
                        SigmoidITC() if m.itc_loss == "sigmoid" else ITC()),
        "itm": lambda: ITM(global_negatives=loss.itm_negatives == "global"),
        "mlm": lambda: MLM(distill=mo.alpha > 0 and mo.distill_mlm),
        "mim": lambda: MIM(norm_pix=loss.norm_pix),
        "mrm": lambda: MRM(m.text_width, m.vision_width),
        "mim_feat": lambda: FeatureMIM(m.vision_width),
        "recon": lambda: RECON(config.data.mean, config.data.std, loss.recon_region),
    }
    objectives = {name: make() for name, make in available.items() if getattr(loss, name) > 0}
    if loss.proto > 0 or loss.proto_mim > 0:
        pc = config.prototypes
        space = PrototypeSpace(pc.num, m.embed_dim, pc.assign, pc.sinkhorn_eps, pc.sinkhorn_iters, pc.teacher_temp,
                               pc.center_momentum)  # one space shared by both objectives
        if loss.proto > 0:
            objectives["proto"] = ProtoAgreement(space, pc.student_temp)
        if loss.proto_mim > 0:
            objectives["proto_mim"] = ProtoMIM(space, pc.student_temp, m.vision_width, m.embed_dim)
    return objectives


@torch.no_grad()
def patch_text_relevance(state: StepState) -> torch.Tensor:
    """(B, N) cosine between the teacher's patch features (in the ITC space) and its caption feature."""
    teacher = state.teacher
    patches = F.normalize(teacher.itc_head.vision_proj(state.teacher_image.hidden[:, 1:]).float(), dim=-1)
    return torch.einsum("bnd,bd->bn", patches, state.teacher_features[1])


def _text_objective(config: Config) -> bool:
    return config.loss.mlm > 0 or config.loss.mrm > 0


def _image_objective(config: Config) -> bool:
    lo = config.loss
    recon_masked = lo.recon > 0 and lo.recon_region == "masked"
    return lo.mim > 0 or lo.mim_feat > 0 or lo.mrm > 0 or lo.proto_mim > 0 or recon_masked


def needs_text_mask(config: Config) -> bool:
    """Whether the collator masks captions: for a text objective, and in joint mode also for an image
    objective alone (the masked image then attends to the masked caption)."""
    joint = config.masking.mode == "joint"
    return _text_objective(config) or (joint and _image_objective(config))


def needs_image_mask(config: Config) -> bool:
    """Whether the collator masks images: for an image objective, and in joint mode also for a text
    objective alone (the masked caption then attends to the masked image); always with
    ``masking.one_image_pass`` (every objective then sees the masked image)."""
    joint = config.masking.mode == "joint"
    return _image_objective(config) or (joint and _text_objective(config)) or config.masking.one_image_pass


def optimizer_steps_per_epoch(config: Config, num_samples: int) -> int:
    """Optimizer updates in one pass over ``num_samples`` (the default ramp of the momentum-
    distillation weight, ``momentum.alpha_warmup_steps=-1``)."""
    return num_samples // (config.train.batch_size * config.train.grad_accum)


class PretrainTask(nn.Module):
    """The model, its EMA teacher when the recipe needs one, and the recipe's objectives.
    ``steps_per_epoch`` sets the default ramp of the momentum-distillation weight."""

    def __init__(self, model: MaskVLM, config: Config, steps_per_epoch: int = 0):
        super().__init__()
        self.model = model
        mo = config.momentum
        self.teacher = EMATeacher(model, mo.decay) if config.needs_teacher() else None
        self.objectives = nn.ModuleDict(build_objectives(config))
        self.weights = {name: float(getattr(config.loss, name)) for name in self.objectives}
        self.visible_only = config.masking.visible_only
        self.one_image_pass = config.masking.one_image_pass
        self.joint = config.masking.mode == "joint"
        self.text_guided = config.masking.image_policy == "text_guided"
        self.guided_temp = config.masking.guided_temp
        self.max_alpha = mo.alpha
        self.alpha_warmup = steps_per_epoch if mo.alpha_warmup_steps < 0 else mo.alpha_warmup_steps
        self.pool: Optional[ContrastivePool] = None  # set by the trainer around an accumulated step
        # optimizer updates done: saved (only where the ramp needs it) so a resume continues the ramp exactly
        self.register_buffer("updates", torch.zeros((), dtype=torch.long), persistent=self.max_alpha > 0)

    def alpha(self) -> float:
        """Momentum-distillation weight: ramps linearly from 0 to ``momentum.alpha`` over the warm-up."""
        if self.max_alpha == 0 or self.alpha_warmup <= 0:
            return self.max_alpha
        return self.max_alpha * min(1.0, (int(self.updates) + 1) / self.alpha_warmup)

    @torch.no_grad()
    def contrastive_pool(self, batches: list[Batch]) -> ContrastivePool:
        """The ITC features of every micro-batch of an accumulated step (``train.accumulate_itc``),
        from the same passes the step makes (unmasked, or the masked image's with
        ``masking.one_image_pass``), without gradient. Set it as ``self.pool`` and its
        ``micro`` to the index of the micro-batch being run."""
        states = [self._state(b) for b in batches]
        return ContrastivePool([s.image_features for s in states], [s.text_features for s in states],
                               [b.image_ids for b in batches])

    def _state(self, batch: Batch) -> StepState:
        teacher = self.teacher.model if self.teacher is not None else None
        return StepState(self.model, batch, self.visible_only, self.joint, teacher, self.alpha(), self.pool,
                         one_image_pass=self.one_image_pass)

    def forward(self, batch: Batch, pool_of: Optional[list[Batch]] = None):
        """(total loss, metrics) of ``batch``; with ``pool_of`` (micro-batches) their
        :meth:`contrastive_pool` instead, so that it too runs as a forward of the root module (FSDP
        must see the root's forward first and gathers the root's parameters in it)."""
        if pool_of is not None:
            return self.contrastive_pool(pool_of)
        state = self._state(batch)
        if self.text_guided and batch.image_mask is not None:
            # same number of masked patches as the collator drew, now chosen by relevance to the caption
            ratio = float(batch.image_mask[0].float().mean())
            batch.image_mask = text_guided_mask(patch_text_relevance(state), ratio, self.guided_temp)
        total = torch.zeros((), device=batch.images.device)
        reported = torch.zeros((), device=batch.images.device)  # the losses' values (total: what to backpropagate)
        metrics: dict[str, torch.Tensor] = {}
        for name, objective in self.objectives.items():
            out = objective(state)
            total = total + self.weights[name] * out.loss
            metrics[f"{name}_loss"] = out.loss.detach()
            metrics.update(out.metrics)  # may state the loss's value (accumulated ITC backpropagates a multiple)
            reported = reported + self.weights[name] * metrics[f"{name}_loss"]
        metrics["loss"] = reported
        return total, metrics

    @torch.no_grad()
    def after_step(self) -> None:
        """Called by the trainer after every optimizer update: moves the EMA teacher."""
        self.updates += 1
        if self.teacher is not None:
            self.teacher.update(self.model)


def prepare_data_paths(config: Config, progress: bool = True) -> None:
    """Fill data.train/val/test with the built-in synthetic scenes (generated if missing)
    when no training annotation file or shards are given."""
    from ..data.synthetic import ensure_synthetic

    d = config.data
    if d.train is not None or d.shards:  # shards: val/test only where given
        return
    s = d.synthetic
    root = ensure_synthetic(s.dir, s.num_train, s.num_val, s.num_test, s.image_size, s.seed, progress=progress)
    d.train, d.val, d.test = str(root / "train.json"), str(root / "val.json"), str(root / "test.json")
    d.image_root = None


def eval_transform(config: Config):
    from ..data.transforms import ImageTransform
    return ImageTransform(config.model.image_size, config.data.mean, config.data.std, train=False,
                          reduced_decode=config.data.reduced_decode)


def make_retrieval_eval(model: MaskVLM, tokenizer, config: Config, annotation_path: str, progress: bool = False,
                        dataset=None):
    """A zero-argument function returning zero-shot retrieval metrics on ``annotation_path`` (``dataset``:
    that file already read). Under torchrun every rank calls it together: the ITM re-ranking is split
    over the ranks."""
    from ..data.formats import RetrievalDataset
    from ..runtime import resolve_device
    from .retrieval import choose_score, evaluate_retrieval, log_once, protocol_k

    if dataset is None:
        dataset = RetrievalDataset(annotation_path, config.data.image_root, eval_transform(config))
    device = resolve_device(config.train.device)
    k = protocol_k(annotation_path, config.eval.k, config.eval.k_auto)
    score = choose_score(config)
    if config.eval.compile and k > 0 and score != "itc":
        log_once(f"retrieval re-ranking through torch.compile ({config.train.compile_backend}, eval.compile)",
                 logging.INFO)

    def run() -> dict:
        return evaluate_retrieval(model, tokenizer, dataset, config.data.max_text_len, k,
                                  score, config.eval.batch_size, device, config.train.precision,
                                  progress=progress, split_over_ranks=True,
                                  compile_backend=config.train.compile_backend if config.eval.compile else None)
    return run
