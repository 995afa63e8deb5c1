"""Typed configuration: dataclasses filled from a size preset, a recipe YAML, an optional
user YAML and ``a.b=c`` command-line overrides, in that order. Unknown keys are errors."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


@dataclass
class ModelConfig:
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    vision_mlp_ratio: float = 4.0
    text_width: int = 192
    text_layers: int = 2  # text encoder (unimodal) layers
    cross_layers: int = 2  # text cross-modality encoder layers (with cross-attention to image)
    text_heads: int = 3
    text_intermediate: int = 768
    max_position: int = 64
    type_vocab_size: int = 2
    vocab_size: int = 0  # 0: taken from the tokenizer
    image_cross_layers: int = 3
    image_cross_heads: int = 3
    embed_dim: int = 128  # ITC projection size
    temp: float = 0.07
    # "softmax": InfoNCE over the batch (ALBEF, CLIP); "sigmoid": an independent binary loss per
    # image-text pair with a learnable logit bias (SigLIP), which does not normalise over the batch
    itc_loss: str = "softmax"
    itc_bias_init: float = -10.0  # "sigmoid": starting logit bias (SigLIP's -10: most pairs are negatives)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    attention: str = "auto"  # "sdpa", "math", or "auto": SDPA except bf16 on CPU (see benchmarks/RESULTS.md)
    arch: str = "two_stream"  # "two_stream" (ViT + BERT + cross-modality encoders) or "single_stream" (MLIM)
    single_layers: int = 6  # single_stream: layers of the joint transformer (width text_width, text_heads)
    text_init: Optional[str] = None  # a local Hugging Face BERT/RoBERTa folder: text weights + tokenizer
    image_init: Optional[str] = None  # ViT/DeiT weights: a Hugging Face folder or a timm state-dict file


@dataclass
class MaskingConfig:
    mode: str = "separate"  # "separate": one modality masked per pass; "joint": both at once
    text_ratio: float = 0.3
    image_ratio: float = 0.6
    image_block: int = 2  # block side in patches (2x2 patches of 16 px = 32x32 px at ViT-B/16)
    visible_only: bool = True  # masked image pass encodes only visible patches (MAE-style)
    # ITC, ITM and image-conditioned MLM use the masked image's encoding instead of a second pass over
    # the whole image: one image-encoder pass per step (FLIP-style). Evaluation still sees whole images.
    one_image_pass: bool = False
    image_policy: str = "block"  # "block", "random" (uniform patches) or "text_guided" (needs a teacher)
    guided_temp: float = 0.5  # text-guided: Gumbel top-k over relevance / temp (higher: closer to random)
    modality_aware: bool = False  # per sample one of: heavy image / text intact, heavy text / image intact, light both
    modality_probs: list = field(default_factory=lambda: [1 / 3, 1 / 3, 1 / 3])  # of those three modes
    heavy_ratio: float = 0.8
    light_ratio: float = 0.15


@dataclass
class LossConfig:
    itc: float = 1.0
    itm: float = 1.0
    # under torchrun: ITM hard negatives mined from the whole gathered batch ("global") or this rank's ("local")
    itm_negatives: str = "global"
    mlm: float = 1.0
    mim: float = 1.0
    norm_pix: bool = False  # per-patch normalised pixel targets for MIM
    mrm: float = 0.0  # MAMO: fused latents of the masked pair regress the teacher's (unmasked pair)
    mim_feat: float = 0.0  # MAMO: masked patches regress the teacher's image-encoder patch features (L1)
    proto: float = 0.0  # SemMIM: swapped prototype prediction between two augmented views
    proto_mim: float = 0.0  # SemMIM: masked patches predict the teacher's text-fused prototype assignments
    recon: float = 0.0  # MLIM: sum of squared pixel errors of the deconvolution decoder's output
    recon_region: str = "masked"  # "masked": only pixels of masked regions; "all": the whole image


@dataclass
class MomentumConfig:
    """The EMA (momentum) teacher, created when a recipe's objectives need one."""
    decay: float = 0.995  # teacher <- decay * teacher + (1 - decay) * student after every update
    queue_size: int = 0  # ITC feature queue of teacher features (ALBEF: 65536); 0 = in-batch only
    alpha: float = 0.0  # momentum distillation weight of the teacher's soft targets (ALBEF: 0.4)
    alpha_warmup_steps: int = -1  # alpha ramps up linearly over these steps (-1: the first epoch)
    distill_mlm: bool = True  # with alpha > 0, MLM also learns from the teacher's soft predictions


