"""The pre-training task: the model plus the recipe's objectives. One call runs every
objective whose weight is non-zero on a batch and returns the weighted loss and metrics."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..data.formats import Batch
from ..models.model import MaskVLM
from ..objectives import ITC, ITM, MIM, MLM, StepState


def build_objectives(config: Config) -> dict[str, nn.Module]:
    loss = config.loss
    available = {"itc": ITC, "itm": ITM, "mlm": MLM, "mim": lambda: MIM(norm_pix=loss.norm_pix)}
    return {name: make() for name, make in available.items() if getattr(loss, name) > 0}


class PretrainTask(nn.Module):
    def __init__(self, model: MaskVLM, config: Config):
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict(build_objectives(config))
        self.weights = {name: float(getattr(config.loss, name)) for name in self.objectives}
        self.visible_only = config.masking.visible_only
        self.joint = config.masking.mode == "joint"

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        state = StepState(self.model, batch, self.visible_only, self.joint)
        total = torch.zeros((), device=batch.images.device)
        metrics: dict[str, torch.Tensor] = {}
        for name, objective in self.objectives.items():
            out = objective(state)
            total = total + self.weights[name] * out.loss
            metrics[f"{name}_loss"] = out.loss.detach()
            metrics.update(out.metrics)
        metrics["loss"] = total.detach()
        return total, metrics


def prepare_data_paths(config: Config, progress: bool = True) -> None:
    """Fill data.train/val/test with the built-in synthetic scenes (generated if missing)
    when no training annotation file is given."""
    from ..data.synthetic import ensure_synthetic

    d = config.data
    if d.train is not None:
        return
    s = d.synthetic
    root = ensure_synthetic(s.dir, s.num_train, s.num_val, s.num_test, s.image_size, s.seed, progress=progress)
    d.train, d.val, d.test = str(root / "train.json"), str(root / "val.json"), str(root / "test.json")
    d.image_root = None


def eval_transform(config: Config):
    from ..data.transforms import ImageTransform
    return ImageTransform(config.model.image_size, config.data.mean, config.data.std, train=False)


def make_retrieval_eval(model: MaskVLM, tokenizer, config: Config, annotation_path: str, progress: bool = False):
    """A zero-argument function returning zero-shot retrieval metrics on ``annotation_path``."""
    from ..data.formats import RetrievalDataset
    from ..runtime import resolve_device
    from .retrieval import evaluate_retrieval, protocol_k

    dataset = RetrievalDataset(annotation_path, config.data.image_root, eval_transform(config))
    device = resolve_device(config.train.device)
    k = protocol_k(annotation_path, config.eval.k, config.eval.k_auto)

    def run() -> dict:
        return evaluate_retrieval(model, tokenizer, dataset, config.data.max_text_len, k,
                                  config.eval.score, config.eval.batch_size, device, config.train.precision,
                                  progress=progress)
    return run
