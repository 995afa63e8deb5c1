"""Which heads a model's training has trained (``task.trained``): recorded when a run starts, carried
through fine-tuning, and used to warn about (or, for retrieval's default ranking, avoid) heads
that no run trained."""

import logging

import pytest

from maskvlm.config import build_config, list_recipes, objectives_train, trained_heads, untrained_note
from maskvlm.finetune import build_finetune_config, finetune
from maskvlm.inference import VLM
from maskvlm.models.io import read_config
from maskvlm.pipeline import pretrain, record_trained_heads
from maskvlm.tasks import retrieval
from maskvlm.tasks.retrieval import choose_score, format_table
from maskvlm.train.checkpoint import resolve_resume
from tests.conftest import LogLines, micro_config

EXPECTED = {"albef": {"itc", "itm", "mlm"}, "itc": {"itc"}, "mamo": {"itc", "itm", "mlm"},
            "maskvlm": {"itc", "itm", "mlm", "mim"}, "mlim": {"mlm", "mim"}, "semmim": {"itc", "itm", "mlm"}}


def test_each_recipe_trains_the_heads_its_losses_reach():
    assert set(list_recipes()) == set(EXPECTED)
    for recipe, heads in EXPECTED.items():
        assert objectives_train(build_config(recipe)) == heads, recipe
    cfg = build_config("maskvlm", overrides=["loss.itm=0", "loss.mim=0"])
    assert objectives_train(cfg) == {"itc", "mlm"}
    # an older pre-training checkpoint without the record: its own objectives; a fine-tuned one: unknown
    assert trained_heads(cfg) == {"itc", "mlm"}
    cfg.task.name = "vqa"
    assert objectives_train(cfg) == set() and trained_heads(cfg) is None
    note = untrained_note(build_config("itc"), ["itc", "itm", "mim"])
    assert "ITM and MIM heads" in note and "loss.itm / loss.mim / loss.recon > 0" in note and "recipe itc" in note


@pytest.fixture
def warnings_logged():
    """The ``maskvlm`` logger's warnings (it does not propagate to the root logger, so not caplog)."""
    handler = LogLines(logging.WARNING)
    logger = logging.getLogger("maskvlm")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def no_itm(synthetic_dir, tmp_path_factory):
    """A micro MaskVLM pre-trained for two steps without the ITM loss."""
    out = tmp_path_factory.mktemp("no-itm")
    pretrain(micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                          "train.max_steps=2", "loss.itm=0", f"train.output_dir={out}", "data.vocab_size=200"))
    return out


def test_runs_record_trained_heads_and_fine_tuning_adds_its_own(no_itm, synthetic_dir, tmp_path, warnings_logged):
    assert read_config(resolve_resume(str(no_itm), None)).task.trained == ["itc", "mim", "mlm"]
    base = read_config(resolve_resume(str(no_itm), None))
    retrieval._logged.clear()  # warnings are logged once per process
    assert choose_score(base) == "itc"  # the default does not re-rank with an untrained ITM head
    assert "ITM head of this model was never trained" in warnings_logged.text
    assert "ranking by ITC only" in warnings_logged.text
    warnings_logged.clear()
    assert choose_score(base) == "itc" and warnings_logged.text == ""  # once per process
    assert choose_score(base, "itm") == "itm"  # asked for explicitly: kept, with the warning
    assert "expect figures near chance" in warnings_logged.text
    assert choose_score(base, "itc") == "itc"

    extra = ["train.max_steps=1", "train.batch_size=4", "train.progress=false", "train.tensorboard=false",
             "data.num_workers=0", "eval.k=2"]
    ret = tmp_path / "ret"
    finetune(build_finetune_config("retrieval", str(no_itm), overrides=extra + [
        f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null", f"train.output_dir={ret}"]))
    tuned = read_config(resolve_resume(str(ret), None))
    assert tuned.task.trained == ["itc", "itm", "mim", "mlm"]  # retrieval fine-tuning trains ITM
    assert choose_score(tuned) == "itm"
    cfg = build_finetune_config("ve", str(no_itm), overrides=["data.max_text_len=24"])
    record_trained_heads(cfg)  # what a VE run records: its classifier is new; the heads are inherited
    assert cfg.task.trained == ["itc", "mim", "mlm"]


def test_inference_warns_once_per_untrained_head(no_itm, warnings_logged):
    vlm = VLM.from_pretrained(no_itm, device="cpu", precision="fp32")
    vlm.encode_texts(["a red circle"])
    assert warnings_logged.text == ""  # ITC was trained
    vlm.itm_score([_image()], ["a red circle"])
    vlm.itm_score([_image()], ["a red circle"])
    assert warnings_logged.text.count("itm_score: the ITM head of this model was never trained") == 1


def _image():
    from PIL import Image
    return Image.new("RGB", (32, 32), (200, 30, 30))


def test_the_table_leaves_out_re_ranking_when_there_was_none():
    m = {f"{p}{d}_r{k}": 1.0 for p in ("", "itc_") for d in ("txt", "img") for k in (1, 5, 10)}
    m.update(r1_mean=1.0, r_mean=1.0, k=0.0)
    text = format_table(m)
    assert "ITC rank" in text and "re-rank" not in text and "mean R@1 (TR, IR): 1.0" in text