@dataclass
class PrototypeConfig:
    """SemMIM's prototype space (see docs/recipes.md for the choices the paper leaves open)."""
    num: int = 1024  # K learnable prototypes (unit vectors of model.embed_dim)
    student_temp: float = 0.1
    assign: str = "sinkhorn"  # teacher assignments: "sinkhorn" (equipartition) or "centering" (+ sharpening)
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    teacher_temp: float = 0.04  # "centering" only
    center_momentum: float = 0.9  # "centering" only


@dataclass
class SyntheticConfig:
    dir: str = "data/synthetic"
    num_train: int = 4000
    num_val: int = 100
    num_test: int = 200
    image_size: int = 64
    seed: int = 0


@dataclass
class DataConfig:
    train: Optional[str] = None  # annotation JSON; None: the built-in synthetic scenes
    val: Optional[str] = None
    test: Optional[str] = None
    image_root: Optional[str] = None  # image paths in the JSON are relative to this (default: JSON's folder)
    # with several "::"-separated training files: each one's share of an epoch (default: its size)
    train_weights: Optional[list] = None
    tokenizer: Optional[str] = None  # vocab.txt / tokenizer.json; None: train a WordPiece on the captions
    vocab_size: int = 1000  # for a tokenizer trained on the captions
    max_text_len: int = 32
    # pad every training batch's captions to max_text_len instead of to its longest caption: fixed
    # shapes, so CUDA graphs (train.compile_mode=reduce-overhead, which turns this on) record one
    # graph per stack, not one per caption length; costs compute on the padding
    fixed_text_len: bool = False
    crop_scale: list = field(default_factory=lambda: [0.8, 1.0])
    hflip: float = 0.5  # probability; "left"/"right" in the caption are swapped with the image
    # decode JPEGs reduced (1/2, 1/4, 1/8: libjpeg's DCT scaling) where the sample's crop still has
    # model.image_size pixels a side: less decoding and resampling; the same crop, nothing upsampled
    reduced_decode: bool = True
    mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    num_workers: int = 1
    # bad samples (unreadable image, empty caption, ...) are replaced by another sample and counted;
    # the run stops when more than this share of the samples tried so far was bad
    max_skip_rate: float = 0.01
    skip_check_after: int = 2000  # samples tried before the rate is checked (a few early bad files are noise)
    max_image_pixels: int = 89_478_485  # larger images are refused (decompression bombs); PIL's default
    # a DataLoader worker that dies (killed for memory, say) is replaced: the loader restarts at the same
    # data position; the run stops (with a checkpoint) after this many restarts without a batch between
    max_loader_restarts: int = 3
    # webdataset tar shards instead of data.train: a path, glob or brace pattern ("shards/{00000..00099}.tar");
    # several sources separated by "::", mixed by data.shard_weights (see docs/scale-out.md)
    shards: Optional[str] = None
    shard_weights: Optional[list] = None  # one weight per source (default: equal)
    shuffle_buffer: int = 1000  # samples held per dataloader worker for shuffling across shards
    resampled: bool = False  # draw shards with replacement (an endless stream) instead of passes
    samples_per_epoch: Optional[int] = None  # None: every sample of every source once
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    output_dir: Optional[str] = None  # None: runs/<recipe>-<preset>-<timestamp>
    seed: int = 0
    batch_size: int = 64
    grad_accum: int = 1
    # with grad_accum > 1: ITC's negatives are the whole accumulated batch, not each micro-batch
    # (its features are computed first without gradient: one more unmasked encoder pass per micro-batch)
    accumulate_itc: bool = False
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    # after the warm-up: "cosine" or "linear" decay to min_lr, "constant", or "cooldown" (constant,
    # then linear decay to min_lr over the last cooldown_steps; a run can be lengthened before then)
    schedule: str = "cosine"
    cooldown_steps: int = -1  # "cooldown": the decaying tail (-1: a fifth of train.max_steps)
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    clip_grad: float = 1.0  # 0: no clipping
    # a step with a non-finite loss or gradient is skipped and counted; this many in a row write a
    # checkpoint of the last good state and stop the run
    max_nonfinite_in_row: int = 20
    # under torchrun: let DDP look for parameters a step did not use (needed by some recipes; costs a
    # graph traversal per step; turn off for the default recipe to save it)
    ddp_find_unused: bool = True
    activation_checkpointing: bool = False  # recompute each encoder block in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile each encoder stack (the first steps are slow while it compiles)
    compile_backend: str = "inductor"  # or e.g. "aot_eager" (no code generation; for checking)
    compile_mode: Optional[str] = None  # None, "max-autotune", "reduce-overhead", ...
    # under torchrun: shard parameters, gradients and AdamW state over the processes (FSDP2) instead of DDP
    fsdp: bool = False
    fused_adamw: bool = True  # one fused kernel for the AdamW update where the device supports it
    # model parts kept at their starting weights: parameter-name prefixes such as visual_encoder (a
    # pretrained image tower, as in locked-image tuning) or text_encoder.layer.0; no gradients, no updates
    freeze: list[str] = field(default_factory=list)
    # on CPU: glibc keeps freed memory for the next step instead of returning it to the kernel
    # (runtime.keep_freed_host_memory); saves the page faults of re-allocating activations each step
    keep_host_memory: bool = True
    # "bf16" autocast; "fp16" autocast with dynamic loss scaling (GPUs without bf16, e.g. V100, T4); "fp32"
    precision: str = "bf16"
    device: str = "auto"
    log_every: int = 10
    save_every: int = 500  # 0: only at the end
    keep_last: int = 2  # 0: keep every checkpoint
    tensorboard: bool = True  # written when the tensorboard package is installed
    # also log to a Weights & Biases run (pip install wandb; WANDB_MODE=offline needs no network or account)
    wandb: bool = False
    wandb_project: str = "maskvlm"
    wandb_name: Optional[str] = None  # default: the run folder's name
    progress: bool = True


