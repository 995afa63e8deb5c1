"""``train.schedule``: the learning-rate shapes, and what lengthening a run on resume does to them."""

import logging
import math

import pytest

from maskvlm.config import ConfigError
from maskvlm.pipeline import pretrain
from maskvlm.train.optim import lr_factor
from tests.conftest import micro_config


def test_each_schedule_has_its_shape():
    floor = 1e-5 / 1e-3
    cos, lin, const, cool = (lr_factor(s, 10, 110, 1e-3, 1e-5) for s in ("cosine", "linear", "constant", "cooldown"))
    for f in (cos, lin, const, cool):  # the same linear warm-up
        assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(floor + (1 - floor) * 0.5)  # half-way through the decay
    assert cos(35) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lin(35) == pytest.approx(floor + (1 - floor) * 0.75)
    assert cos(110) == pytest.approx(floor) and lin(110) == pytest.approx(floor)
    assert const(60) == const(110) == 1.0
    # cooldown: the last fifth (22 steps) decays linearly, everything before is flat
    assert cool(87) == 1.0 and cool(88) == 1.0
    assert cool(99) == pytest.approx(floor + (1 - floor) * (1 - 11 / 22))
    assert cool(110) == pytest.approx(floor)
    assert lr_factor("cooldown", 10, 110, 1e-3, 1e-5, cooldown_steps=50)(60) == pytest.approx(1.0)
    assert lr_factor("cooldown", 10, 110, 1e-3, 1e-5, cooldown_steps=50)(85) == pytest.approx(
        floor + (1 - floor) * 0.5)


def test_lengthening_a_cooldown_run_keeps_every_step_before_its_cooldown():
    short, longer = lr_factor("cooldown", 10, 100, 1e-3, 0, 20), lr_factor("cooldown", 10, 300, 1e-3, 0, 20)
    assert [short(s) for s in range(80)] == [longer(s) for s in range(80)]
    cos_short, cos_long = lr_factor("cosine", 10, 100, 1e-3, 0), lr_factor("cosine", 10, 300, 1e-3, 0)
    assert cos_short(50) != pytest.approx(cos_long(50))  # a cosine run's learning rates move


def _run(synthetic_dir, out, *overrides):
    return micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                        f"train.output_dir={out}", "train.max_steps=10", "train.save_every=2", "train.keep_last=10",
                        *overrides)


@pytest.mark.parametrize("schedule,warns", [("cosine", True), ("cooldown", False)])
def test_resuming_with_more_steps_warns_when_the_learning_rate_jumps(synthetic_dir, tmp_path, schedule, warns):
    out = tmp_path / "run"
    pretrain(_run(synthetic_dir, out, f"train.schedule={schedule}"))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("maskvlm")
    logger.addHandler(handler)
    try:
        pretrain(_run(synthetic_dir, out), resume=str(out / "checkpoints" / "step-00000004"),
                 overrides=["train.max_steps=20"])
    finally:
        logger.removeHandler(handler)
    jumps = [r.getMessage() for r in records if "the learning rate at step 4 was" in r.getMessage()]
    assert bool(jumps) == warns, jumps
    if warns:
        assert "train.schedule=cooldown" in jumps[0]


def test_bad_schedule_settings_are_refused():
    with pytest.raises(ConfigError, match="train.schedule"):
        micro_config("train.schedule=step")
    with pytest.raises(ConfigError, match="train.cooldown_steps=50 is more than train.max_steps=10"):
        micro_config("train.max_steps=10", "train.cooldown_steps=50")
