"""``data.train_weights``: several training files mixed by weight, epoch by epoch, resumable."""

from collections import Counter

import pytest

from maskvlm.config import ConfigError
from maskvlm.data.formats import EpochSampler, mixed_order
from tests.conftest import micro_config


def _source(index: int, sizes: list[int]) -> int:
    for s, size in enumerate(sizes):
        if index < size:
            return s
        index -= size
    raise AssertionError(index)


def test_each_epoch_takes_the_weighted_share_of_each_source():
    sizes, weights = [100, 30, 20], [1, 1, 2]
    for epoch in range(3):
        order = mixed_order(sizes, weights, seed=0, epoch=epoch)
        assert len(order) == 150
        assert Counter(_source(i, sizes) for i in order) == {0: 38, 1: 37, 2: 75}  # 37.5 / 37.5 / 75, rounded
    assert mixed_order(sizes, weights, 0, 1) == mixed_order(sizes, weights, 0, 1)  # (seed, epoch) fix it
    assert mixed_order(sizes, weights, 0, 1) != mixed_order(sizes, weights, 1, 1)


def test_a_source_is_read_through_before_anything_repeats():
    sizes, weights = [100, 30, 20], [1, 1, 2]
    seen = []
    for epoch in range(3):  # source 0 gives 38 per epoch: its 100 samples once in the first 114 draws
        seen += [i for i in mixed_order(sizes, weights, 0, epoch) if i < 100]
    assert len(set(seen[:100])) <= 100 and sorted(set(seen)) == list(range(100))
    # source 2 (20 samples, 75 per epoch) repeats its samples evenly: 3 or 4 times each in an epoch
    draws = Counter(i for i in mixed_order(sizes, weights, 0, 0) if i >= 130)
    assert set(draws.values()) <= {3, 4} and len(draws) == 20


def test_a_zero_weight_leaves_a_source_out_and_the_sampler_splits_ranks():
    sizes = [10, 10]
    assert all(i >= 10 for i in mixed_order(sizes, [0, 1], 0, 0))
    parts = [list(EpochSampler(20, 0, 0, rank=r, world=2, mix=(sizes, [0, 1]))) for r in range(2)]
    assert sum(len(p) for p in parts) == 20 and all(i >= 10 for p in parts for _, i in p)


def test_weights_mix_the_training_files_and_resume_exactly(synthetic_dir, tmp_path):
    """A mix of the train file and a file of broken images, weighted 1:0, never draws a broken
    image; a run resumed at step 2 ends with the uninterrupted run's weights."""
    import json

    from safetensors.torch import load_file

    from maskvlm.pipeline import pretrain

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"image": f"missing{i}.png", "caption": "a red circle", "image_id": i}
                                  for i in range(40)]))
    data = f"data.train={synthetic_dir / 'train.json'}::{broken}"

    def run(out, *extra, resume=None):
        cfg = micro_config(data, "data.val=null", "data.test=null", f"train.output_dir={out}", "train.max_steps=4",
                           "train.save_every=2", "train.keep_last=5", "data.train_weights=[1, 0]",
                           "train.precision=fp32", *extra)
        return pretrain(cfg, resume=resume, overrides=list(extra) if resume else None)

    result = run(tmp_path / "whole")
    assert result["train"]["skipped_samples"] == 0  # the 0-weighted broken file was never drawn
    run(tmp_path / "part", "train.max_steps=2")
    run(tmp_path / "part", "train.max_steps=4", resume="auto")
    whole, part = (load_file(str(tmp_path / r / "checkpoints" / "step-00000004" / "model.safetensors"))
                   for r in ("whole", "part"))
    assert all((whole[k] == part[k]).all() for k in whole)
    with pytest.raises(ConfigError, match="data.train_weights has 3 values for 2 training files"):
        run(tmp_path / "bad", "data.train_weights=[1, 1, 1]")


def test_bad_weights_are_refused():
    for bad in ("[]", "[-1, 2]", "[0, 0]", "[a, 1]"):
        with pytest.raises(ConfigError, match="data.train_weights"):
            micro_config(f"data.train_weights={bad}")