@dataclass
class EvalConfig:
    every_steps: int = 0  # evaluate on the val split every N steps (0: only at the end)
    k: int = 16  # ITM re-ranks the top-k of the ITC ranking
    k_auto: bool = True  # k=256 for files named *coco*, 128 for *flickr*/*f30k* (the usual protocol)
    # the re-ranking score (see RETRIEVAL_SCORES): "itm" (the ITM head's match log-odds), "itm+itc"
    # (plus the ITC logit, similarity / temperature), "itm-logit" / "itm-logit+itc" (the match logit
    # alone / plus the cosine, as ALBEF's / BLIP's evaluation code), or "itc" (ITC ranking only)
    score: str = "itm"
    batch_size: int = 128
    # ITM re-ranking's fusion through torch.compile (train.compile_backend, dynamic shapes): on a 2-core
    # CPU 1.12-1.16x faster re-ranking at COCO's size after 10-35 s of compilation, so for large test sets;
    # bf16 scores then differ from eager ones by rounding
    compile: bool = False
    # the val metric that picks the best weights (higher is better); null: the task's own (retrieval
    # and pre-training r_mean, VQA vqa_acc, NLVR2 and SNLI-VE acc)
    best_metric: Optional[str] = None
    keep_best: bool = True  # write the best weights so far to OUTPUT/best (a model folder, with best.json)
    test_on: str = "last"  # the weights the test file is evaluated with at the end: "last" or "best"
    # stop training when this many periodic val evaluations in a row bring no new best (0: never)
    patience: int = 0


TASKS = ("pretrain", "retrieval", "vqa", "nlvr2", "ve")
PRECISIONS = ("bf16", "fp16", "fp32")
# retrieval re-ranking scores. The ITM head is trained with a softmax over (no match, match), which is
# unchanged by adding one number to both logits, so only their difference, the match log-odds, is
# fixed by training; "itm-logit" ranks by the match logit alone, as ALBEF's evaluation code does.
RETRIEVAL_SCORES = ("itm", "itm+itc", "itm-logit", "itm-logit+itc", "itc")


@dataclass
class TaskConfig:
    name: str = "pretrain"  # or a downstream task: retrieval, vqa, nlvr2, ve
    # the checkpoint, run folder or exported model a run starts from: fine-tuning's pre-trained model, or
    # (pre-training) a model whose training goes on with a fresh optimizer, schedule and data order
    init: Optional[str] = None
    layer_decay: float = 1.0  # lr x layer_decay^(depth - layer) in each encoder tower (1: off)
    head_lr_mult: float = 1.0  # lr multiplier of the newly initialised task head
    head_hidden: int = 0  # hidden width of the classifier head (0: twice the text width)
    num_answers: int = 3129  # VQA: the answer vocabulary is the top-N training answers
    modality_dropout: float = 0.0  # single-stream models: drop one modality of a training pair with this probability
    # The heads (itc, itm, mlm, mim) some training run this model comes from has trained, written when a
    # run starts: this run's objectives plus those recorded in task.init's config. null: not known.
    trained: Optional[list[str]] = None


# Reading a user's text file: UTF-8, with or without the byte-order mark that Windows tools write
# (Excel's "CSV UTF-8", older Notepad); plain "utf-8" refused such a JSON file and read the mark into
# the first column name of a table, the first token of a vocab.txt, the first name of a class list.
TEXT_ENCODING = "utf-8-sig"


def expand_home(value: str) -> str:
    """A leading ``~`` (or ``~user``) of a path, or of each ``::``-joined path, is that home folder, as
    in a shell; ``--out=~/x`` and YAML values are not expanded by one."""
    return "::".join(os.path.expanduser(part) for part in value.split("::")) if "~" in value else value


