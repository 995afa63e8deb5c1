"""``model.itc_loss=sigmoid``: the SigLIP pair loss, its split over ranks, and a run that trains it."""

import math

import pytest
import torch
from safetensors.torch import load_file

from maskvlm.config import ConfigError
from maskvlm.objectives.itc import sigmoid_itc_loss
from tests.conftest import micro_config


def test_sigmoid_loss_matches_a_hand_computed_value():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    ids = torch.tensor([0, 1])
    txt_ids = torch.tensor([0, 0, 1])  # captions 0 and 1 belong to image 0, caption 2 to image 1
    temp, bias = torch.tensor(0.5), torch.tensor(-1.0)
    total = 0.0
    for i in range(2):
        for j in range(3):
            logit = float(img[i] @ txt[j]) / 0.5 - 1.0
            label = 1.0 if int(ids[i]) == int(txt_ids[j]) else -1.0
            total += math.log(1 + math.exp(-label * logit))  # -log sigmoid(label * logit)
    loss, acc = sigmoid_itc_loss(img, txt[:2], ids, temp, bias, all_text_feat=txt, all_image_ids=txt_ids)
    assert loss.item() == pytest.approx(total / 2, rel=1e-6)
    assert acc.item() == 1.0  # image 0's best caption is caption 0, image 1's is caption 2


def test_rank_shares_average_to_the_global_loss():
    """Each rank: its images against the captions of every rank. The mean over ranks (what DDP
    optimises) is the single-process loss on the whole batch, so the gradients are the same too."""
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5])  # positives across the rank boundary too
    temp, bias = torch.tensor(0.1), torch.tensor(-5.0)
    whole = sigmoid_itc_loss(img, txt, ids, temp, bias)[0]
    per_rank = [sigmoid_itc_loss(img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], ids[r * 4:(r + 1) * 4], temp, bias,
                                 all_text_feat=txt, all_image_ids=ids)[0] for r in range(2)]
    assert torch.allclose(sum(per_rank) / 2, whole, atol=1e-6)


def test_a_sigmoid_run_learns_the_bias_and_saves_it(synthetic_dir, tmp_path):
    from maskvlm.models.model import load_pretrained
    from maskvlm.pipeline import pretrain

    cfg = micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                       f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4", "train.save_every=0",
                       "model.itc_loss=sigmoid", "model.itc_bias_init=-4", "loss.itm=0", "loss.mlm=0", "loss.mim=0")
    result = pretrain(cfg)
    assert "itc_bias" in result["train"] and result["train"]["itc_bias"] != -4.0  # the bias is trained
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert float(state["model.itc_head.bias"]) == pytest.approx(result["train"]["itc_bias"], abs=1e-3)
    model, config, _ = load_pretrained(tmp_path / "run" / "checkpoints" / "step-00000004")
    assert config.model.itc_loss == "sigmoid"
    assert float(model.itc_head.bias.detach()) == float(state["model.itc_head.bias"])


def test_softmax_models_have_no_bias_and_sigmoid_refuses_the_momentum_queue():
    from maskvlm.models.model import build_model

    cfg = micro_config("model.vocab_size=50")
    assert build_model(cfg).itc_head.bias is None
    assert "itc_head.bias" in build_model(micro_config("model.vocab_size=50", "model.itc_loss=sigmoid")).state_dict()
    with pytest.raises(ConfigError, match="model.itc_loss=sigmoid works with in-batch ITC only"):
        micro_config("model.itc_loss=sigmoid", recipe="albef")
    with pytest.raises(ConfigError, match="model.itc_loss"):
        micro_config("model.itc_loss=siglip")
