import math

import pytest
import torch

from maskvlm.masking import IGNORE_INDEX
from maskvlm.models.vit import patchify
from maskvlm.objectives import ITC, ITM, MIM, MLM, StepState, itc_loss, sample_hard_negatives
from maskvlm.tasks.pretrain import PretrainTask


def softplus_neg(x):  # -log sigmoid-style term log(1 + e^-x), written out by hand
    return math.log1p(math.exp(-x))


def test_itc_matches_hand_computed_value():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss, acc = itc_loss(image, text, torch.tensor([0, 1]), torch.tensor(0.5))
    # logits i2t = [[2, 1.2], [0, 1.6]], t2i = [[2, 0], [1.2, 1.6]]; two-way softmax = log(1 + e^-margin)
    i2t = (softplus_neg(2 - 1.2) + softplus_neg(1.6 - 0)) / 2
    t2i = (softplus_neg(2 - 0) + softplus_neg(1.6 - 1.2)) / 2
    assert abs(loss.item() - (i2t + t2i) / 2) < 1e-6
    assert acc.item() == 1.0


def test_itc_multi_positive_targets():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss, _ = itc_loss(image, text, torch.tensor([7, 7]), torch.tensor(0.5))
    # every pair is positive: each row's loss is -mean(log softmax) over its two entries
    def row(a, b):
        lse = math.log(math.exp(a) + math.exp(b))
        return -((a - lse) + (b - lse)) / 2
    expected = ((row(2, 1.2) + row(0, 1.6)) / 2 + (row(2, 0) + row(1.2, 1.6)) / 2) / 2
    assert abs(loss.item() - expected) < 1e-6


def test_hard_negatives_never_share_the_image_id():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    for seed in range(50):
        sim = torch.randn(8, 8) * 5
        neg_text, neg_image, valid = sample_hard_negatives(sim, ids, torch.Generator().manual_seed(seed))
        assert valid.all()
        assert (ids[neg_text] != ids).all() and (ids[neg_image] != ids).all()


def test_hard_negatives_follow_similarity():
    ids = torch.arange(4)
    sim = torch.full((4, 4), -20.0)
    sim[0, 2] = 20.0  # image 0 is very similar to text 2
    neg_text, _, _ = sample_hard_negatives(sim, ids, torch.Generator().manual_seed(0))
    assert neg_text[0] == 2


def test_hard_negatives_are_drawn_from_non_finite_similarities_too():
    # a diverging step: the draw must not raise, so the non-finite loss reaches the trainer's skip
    ids = torch.arange(4)
    sim = torch.randn(4, 4)
    sim[1] = float("nan")
    sim[2, 3] = float("inf")
    sim[:, 0] = float("-inf")
    neg_text, neg_image, valid = sample_hard_negatives(sim, ids, torch.Generator().manual_seed(0))
    assert valid.all() and ((0 <= neg_text) & (neg_text < 4)).all() and ((0 <= neg_image) & (neg_image < 4)).all()


def test_hard_negatives_rows_without_candidates_are_invalid():
    _, _, valid = sample_hard_negatives(torch.randn(3, 3), torch.tensor([5, 5, 5]))
    assert not valid.any()


def test_itm_uses_positives_and_two_negatives_per_pair(model, batch):
    out = ITM()(StepState(model, batch))
    assert torch.isfinite(out.loss)
    ids = batch.image_ids
    assert (ids[out.extras["neg_text"]] != ids).all() and (ids[out.extras["neg_image"]] != ids).all()


def test_mlm_loss_only_on_masked_positions(model, batch):
    state = StepState(model, batch)
    fused = state.fused_masked_text  # cached: the MLM objective reads this same tensor
    fused.retain_grad()
    out = MLM()(state)
    out.loss.backward()
    grad_norm = fused.grad.norm(dim=-1)
    masked = batch.mlm_labels != IGNORE_INDEX
    assert (grad_norm[masked] > 0).all()
    assert (grad_norm[~masked] == 0).all()


def test_mim_loss_only_on_masked_patches(model, batch, config):
    torch.nn.init.zeros_(model.pixel_head.fc.weight)
    torch.nn.init.zeros_(model.pixel_head.fc.bias)
    out = MIM()(StepState(model, batch))
    target = patchify(batch.images, config.model.patch_size)
    expected = target[batch.image_mask].abs().mean()  # zero prediction: L1 = mean |target| over masked patches
    torch.testing.assert_close(out.loss, expected)
    assert not torch.isclose(out.loss, target[~batch.image_mask].abs().mean())


def test_mim_norm_pix_targets_are_per_patch_normalised(model, batch):
    torch.nn.init.zeros_(model.pixel_head.fc.weight)
    torch.nn.init.zeros_(model.pixel_head.fc.bias)
    out = MIM(norm_pix=True)(StepState(model, batch))
    assert 0.7 < out.loss.item() < 0.9  # mean |z| of standardised values is about sqrt(2/pi) = 0.8


def test_encodings_are_computed_once_per_step(model, batch, config):
    calls = {"image": 0, "text": 0}
    enc_i, enc_t = model.encode_image, model.encode_text

    def count_image(*a, **k):
        calls["image"] += 1
        return enc_i(*a, **k)

    def count_text(*a, **k):
        calls["text"] += 1
        return enc_t(*a, **k)
    model.encode_image, model.encode_text = count_image, count_text
    loss, metrics = PretrainTask(model, config)(batch)
    assert calls == {"image": 2, "text": 2}  # unmasked + masked for each modality
    assert set(metrics) >= {"itc_loss", "itm_loss", "mlm_loss", "mim_loss", "loss"}


def test_zero_weight_objectives_are_not_computed(model, batch, config):
    config.loss.mim = 0.0
    config.loss.itm = 0.0
    task = PretrainTask(model, config)
    assert set(task.objectives) == {"itc", "mlm"}
    _, metrics = task(batch)
    assert "mim_loss" not in metrics and "itm_loss" not in metrics


def test_joint_masking_conditions_on_the_masked_other_modality(model, batch, config):
    config.masking.mode = "joint"
    task = PretrainTask(model, config)
    state = StepState(model, batch, joint=True)
    assert state.image_context is state.masked_image.hidden
    assert state.text_context is state.masked_text
    loss, _ = task(batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("off", ["loss.mim=0", "loss.mlm=0"])
def test_joint_masking_masks_both_modalities_with_one_objective_off(off, synthetic_dir, tmp_path):
    """In joint mode the masked caption attends to the masked image and vice versa, so both masks
    are drawn even when only MLM or only MIM is on (this stopped with 'the collator drew none')."""
    from maskvlm.pipeline import pretrain
    from maskvlm.tasks.pretrain import needs_image_mask, needs_text_mask
    from tests.conftest import micro_config

    cfg = micro_config("masking.mode=joint", off, f"data.train={synthetic_dir / 'train.json'}", "data.val=null",
                       "data.test=null", "train.max_steps=2", f"train.output_dir={tmp_path}", "data.vocab_size=200")
    assert needs_text_mask(cfg) and needs_image_mask(cfg)
    result = pretrain(cfg)
    assert result["step"] == 2 and math.isfinite(result["train"]["loss"])
    separate = micro_config(off)
    assert needs_text_mask(separate) != needs_image_mask(separate)  # separate passes: only the one in use


def test_itc_objective_reports_temperature(model, batch):
    out = ITC()(StepState(model, batch))
    assert abs(out.metrics["temp"].item() - 0.07) < 1e-6