@dataclass
class Config:
    recipe: str = "maskvlm"
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def needs_teacher(self) -> bool:
        """Whether the objectives use an EMA teacher (momentum encoders)."""
        lo, mo = self.loss, self.momentum
        return (mo.queue_size > 0 or mo.alpha > 0 or lo.mrm > 0 or lo.mim_feat > 0 or lo.proto > 0
                or lo.proto_mim > 0 or self.masking.image_policy == "text_guided")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _expand_home(self) -> None:
        """A leading ``~`` of a path setting is the home folder, as in a shell (a YAML file or
        ``--output-dir=~/runs`` is not expanded by one): ``train.output_dir=~/runs`` made a folder
        named ``~`` in the working directory."""
        for key in PATH_KEYS:
            *parents, name = key.split(".")
            section = self
            for part in parents:
                section = getattr(section, part)
            value = getattr(section, name)
            if isinstance(value, str):
                setattr(section, name, expand_home(value))

    def validate(self) -> None:
        self._expand_home()
        self._check_ranges()
        _check_choice("masking.mode", self.masking.mode, ("separate", "joint"))
        _check_choice("masking.image_policy", self.masking.image_policy, ("block", "random", "text_guided"))
        _check_choice("prototypes.assign", self.prototypes.assign, ("sinkhorn", "centering"))
        _check_choice("model.arch", self.model.arch, ("two_stream", "single_stream"))
        _check_choice("loss.recon_region", self.loss.recon_region, ("masked", "all"))
        _check_choice("loss.itm_negatives", self.loss.itm_negatives, ("global", "local"))
        mk = self.masking
        if mk.modality_aware:
            probs = mk.modality_probs
            if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
                raise ConfigError(f"masking.modality_probs={probs}: expected three probabilities summing to 1")
            if mk.visible_only:
                raise ConfigError("masking.modality_aware draws a different count per sample; "
                                  "set masking.visible_only: false")
            for key in ("heavy_ratio", "light_ratio"):
                if not 0 <= getattr(mk, key) < 1:
                    raise ConfigError(f"masking.{key}={getattr(mk, key)}: expected a ratio in [0, 1)")
        if mk.one_image_pass:
            if self.model.arch == "single_stream" or mk.modality_aware:
                raise ConfigError("masking.one_image_pass is for the two-stream model with one masking ratio per "
                                  "batch; set model.arch: two_stream and masking.modality_aware: false")
            if not 0 < mk.image_ratio < 1:
                raise ConfigError(f"masking.one_image_pass needs masking.image_ratio in (0, 1), got {mk.image_ratio}: "
                                  "the share of patches every objective then leaves out")
        if self.model.arch == "single_stream":
            if self.model.vision_width != self.model.text_width:
                raise ConfigError("model.arch=single_stream needs model.vision_width == model.text_width")
            if mk.visible_only and self.loss.recon > 0:
                raise ConfigError("model.arch=single_stream encodes masked regions as mask tokens; "
                                  "set masking.visible_only: false")
            unsupported = [k for k in ("mim", "mrm", "mim_feat", "proto", "proto_mim") if getattr(self.loss, k) > 0]
            if unsupported:
                raise ConfigError(f"model.arch=single_stream has no image cross-modality encoder or pixel head for "
                                  f"loss.{', loss.'.join(unsupported)}; use recon for images")
        elif self.loss.recon > 0:
            raise ConfigError("loss.recon needs the deconvolution decoder of model.arch=single_stream")
        if not 0 <= self.task.modality_dropout < 1:
            raise ConfigError(f"task.modality_dropout={self.task.modality_dropout}: expected a value in [0, 1)")
        if not 0.0 <= self.momentum.decay < 1.0:
            raise ConfigError(f"momentum.decay={self.momentum.decay}: expected a value in [0, 1)")
        if not 0.0 <= self.momentum.alpha <= 1.0:
            raise ConfigError(f"momentum.alpha={self.momentum.alpha}: expected a value in [0, 1]")
        if self.momentum.queue_size < 0 or self.prototypes.num < 2:
            raise ConfigError("momentum.queue_size must be >= 0 and prototypes.num >= 2")
        if self.masking.guided_temp <= 0:
            raise ConfigError(f"masking.guided_temp={self.masking.guided_temp}: expected a positive value")
        if self.data.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer={self.data.shuffle_buffer}: expected at least 1")
        _check_choice("model.attention", self.model.attention, ("auto", "sdpa", "math"))
        _check_choice("model.itc_loss", self.model.itc_loss, ("softmax", "sigmoid"))
        if self.model.itc_loss == "sigmoid" and (self.momentum.queue_size > 0 or self.momentum.alpha > 0):
            raise ConfigError("model.itc_loss=sigmoid works with in-batch ITC only, not with the momentum queue or "
                              "distillation (momentum.queue_size / momentum.alpha, as in the albef recipe)")
        _check_choice("train.precision", self.train.precision, PRECISIONS)
        if self.train.accumulate_itc:
            if self.task.name not in ("pretrain", "retrieval") or self.loss.itc <= 0:
                raise ConfigError("train.accumulate_itc needs an ITC loss (loss.itc > 0): pre-training or retrieval "
                                  "fine-tuning")
            if self.momentum.queue_size > 0 or self.momentum.alpha > 0:
                raise ConfigError("train.accumulate_itc works with in-batch ITC, not with the momentum queue or "
                                  "distillation (momentum.queue_size / momentum.alpha)")
        weights = self.data.train_weights
        numbers = isinstance(weights, list) and all(isinstance(w, (int, float)) and w >= 0 for w in weights)
        if weights is not None and (not numbers or sum(weights) <= 0):
            raise ConfigError(f"data.train_weights={weights!r}: expected a list of non-negative numbers, one per "
                              "training file, not all zero")
        _check_choice("train.schedule", self.train.schedule, ("cosine", "linear", "constant", "cooldown"))
        if self.train.cooldown_steps > self.train.max_steps:
            raise ConfigError(f"train.cooldown_steps={self.train.cooldown_steps} is more than train.max_steps="
                              f"{self.train.max_steps}")
        if self.train.precision == "fp16" and self.train.fsdp:
            raise ConfigError("train.precision=fp16 (loss scaling) is not available with train.fsdp yet; use bf16 "
                              "on GPUs that have it, or DDP")
        _check_choice("eval.score", self.eval.score, RETRIEVAL_SCORES)
        _check_choice("eval.test_on", self.eval.test_on, ("last", "best"))
        if self.eval.patience < 0 or (self.eval.patience and not self.eval.every_steps):
            raise ConfigError(f"eval.patience={self.eval.patience}: expected 0 (off) or a positive count of val "
                              "evaluations, which needs eval.every_steps > 0")
        if self.eval.test_on == "best" and not self.eval.keep_best:
            raise ConfigError("eval.test_on=best needs eval.keep_best=true (the best weights are read back from disk)")
        if self.eval.test_on == "best" and self.train.fsdp:
            raise ConfigError("eval.test_on=best is not available with train.fsdp yet; evaluate OUTPUT/best "
                              "afterwards with `maskvlm evaluate`")
        _check_choice("task.name", self.task.name, TASKS)
        if not 0 < self.task.layer_decay <= 1:
            raise ConfigError(f"task.layer_decay={self.task.layer_decay}: expected a value in (0, 1]")
        if self.task.head_lr_mult <= 0 or self.task.num_answers < 1:
            raise ConfigError("task.head_lr_mult and task.num_answers must be positive")
        for key in ("masking.text_ratio", "masking.image_ratio"):
            value = _get(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key}={value}: expected a ratio in [0, 1)")
        if not mk.modality_aware:  # (modality-aware masking has its own ratios)
            lo = self.loss
            for ratio, needs in (("text_ratio", {"mlm": lo.mlm}),
                                 ("image_ratio", {"mim": lo.mim, "mim_feat": lo.mim_feat, "proto_mim": lo.proto_mim})):
                on = [name for name, weight in needs.items() if weight > 0]
                if getattr(mk, ratio) == 0 and on:
                    raise ConfigError(f"masking.{ratio}=0 leaves {', '.join('loss.' + n for n in on)} nothing to "
                                      f"predict: set a ratio above 0, or {' '.join('loss.' + n + '=0' for n in on)}")
        for key in ("train.batch_size", "train.grad_accum", "train.max_steps", "eval.k",
                    "eval.batch_size", "model.patch_size", "model.image_size", "masking.image_block"):
            if _get(self, key) < 1:
                raise ConfigError(f"{key}={_get(self, key)}: expected a positive integer")
        m = self.model
        if m.image_size % m.patch_size:
            raise ConfigError(f"model.image_size={m.image_size} is not a multiple of model.patch_size={m.patch_size}")
        for width, heads in (("vision_width", "vision_heads"), ("text_width", "text_heads"),
                             ("vision_width", "image_cross_heads")):
            if getattr(m, width) % getattr(m, heads):
                raise ConfigError(f"model.{width}={getattr(m, width)} is not divisible by model.{heads}={getattr(m, heads)}")
        if self.data.max_text_len > m.max_position:
            raise ConfigError(f"data.max_text_len={self.data.max_text_len} exceeds model.max_position={m.max_position}")
        if sum(w > 0 for w in dataclasses.asdict(self.loss).values() if isinstance(w, float)) == 0:
            raise ConfigError("loss: every objective weight is 0; nothing to train")
        if not 0.0 <= self.data.max_skip_rate <= 1.0:
            raise ConfigError(f"data.max_skip_rate={self.data.max_skip_rate}: expected a share in [0, 1]")
        if self.data.max_loader_restarts < 0:
            raise ConfigError(f"data.max_loader_restarts={self.data.max_loader_restarts}: expected an integer >= 0")
        if self.data.skip_check_after < 1 or self.data.max_image_pixels < 1 or self.train.max_nonfinite_in_row < 1:
            raise ConfigError("data.skip_check_after, data.max_image_pixels and train.max_nonfinite_in_row must be "
                              "positive integers")
        lo, hi = self.data.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.crop_scale={self.data.crop_scale}: expected 0 < min <= max <= 1")
        if self.model.arch == "two_stream":
            w = self.loss
            for key, objectives in (("cross_layers", {"itm": w.itm, "mlm": w.mlm, "mrm": w.mrm}),
                                    ("image_cross_layers", {"mim": w.mim, "mim_feat": w.mim_feat,
                                                            "mrm": w.mrm, "proto_mim": w.proto_mim})):
                on = [name for name, weight in objectives.items() if weight > 0]
                if getattr(self.model, key) < 1 and on:
                    raise ConfigError(f"model.{key}={getattr(self.model, key)}: "
                                      f"{', '.join('loss.' + n for n in on)} read the output of that "
                                      "cross-modality encoder, which needs at least 1 layer")

    def _check_ranges(self) -> None:
        """Every number and list a user can set is in its range, so a typo (``train.log_every=0``,
        ``model.temp=-1``, ``data.hflip=5``) stops the run at once with the key's name instead of
        crashing at step 10, or training something that is not what was asked."""
        for key, ok, expected in _RANGES:
            value = _get(self, key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and ok(value)):
                raise ConfigError(f"{key}={value!r}: expected {expected}")
        for key, length, ok, expected in _LISTS:
            value = _get(self, key)
            if (not isinstance(value, list) or len(value) != length
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v) for v in value)):
                raise ConfigError(f"{key}={value!r}: expected {length} numbers, each {expected}")


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _probability(v):
    return 0 <= v <= 1


