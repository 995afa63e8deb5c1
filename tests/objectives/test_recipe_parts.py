"""Unit tests of the parts the recipe family adds: EMA teacher, feature queue, momentum
distillation, prototypes, text-guided and modality-aware masking, CNN embedder, RECON."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskvlm.data.formats import PretrainCollator
from maskvlm.masking import IGNORE_INDEX, modality_aware_ratios, random_patch_mask, text_guided_mask
from maskvlm.models.single_stream import CNNEmbedder, DeconvDecoder
from maskvlm.objectives.itc import soft_targets
from maskvlm.objectives.prototypes import PrototypeSpace, sinkhorn, usage_entropy
from maskvlm.objectives.queue import FeatureQueue
from maskvlm.train.ema import EMATeacher


# --- EMA teacher ------------------------------------------------------------------------------------
def test_ema_update_rule_and_frozen_teacher():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMATeacher(student, decay=0.9)
    assert not any(p.requires_grad for p in ema.model.parameters())
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(5, 3))  # moves the BatchNorm running statistics (buffers)
    ema.update(student)
    s = student.state_dict()
    for name, p in ema.model.named_parameters():
        assert torch.allclose(p, 0.9 * before[name] + 0.1 * s[name]), name
    assert torch.equal(ema.model[1].running_mean, student[1].running_mean)  # buffers are copied
    ema.train()
    assert not ema.model.training  # the teacher never uses dropout / batch statistics


def test_ema_decay_must_be_below_one():
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(nn.Linear(2, 2), decay=1.0)


# --- feature queue -------------------------------------------------------------------------------------
def test_queue_fills_then_wraps_around_dropping_the_oldest():
    q = FeatureQueue(size=5, dim=2)
    assert q.contents()[0].shape == (0, 2)  # only filled slots are ever used
    for step in range(3):  # 3 batches of 2 = 6 entries into 5 slots
        ids = torch.tensor([2 * step, 2 * step + 1])
        q.enqueue(ids[:, None].float().expand(2, 2), -ids[:, None].float().expand(2, 2), ids)
        assert int(q.filled) == min(5, 2 * step + 2)
    image, text, ids = q.contents()
    assert sorted(ids.tolist()) == [1, 2, 3, 4, 5]  # id 0, the oldest, was overwritten
    assert ids.tolist() == [5, 1, 2, 3, 4] and int(q.ptr) == 1
    assert torch.equal(image[:, 0], ids.float()) and torch.equal(text[:, 0], -ids.float())


def test_queue_keeps_the_last_rows_of_a_batch_larger_than_itself():
    q = FeatureQueue(size=3, dim=1)
    ids = torch.arange(7)
    q.enqueue(ids[:, None].float(), ids[:, None].float(), ids)
    assert sorted(q.contents()[2].tolist()) == [4, 5, 6]


# --- momentum distillation -------------------------------------------------------------------------------
def test_distillation_targets_mix_ground_truth_and_teacher():
    positives = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    teacher = torch.tensor([[2.0, 0.5, -1], [0.0, 0.0, 3.0]])
    gt = soft_targets(positives, teacher, alpha=0.0)
    assert torch.allclose(gt, torch.tensor([[0.5, 0, 0.5], [0, 1, 0]]))
    assert torch.allclose(soft_targets(positives, teacher, 1.0), F.softmax(teacher, dim=1))
    mixed = soft_targets(positives, teacher, 0.4)
    assert torch.allclose(mixed, 0.4 * F.softmax(teacher, dim=1) + 0.6 * gt)
    assert torch.allclose(mixed.sum(dim=1), torch.ones(2))


def test_alpha_ramps_over_the_first_epoch(config):
    from maskvlm.models.model import build_model
    from maskvlm.tasks.pretrain import PretrainTask
    config.momentum.alpha = 0.4
    task = PretrainTask(build_model(config), config, steps_per_epoch=10)
    seen = []
    for _ in range(12):
        seen.append(task.alpha())
        task.after_step()
    assert seen[0] == pytest.approx(0.04) and seen[4] == pytest.approx(0.2)
    assert seen[9:] == [pytest.approx(0.4)] * 3


# --- prototypes -----------------------------------------------------------------------------------------
def test_sinkhorn_rows_are_distributions_and_columns_balanced():
    torch.manual_seed(0)
    scores = torch.randn(64, 8)
    q = sinkhorn(scores, eps=0.5, iters=10)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((8,), 8.0), atol=0.2)


def test_sinkhorn_does_not_collapse_where_softmax_does():
    torch.manual_seed(0)
    space = PrototypeSpace(num=8, dim=4)
    # every feature sits next to prototype 0: a plain softmax assigns nearly all of them to it
    base = F.normalize(space.weight.detach()[0], dim=0)
    feats = F.normalize(base + 0.05 * torch.randn(128, 4), dim=-1)
    soft = F.softmax(space.scores(feats) / 0.05, dim=-1)
    balanced = space.assign(feats, torch.zeros(8))
    assert usage_entropy(soft) < 0.5 * math.log(8)
    assert usage_entropy(balanced) > 0.95 * math.log(8)
    assert torch.allclose(balanced.sum(dim=1), torch.ones(128), atol=1e-5)


def test_centering_assignment_updates_its_centre():
    space = PrototypeSpace(num=4, dim=3, assign="centering", teacher_temp=0.1, center_momentum=0.5)
    center = torch.zeros(4)
    feats = F.normalize(torch.randn(10, 3), dim=-1)
    targets = space.assign(feats, center)
    assert torch.allclose(targets.sum(dim=1), torch.ones(10), atol=1e-5)
    assert torch.allclose(center, 0.5 * space.scores(feats).detach().mean(dim=0))


# --- masking policies ----------------------------------------------------------------------------------------
def test_text_guided_masking_prefers_related_patches_with_exact_counts():
    torch.manual_seed(0)
    n, draws = 16, 2000
    relevance = torch.zeros(draws, n)
    related = [1, 5, 9, 13]
    relevance[:, related] = 0.3  # cosine-like scores
    mask = text_guided_mask(relevance, ratio=0.25, temp=0.1, generator=torch.Generator().manual_seed(1))
    assert bool((mask.sum(dim=1) == 4).all())
    freq = mask.float().mean(dim=0)
    others = [i for i in range(n) if i not in related]
    assert freq[related].mean() > 2 * 0.25 and freq[others].mean() < 0.25  # random masking: 0.25 each
    assert float(freq[others].min()) > 0  # still random: every patch gets masked sometimes
    hot = text_guided_mask(relevance, 0.25, temp=100.0, generator=torch.Generator().manual_seed(1))
    assert float((hot.float().mean(dim=0) - 0.25).abs().max()) < 0.05  # a high temperature is uniform


def test_modality_aware_mode_frequencies_and_ratios():
    gen = torch.Generator().manual_seed(0)
    modes, text, image = modality_aware_ratios(20000, [0.5, 0.3, 0.2], heavy=0.8, light=0.15, generator=gen)
    freq = torch.bincount(modes, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.015)
    expected = torch.tensor([[0.0, 0.8], [0.8, 0.0], [0.15, 0.15]])  # (text, image) ratio of each mode
    assert torch.allclose(torch.stack([text, image], dim=1), expected[modes])
    mask = random_patch_mask(image[:6], 20, gen)
    assert mask.sum(dim=1).tolist() == [round(r * 20) for r in image[:6].tolist()]


def test_modality_aware_collator_leaves_the_intact_modality_alone(synthetic_dir, tokenizer, config):
    from maskvlm.data.formats import PairDataset
    from maskvlm.data.transforms import ImageTransform
    transform = ImageTransform(32, config.data.mean, config.data.std)
    samples = [PairDataset(synthetic_dir / "train.json", None, transform)[i] for i in range(24)]
    batch = PretrainCollator(tokenizer, 24, grid=(4, 4), modality_aware=([1 / 3, 1 / 3, 1 / 3], 0.8, 0.15))(samples)
    text_masked = (batch.mlm_labels != IGNORE_INDEX).sum(dim=1)
    image_masked = batch.image_mask.sum(dim=1)
    for mode, t, i in zip(batch.mask_modes.tolist(), text_masked.tolist(), image_masked.tolist()):
        if mode == 0:
            assert t == 0 and i == round(0.8 * 16)
        elif mode == 1:
            assert i == 0 and t > 0
        else:
            assert i == round(0.15 * 16) and t >= 1
    assert len(set(batch.mask_modes.tolist())) > 1


# --- CNN embedder and deconvolution decoder ---------------------------------------------------------------------
def test_cnn_embedder_receptive_fields_do_not_overlap():
    torch.manual_seed(0)
    embedder = CNNEmbedder(patch_size=8, width=16)
    images = torch.randn(1, 3, 32, 32, requires_grad=True)
    tokens = embedder(images)
    assert tokens.shape == (1, 16, 16)
    for j in (0, 5, 15):
        grad, = torch.autograd.grad(tokens[0, j].sum(), images, retain_graph=True)
        touched = grad.abs().sum(dim=(0, 1)) > 0
        row, col = divmod(j, 4)
        expected = torch.zeros(32, 32, dtype=torch.bool)
        expected[8 * row:8 * row + 8, 8 * col:8 * col + 8] = True
        assert torch.equal(touched, expected), j


def test_deconvolution_decoder_outputs_pixels_per_region():
    torch.manual_seed(0)
    decoder = DeconvDecoder(patch_size=8, width=16)
    tokens = torch.randn(1, 16, 16, requires_grad=True)
    pixels = decoder(tokens, (4, 4))
    assert pixels.shape == (1, 3, 32, 32) and 0 <= float(pixels.detach().min()) <= float(pixels.detach().max()) <= 1
    grad, = torch.autograd.grad(pixels[0, :, :8, 8:16].sum(), tokens)
    assert torch.nonzero(grad.abs().sum(dim=2)[0]).flatten().tolist() == [1]  # only region (0, 1)


def test_cnn_embedder_rejects_a_patch_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        CNNEmbedder(patch_size=12, width=16)


# --- RECON ------------------------------------------------------------------------------------------------
def test_recon_counts_only_masked_regions_unless_told_otherwise(synthetic_dir, tokenizer):
    from maskvlm.models.model import build_model
    from maskvlm.objectives.base import StepState
    from maskvlm.objectives.recon import RECON, region_pixel_mask
    from tests.conftest import micro_config
    cfg = micro_config("model.single_layers=1", recipe="mlim")
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg)
    from maskvlm.data.formats import PairDataset
    from maskvlm.data.transforms import ImageTransform
    transform = ImageTransform(32, cfg.data.mean, cfg.data.std)
    samples = [PairDataset(synthetic_dir / "train.json", None, transform)[i] for i in range(6)]
    batch = PretrainCollator(tokenizer, 24, grid=(4, 4), modality_aware=([1.0, 0.0, 0.0], 0.5, 0.1))(samples)
    state = StepState(model, batch, visible_only=False, joint=True)
    masked = RECON(cfg.data.mean, cfg.data.std, "masked")(state).loss
    everything = RECON(cfg.data.mean, cfg.data.std, "all")(state).loss
    pred = model.reconstruct(state.fused_masked_image).float()
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    squared = (pred - (batch.images * std + mean).clamp(0, 1)) ** 2
    weight = region_pixel_mask(batch.image_mask, (4, 4), 8)
    assert weight.mean() == pytest.approx(0.5)
    assert masked.item() == pytest.approx((squared * weight).flatten(1).sum(1).mean().item(), rel=1e-4)
    assert everything.item() == pytest.approx(squared.flatten(1).sum(1).mean().item(), rel=1e-4)
    assert masked < everything
