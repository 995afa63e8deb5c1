"""``masking.one_image_pass``: ITC, ITM and image-conditioned MLM use the masked image's encoding, so
a step runs the image encoder once (on the visible patches) instead of twice."""

import pytest
import torch

from maskvlm.config import ConfigError
from maskvlm.objectives import StepState
from maskvlm.tasks.pretrain import PretrainTask, needs_image_mask
from tests.conftest import micro_config


def _encoder_calls(task: PretrainTask, batch) -> list[int]:
    """Tokens per image of each image-encoder call made by one forward + backward of ``task``."""
    calls = []
    hook = task.model.visual_encoder.register_forward_hook(lambda m, args, out: calls.append(out.hidden.shape[1]))
    try:
        loss, _ = task(batch)
        loss.backward()
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_a_step_encodes_the_visible_patches_once(config, model, batch, mode):
    config.masking.mode = mode
    visible = int((~batch.image_mask[0]).sum()) + 1  # [CLS] + visible patches
    whole = batch.image_mask.shape[1] + 1
    assert sorted(_encoder_calls(PretrainTask(model, config), batch)) == [visible, whole]
    config.masking.one_image_pass = True
    task = PretrainTask(model, config)
    model.zero_grad(set_to_none=True)
    assert _encoder_calls(task, batch) == [visible]
    loss, metrics = task(batch)
    assert torch.isfinite(loss) and set(metrics) >= {"itc_loss", "itm_loss", "mlm_loss", "mim_loss"}
    assert model.visual_encoder.patch_embed.weight.grad is not None


def test_every_objective_sees_the_masked_image(model, batch):
    state = StepState(model, batch, one_image_pass=True)
    assert state.image is state.masked_image
    torch.testing.assert_close(state.image_features, model.image_features(state.masked_image))
    assert state.image_context is state.masked_image.hidden  # what the masked caption attends to
    plain = StepState(model, batch)
    assert plain.image.hidden.shape[1] > state.image.hidden.shape[1]


def test_images_are_masked_even_without_an_image_objective():
    itc_only = ("loss.itm=0", "loss.mlm=0", "loss.mim=0")
    assert not needs_image_mask(micro_config(*itc_only))
    assert needs_image_mask(micro_config(*itc_only, "masking.one_image_pass=true"))


def test_settings_it_does_not_combine_with_are_refused():
    with pytest.raises(ConfigError, match="masking.one_image_pass needs masking.image_ratio in"):
        micro_config("masking.one_image_pass=true", "masking.image_ratio=0")
    with pytest.raises(ConfigError, match="masking.one_image_pass is for the two-stream model"):
        micro_config("masking.one_image_pass=true", recipe="mlim")


def test_the_accumulated_itc_pool_holds_the_masked_image_features(config, model, batch):
    """``train.accumulate_itc``: the pool's stand-ins for the other micro-batches are the features the
    step itself computes, here those of the masked images."""
    config.masking.one_image_pass = True
    task = PretrainTask(model, config)
    model.eval()  # no dropout: both encodings are deterministic
    image_feats, text_feats, _ = task.contrastive_pool([batch]).local[0]
    state = StepState(model, batch, one_image_pass=True)
    torch.testing.assert_close(image_feats, state.image_features.detach())
    torch.testing.assert_close(text_feats, state.text_features.detach())
    assert not torch.allclose(image_feats, StepState(model, batch).image_features.detach(), atol=1e-3)