def _below_one(v):
    return 0 <= v < 1


def _at_least_one(v):
    return v >= 1


# (key, test, what was expected): numbers the trainer or model would otherwise take on trust
_RANGES = (
    *((f"model.{k}", _at_least_one, "a positive integer") for k in (
        "vision_layers", "vision_heads", "text_heads", "text_intermediate", "image_cross_heads", "embed_dim",
        "type_vocab_size", "single_layers")),
    *((f"model.{k}", _non_negative, "an integer >= 0") for k in ("text_layers", "cross_layers", "image_cross_layers")),
    ("model.vision_mlp_ratio", _positive, "a positive number"),
    ("model.temp", _positive, "a positive temperature"),
    ("model.hidden_dropout", _below_one, "a probability in [0, 1)"),
    ("model.attention_dropout", _below_one, "a probability in [0, 1)"),
    *((f"loss.{k}", _non_negative, "a weight >= 0 (0 turns the objective off)") for k in (
        "itc", "itm", "mlm", "mim", "mrm", "mim_feat", "proto", "proto_mim", "recon")),
    ("momentum.alpha_warmup_steps", lambda v: v >= -1, "a number of steps, or -1 for the first epoch"),
    ("prototypes.student_temp", _positive, "a positive temperature"),
    ("prototypes.teacher_temp", _positive, "a positive temperature"),
    ("prototypes.sinkhorn_eps", _positive, "a positive value"),
    ("prototypes.sinkhorn_iters", _at_least_one, "a positive integer"),
    ("prototypes.center_momentum", _below_one, "a value in [0, 1)"),
    ("data.vocab_size", _at_least_one, "a positive integer"),
    ("data.max_text_len", lambda v: v >= 3, "at least 3 ([CLS], one token, [SEP])"),
    ("data.hflip", _probability, "a probability in [0, 1]"),
    ("data.num_workers", _non_negative, "an integer >= 0 (0: load in the training process)"),
    *((f"data.synthetic.{k}", _at_least_one, "a positive integer") for k in ("num_train", "num_val", "num_test")),
    ("data.synthetic.image_size", lambda v: v >= 16, "at least 16 pixels"),
    ("train.lr", _non_negative, "a learning rate >= 0 (0: the weights stay as they are)"),
    ("train.min_lr", _non_negative, "a learning rate >= 0"),
    ("train.warmup_steps", _non_negative, "a number of steps >= 0"),
    ("train.cooldown_steps", lambda v: v >= -1, "a number of steps, or -1 for a fifth of train.max_steps"),
    ("train.weight_decay", _non_negative, "a value >= 0"),
    ("train.clip_grad", _non_negative, "a gradient norm >= 0 (0: no clipping)"),
    ("train.log_every", _at_least_one, "a positive number of steps"),
    ("train.save_every", _non_negative, "a number of steps >= 0 (0: only at the end)"),
    ("train.keep_last", _non_negative, "a count >= 0 (0: keep every checkpoint)"),
    ("eval.every_steps", _non_negative, "a number of steps >= 0 (0: only at the end)"),
    ("task.head_hidden", _non_negative, "a width >= 0 (0: twice the text width)"),
)
# (key, length, test of each number, what each was expected to be)
_LISTS = (
    ("data.crop_scale", 2, _positive, "> 0 (min and max share of the image area)"),
    ("data.mean", 3, lambda v: True, "a channel mean"),
    ("data.std", 3, _positive, "a positive channel standard deviation"),
    ("train.betas", 2, _below_one, "in [0, 1) (AdamW's beta1, beta2)"),
    ("masking.modality_probs", 3, _non_negative, ">= 0"),
)


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(repr, allowed))}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(base, '__name__', base)})")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif typing.get_origin(base) is list and typing.get_args(base) == (str,):
        if isinstance(value, str):  # train.freeze=visual_encoder: one name
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{key}={value!r}: expected a list of names (strings)")
    else:
        return value
    raise ConfigError(f"{key}={value!r}: expected {base.__name__}, got {type(value).__name__}")


