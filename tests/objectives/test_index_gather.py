"""The objectives gather masked rows with index tensors (no host-device synchronisation) instead of
boolean masks; these check that the gathered rows, losses and their caching are the same."""

import dataclasses

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from maskvlm.masking import IGNORE_INDEX
from maskvlm.objectives import ITM, StepState


def test_index_gathers_equal_boolean_selection(model, batch):
    state = StepState(model, batch)
    b, n = batch.image_mask.shape
    tokens = torch.randn(b, 1 + n, 5)
    torch.testing.assert_close(state.at_masked_patches(tokens), tokens[:, 1:][batch.image_mask], rtol=0, atol=0)
    selected = batch.mlm_labels != IGNORE_INDEX
    text = torch.randn(*batch.mlm_labels.shape, 7)
    torch.testing.assert_close(state.at_mlm_positions(text), text[selected], rtol=0, atol=0)
    torch.testing.assert_close(state.at_mlm_positions(batch.mlm_labels), batch.mlm_labels[selected], rtol=0, atol=0)
    visible = batch.index("visible_patches")
    assert visible.shape == (b, int((~batch.image_mask[0]).sum()))
    assert not batch.image_mask.gather(1, visible).any()


def test_replaced_mask_is_derived_again(batch):
    first = batch.index("masked_patches")
    assert batch.index("masked_patches") is first  # cached
    batch.image_mask = ~batch.image_mask  # e.g. text-guided masking replaces the collator's mask
    torch.testing.assert_close(batch.index("masked_patches"), batch.image_mask.flatten().nonzero().squeeze(1))
    other = dataclasses.replace(batch, image_mask=batch.image_mask.roll(1, dims=1))
    torch.testing.assert_close(other.index("masked_patches"), other.image_mask.flatten().nonzero().squeeze(1))


def test_moving_to_an_accelerator_derives_indices_on_the_host(batch):
    moved = batch.to("meta")  # any non-CPU device: the indices are derived before the move
    for name, source in (("visible_patches", "image_mask"), ("masked_patches", "image_mask"),
                         ("mlm_positions", "mlm_labels")):
        src, value = moved._derived[name]
        assert src is getattr(moved, source) and value.device.type == "meta"
        assert moved.index(name) is value
        assert value.shape == batch.index(name).shape
    assert batch.to("cpu")._derived == {}


def test_itm_weights_out_rows_without_negatives(model, batch):
    batch.image_ids = torch.zeros(len(batch), dtype=torch.long)  # no row has a negative
    torch.manual_seed(0)
    out = ITM(global_negatives=False)(StepState(model, batch))
    assert not out.extras["valid"].any()
    # Reference: cross-entropy over the positive pairs alone (the negatives are weighted out).
    state = StepState(model, batch)
    fused = model.fuse(state.text.hidden, state.text.attention_mask, state.image.hidden)
    logits = model.itm_logits(fused).float()
    expected = F.cross_entropy(logits, torch.ones(len(batch), dtype=torch.long))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["itm_acc"], (logits.argmax(-1) == 1).float().mean())


class _ReadbackRecorder(TorchDispatchMode):
    """Records operators that make the host wait for a GPU (the result's size or value must be read
    back): item/bool/float, nonzero, masked_select, boolean-mask indexing."""

    NAMES = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
             "aten::_unique2", "aten::unique_dim", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in self.NAMES or bool_index:
            self.hits.append(name)
        return func(*args, **(kwargs or {}))


def test_a_pretraining_step_reads_nothing_back_from_the_device(model, config, batch):
    """What benchmarks/gpu_profile.py checks on a GPU (0 synchronisations per step), checked on CPU
    by the operators called: once the batch's indices exist (Batch.to derives them on the host
    before a GPU move), forward and backward of the default objectives read nothing back."""
    from maskvlm.tasks.pretrain import PretrainTask

    task = PretrainTask(model, config)
    with _ReadbackRecorder() as fresh:  # the detector works: deriving the indices reads back
        task(batch)[0].backward()
    assert "aten::nonzero" in fresh.hits
    task.zero_grad()
    with _ReadbackRecorder() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = task(batch)
        loss.backward()
    assert rec.hits == []
