"""``train.freeze``: named model parts keep their weights (no gradients, no optimizer state)."""

import pytest
import torch
from safetensors.torch import load_file

from maskvlm.pipeline import pretrain
from maskvlm.train.checkpoint import list_checkpoints, load_trainer_state
from tests.conftest import micro_config


def _config(synthetic_dir, out, *overrides):
    return micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                        f"train.output_dir={out}", "train.max_steps=2", "train.save_every=1", "train.keep_last=3",
                        *overrides)


def test_frozen_parts_keep_their_weights_and_the_rest_trains(synthetic_dir, tmp_path):
    pretrain(_config(synthetic_dir, tmp_path / "run", "train.freeze=[visual_encoder, text_encoder.layer.0]"))
    first, last = (load_file(str(p / "model.safetensors")) for p in list_checkpoints(tmp_path / "run"))
    model = {k[len("model."):]: (first[k], last[k]) for k in first if k.startswith("model.")}
    frozen = [k for k in model if k.startswith(("visual_encoder.", "text_encoder.layer.0."))]
    assert len(frozen) > 10
    assert all(torch.equal(*model[k]) for k in frozen)
    moved = [k for k in model if k not in frozen and not torch.equal(*model[k])]
    assert len(moved) > 0.8 * (len(model) - len(frozen))  # everything else trains (a few may not move in a step)
    pretrain(_config(synthetic_dir, tmp_path / "all"))
    optimized = [len(load_trainer_state(list_checkpoints(tmp_path / run)[-1])["optimizer"]["state"])
                 for run in ("run", "all")]
    assert optimized[0] == optimized[1] - len(frozen)  # no AdamW state for a frozen tensor


def test_a_prefix_that_names_nothing_lists_the_parts(synthetic_dir, tmp_path):
    with pytest.raises(ValueError, match="train.freeze: 'vision_encoder' names no parameter of this model; its "
                                         "parts are image_cross_encoder, .*visual_encoder"):
        pretrain(_config(synthetic_dir, tmp_path / "run", "train.freeze=[vision_encoder]"))


def test_resuming_with_other_frozen_parts_is_a_clear_error(synthetic_dir, tmp_path):
    pretrain(_config(synthetic_dir, tmp_path / "run", "train.max_steps=1"))
    with pytest.raises(ValueError, match="its optimizer state does not fit the parameters this run trains"):
        pretrain(_config(synthetic_dir, tmp_path / "run", "train.max_steps=2"), resume="auto",
                 overrides=["train.max_steps=2", "train.freeze=[visual_encoder]"])