# settings that name files or folders (``::`` joins several)
PATH_KEYS = ("model.text_init", "model.image_init", "data.synthetic.dir", "data.train", "data.val", "data.test",
             "data.image_root", "data.tokenizer", "data.shards", "train.output_dir", "task.init")


def merge_into(obj: Any, updates: dict, prefix: str = "") -> None:
    """Write ``updates`` (nested dict) into the dataclass ``obj`` in place, checking keys and types."""
    if not isinstance(updates, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping of its keys, got {type(updates).__name__} {updates!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1, cutoff=0.7)
            guess = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{key}'; {guess}valid keys here: {', '.join(sorted(fields))}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            merge_into(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def parse_overrides(items: list[str]) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw  # e.g. a brace pattern such as {00000..00009}.tar is not YAML: keep the text
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    for name in ("recipe", "preset"):
        if name in out:  # the field only names the run: the settings come from the recipe / preset files
            raise ConfigError(f"{name}={out[name]}: the {name} is chosen with `maskvlm pretrain --{name} "
                              f"{out[name]}`; as an override it would only rename the run, not change its settings")
    return out


def recipe_path(kind: str, name: str) -> Path:
    """Path of a packaged recipe (kind='') or size preset (kind='presets'), or a user YAML path."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    root = resources.files("maskvlm") / "recipes"
    folder = root / kind if kind else root
    path = Path(str(folder / f"{name}.yaml"))
    if not path.exists():
        available = sorted(p.stem for p in Path(str(folder)).glob("*.yaml"))
        what = "preset" if kind else "recipe"
        raise ConfigError(f"unknown {what} '{name}'; available: {', '.join(available)}")
    return path


def finetune_recipe(task: str) -> Path:
    """The packaged fine-tuning settings of a downstream task (recipes/finetune/<task>.yaml)."""
    path = Path(str(resources.files("maskvlm") / "recipes" / "finetune" / f"{task}.yaml"))
    if not path.exists():
        raise ConfigError(f"unknown task '{task}'; available: {', '.join(TASKS[1:])}")
    return path


def list_recipes() -> list[str]:
    return sorted(p.stem for p in Path(str(resources.files("maskvlm") / "recipes")).glob("*.yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps
    the last, so a second ``train:`` section would silently drop every setting of the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}; the second would replace the first)", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    try:
        with open(path, encoding=TEXT_ENCODING) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected a YAML config") from None
    except yaml.YAMLError as e:
        tabs = " (YAML indents with spaces, not tabs)" if "'\\t'" in str(e) else ""
        raise ConfigError(f"{path}: not valid YAML{tabs} ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def build_config(recipe: str = "maskvlm", preset: Optional[str] = None, config_file: Optional[str] = None,
                 overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- size preset <- recipe <- user YAML <- overrides. The recipe may name its preset."""
    recipe_data = load_yaml(recipe_path("", recipe))
    preset = preset or recipe_data.pop("preset", None) or "tiny"
    recipe_data.pop("preset", None)
    cfg = Config(recipe=Path(recipe).stem, preset=Path(preset).stem)
    for source, data in (("preset", load_yaml(recipe_path("presets", preset))), ("recipe", recipe_data)):
        try:
            merge_into(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{source} '{preset if source == 'preset' else recipe}': {e}") from None
    user_file, user_overrides = (load_yaml(config_file) if config_file else {}), parse_overrides(overrides or [])
    if config_file:
        try:
            merge_into(cfg, user_file)
        except ConfigError as e:
            raise ConfigError(f"{config_file}: {e}") from None
    merge_into(cfg, user_overrides)
    cfg._expand_home()  # before the folders named are read
    if cfg.task.init:
        apply_init_model(cfg, recipe_data.get("model") or {}, [user_file, user_overrides])
    if cfg.model.text_init or cfg.model.image_init:
        from .models.init_sizes import apply_init_sizes
        apply_init_sizes(cfg)
    cfg.validate()
    return cfg


def apply_init_model(cfg: Config, recipe_model: dict, user: list[dict]) -> None:
    """Pre-training that starts from a whole maskvlm model (``task.init``): its architecture (the
    ``model`` section) and image normalisation come from that model, the preset's sizes give way, and
    the user's own ``model.*`` / ``data.mean`` / ``data.std`` keys still apply on top. A recipe that
    needs another architecture (e.g. MLIM's single stream) is an error."""
    from .train.checkpoint import model_folder
    from .models.io import read_config

    def user_keys(section: str) -> dict:
        out: dict = {}
        for source in user:
            if isinstance(source.get(section), dict):
                out.update(source[section])
        return out

    if cfg.model.text_init or cfg.model.image_init or cfg.data.tokenizer:
        raise ConfigError("task.init starts from a whole maskvlm model with its tokenizer; model.text_init, "
                          "model.image_init and data.tokenizer cannot be combined with it")
    base = read_config(model_folder(cfg.task.init))
    user_model, user_data = user_keys("model"), user_keys("data")
    clash = [f"model.{k}={v!r} (that model: {getattr(base.model, k)!r})" for k, v in recipe_model.items()
             if k not in user_model and hasattr(base.model, k) and getattr(base.model, k) != v]
    if clash:
        raise ConfigError(f"recipe {cfg.recipe} needs {', '.join(clash)}, but task.init={cfg.task.init} has "
                          "another architecture")
    cfg.model = base.model
    merge_into(cfg, {"model": user_model, "data": {k: base_v for k, base_v in
                                                    (("mean", base.data.mean), ("std", base.data.std))
                                                    if k not in user_data}})


def best_metric(config: Config) -> str:
    """The val metric that picks a run's best weights (``eval.best_metric`` or the task's own)."""
    return config.eval.best_metric or {"pretrain": "r_mean", "retrieval": "r_mean", "vqa": "vqa_acc"}.get(
        config.task.name, "acc")


# --- which heads a model's training has trained ---------------------------------------------------------
HEAD_LOSSES = {"itc": ("itc",), "itm": ("itm",), "mlm": ("mlm",), "mim": ("mim", "recon")}


def objectives_train(config: Config) -> set[str]:
    """The heads this configuration's own objectives train. Pre-training and retrieval fine-tuning
    train the heads whose loss weight is positive (MIM: the pixel decoder, trained by ``loss.mim`` or
    MLIM's ``loss.recon``); the classification tasks train a new head of their own only. A
    Hugging Face text model (``model.text_init``) brings its MLM head."""
    if config.task.name not in ("pretrain", "retrieval"):
        return set()
    heads = {h for h, weights in HEAD_LOSSES.items() if any(getattr(config.loss, w) > 0 for w in weights)}
    return heads | ({"mlm"} if config.model.text_init else set())


def trained_heads(config: Config) -> Optional[set[str]]:
    """The heads a saved model's training has trained, or None when that is not known (a fine-tuned
    checkpoint written before ``task.trained`` was recorded)."""
    if config.task.trained is not None:
        return set(config.task.trained)
    return objectives_train(config) if config.task.name == "pretrain" else None


def untrained_heads(config: Config, heads: typing.Iterable[str]) -> list[str]:
    """Those of ``heads`` that no training run of this model has trained (none when not known)."""
    known = trained_heads(config)
    return [] if known is None else [h for h in heads if h not in known]


def untrained_note(config: Config, heads: typing.Iterable[str]) -> Optional[str]:
    """A sentence naming the untrained ones of ``heads``, or None when all were trained."""
    missing = untrained_heads(config, heads)
    if not missing:
        return None
    names = " and ".join(h.upper() for h in missing)
    losses = " / ".join(f"loss.{w}" for h in missing for w in HEAD_LOSSES[h])
    return (f"the {names} head{'s' if len(missing) > 1 else ''} of this model {'were' if len(missing) > 1 else 'was'} "
            f"never trained (no run it comes from had {losses} > 0; recipe {config.recipe}), so "
            f"{'their' if len(missing) > 1 else 'its'} outputs are those of initial weights")


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    merge_into(cfg, data)
    cfg.validate()
    return cfg
