"""Looking at a model: reconstruction grids, fill-mask under changed images, Grad-CAM grounding,
the pointing game, cross-modal dependence figures and training-curve plots."""

import json

import pytest
import torch
from PIL import Image

from maskvlm import insight
from maskvlm.cli import main
from maskvlm.inference import VLM
from maskvlm.pipeline import pretrain
from tests.conftest import micro_config


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    """A micro model pre-trained for a few dozen steps (a checkpoint folder on disk)."""
    out = tmp_path_factory.mktemp("insight-run")
    cfg = micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null",
                       f"data.test={synthetic_dir / 'test.json'}", "train.max_steps=30", "eval.every_steps=0",
                       f"train.output_dir={out}", "data.vocab_size=200", "train.precision=fp32")
    pretrain(cfg)
    return out


@pytest.fixture(scope="module")
def vlm(trained):
    return VLM.from_pretrained(trained, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def entries(synthetic_dir):
    return json.loads((synthetic_dir / "test.json").read_text())


def test_reconstruction_grid_size_and_errors(vlm, synthetic_dir, entries):
    images = [synthetic_dir / e["image"] for e in entries[:3]]
    texts = [e["caption"][0] for e in entries[:3]]
    other = [e["caption"][0] for e in entries[3:6]]
    result = insight.reconstruction_grid(vlm, images, texts, other, mask_ratio=0.5, seed=1)
    cell = insight.CELL
    assert result.picture.width == 4 * (cell + 2) + 2
    assert result.picture.height == 16 + 3 * (cell + 14 + 2) + 2
    assert len(result.error_matching) == len(result.error_mismatched) == 3
    assert all(e > 0 for e in result.error_matching)
    # the same caption in both conditions gives the same error (the same mask is used)
    same = insight.reconstruction_grid(vlm, images, texts, texts, mask_ratio=0.5, seed=1)
    assert same.error_matching == pytest.approx(same.error_mismatched)
    with pytest.raises(ValueError, match="same non-zero number"):
        insight.reconstruction_grid(vlm, images, texts[:2], other)


def test_masked_patch_error_is_zero_for_a_perfect_prediction(vlm, synthetic_dir, entries, monkeypatch):
    """The error only counts masked patches, in normalised pixels: a head that returns the
    target exactly scores 0, a head off by 1 everywhere scores 1."""
    from maskvlm.models.vit import patchify

    pixels = vlm._image_tensor([synthetic_dir / entries[0]["image"]])
    mask = insight.image_masks(vlm, 1, 0.5, 0)
    target = patchify(pixels, vlm.config.model.patch_size)
    class Oracle(torch.nn.Module):
        def __init__(self, offset):
            super().__init__()
            self.offset = offset

        def forward(self, x):
            return target + self.offset

    for offset, expected in ((0.0, 0.0), (1.0, 1.0)):
        monkeypatch.setattr(vlm.model, "pixel_head", Oracle(offset))
        fill = insight.fill_masked_patches(vlm, pixels, mask, ["x"])
        assert float(fill.error[0]) == pytest.approx(expected, abs=1e-5)
        assert torch.allclose(fill.recon, pixels + offset * insight._pixel_mask(mask, 8, (4, 4)), atol=1e-5)


def test_fill_mask_compare_three_conditions(vlm, synthetic_dir, entries):
    text = "a small [MASK] circle to the left of a [MASK]"
    rows = insight.fill_mask_compare(vlm, synthetic_dir / entries[0]["image"], synthetic_dir / entries[1]["image"],
                                     text, top_k=3)
    assert len(rows) == 2
    for row in rows:
        assert set(row) == set(insight.FILL_CONDITIONS)
        for preds in row.values():
            probs = [p for _, p in preds]
            assert len(preds) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    md = insight.fill_mask_markdown(text, rows)
    assert md.count("| 1 |") == 2 and "masked image" in md
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        insight.fill_mask_compare(vlm, synthetic_dir / entries[0]["image"], synthetic_dir / entries[1]["image"],
                                  "no mask here")


def test_grounding_maps_shape_range_and_batch_independence(vlm, synthetic_dir, entries):
    images = [synthetic_dir / e["image"] for e in entries[:3]]
    texts = ["the red circle", "a blue square", "the green triangle on the left"]
    maps = insight.grounding_maps(vlm, images, texts)
    assert maps.shape == (3, 4, 4)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    single = insight.grounding_maps(vlm, images[1:2], texts[1:2])
    assert torch.allclose(single[0], maps[1], atol=1e-5)  # batching does not mix samples
    assert vlm.model.text_cross_encoder.layer[0].crossattention.attn.record is False  # hook switched off again
    with pytest.raises(ValueError, match="has 1 layers"):
        insight.grounding_maps(vlm, images[:1], texts[:1], layer=3)
    with pytest.raises(ValueError, match="grounding: text 1 is empty"):  # was a map of nothing the text says
        insight.grounding_maps(vlm, images[:2], ["the red circle", "  "])


def test_grounding_of_the_single_stream_model_reads_its_joint_attention(synthetic_dir, entries, tokenizer):
    """MLIM has no cross-attention: the text rows over the image-patch columns of one joint
    self-attention layer are weighted by their ITM gradient instead."""
    from maskvlm.models.model import build_model

    cfg = micro_config("model.single_layers=3", "train.precision=fp32", recipe="mlim")
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    single = VLM(build_model(cfg), cfg, tokenizer, device="cpu", precision="fp32")
    images = [synthetic_dir / e["image"] for e in entries[:3]]
    texts = ["the red circle", "a blue square", "the green triangle on the left"]
    maps = insight.grounding_maps(single, images, texts)
    assert maps.shape == (3, 4, 4) and float(maps.min()) == 0 and float(maps.max()) == 1
    assert torch.allclose(insight.grounding_maps(single, images[2:], texts[2:])[0], maps[2], atol=1e-5)
    assert insight.grounding_layer_name(single) == "joint attention layer 1"
    assert not any(block.attn.record for block in single.model.blocks)
    last = insight.grounding_maps(single, images, texts, layer=-1)  # only [CLS] has a gradient there
    assert last.shape == (3, 4, 4) and not torch.allclose(last, maps)
    with pytest.raises(ValueError, match="single-stream transformer has 3 layers"):
        insight.grounding_maps(single, images[:1], texts[:1], layer=3)


def test_pointing_hit_and_random_baseline_on_a_hand_made_map():
    heat = torch.zeros(4, 4)
    heat[1, 2] = 1.0  # patch row 1, column 2 of a 32 px image with 8 px patches: pixels x 16-23, y 8-15
    assert insight.pointing_hit(heat, [14, 6, 26, 18], 32)
    assert not insight.pointing_hit(heat, [0, 20, 10, 31], 32)
    assert insight._box_fraction([0, 0, 15, 15], 32) == pytest.approx(0.25)
    assert insight._box_fraction([-5, -5, 40, 40], 32) == pytest.approx(1.0)  # clipped to the image
    entry = {"objects": [{"color": "red", "shape": "circle", "box": [0, 0, 1, 1]},
                         {"color": "red", "shape": "circle", "box": [2, 2, 3, 3]},
                         {"color": "blue", "shape": "square", "box": [4, 4, 5, 5]}]}
    phrases = insight.referring_phrases(entry)  # the two red circles are ambiguous and left out
    assert phrases == [("the blue square", [4, 4, 5, 5], [[0, 0, 1, 1], [2, 2, 3, 3]])]


def test_pointing_game_and_cross_modal_figures(vlm, synthetic_dir, tmp_path):
    m = insight.pointing_game(vlm, synthetic_dir / "test.json", batch_size=4, progress=False)
    assert m["phrases"] > 0 and 0 <= m["pointing_accuracy"] <= 100 and 0 < m["uniform_random_point"] < 100
    c = insight.cross_modal_dependence(vlm, synthetic_dir / "test.json", batch_size=4, progress=False)
    assert set(c["mlm_accuracy"]) == {"matching image", "mismatched image", "masked image"}
    assert set(c["mim_l1"]) == {"matching text", "mismatched text", "empty text"}
    assert all(0 <= v <= 100 for v in c["mlm_accuracy"].values()) and all(v > 0 for v in c["mim_l1"].values())
    no_boxes = tmp_path / "plain.json"
    no_boxes.write_text(json.dumps([{"image": "a.png", "caption": ["x"]}]))
    with pytest.raises(ValueError, match="object boxes"):
        insight.pointing_game(vlm, no_boxes, progress=False)
    bad_box = tmp_path / "bad_box.json"
    bad_box.write_text(json.dumps([{"image": "a.png", "caption": "x", "objects": [{"color": "red", "box": [1, 2]}]}]))
    with pytest.raises(ValueError, match=r"bad_box.json: entry 0: objects\[0\] must be .* 'box' of 4 numbers"):
        insight.pointing_game(vlm, bad_box, progress=False)
    not_a_list = tmp_path / "dict.json"
    not_a_list.write_text('{"image": "a.png"}')
    for evaluation in (insight.pointing_game, insight.cross_modal_dependence):
        with pytest.raises(ValueError, match="dict.json: expected a JSON list of entries, got dict"):
            evaluation(vlm, not_a_list, progress=False)


def test_cli_commands_write_pictures(trained, synthetic_dir, entries, tmp_path, capsys):
    img = str(synthetic_dir / entries[0]["image"])
    assert main(["reconstruct", "--checkpoint", str(trained), "--data", str(synthetic_dir / "test.json"), "--num",
                 "3", "--out", str(tmp_path / "grid.png")]) == 0
    out = capsys.readouterr().out
    assert "mean masked-patch L1 over 3 images" in out
    assert Image.open(tmp_path / "grid.png").size == (4 * (insight.CELL + 2) + 2, 16 + 3 * (insight.CELL + 16) + 2)
    assert main(["fill-mask", "--checkpoint", str(trained), "--image", img, "--text", "a [MASK] circle",
                 "--out", str(tmp_path / "fill.md")]) == 0
    assert "mismatched image" in capsys.readouterr().out and (tmp_path / "fill.md").read_text().count("| 5 |") == 1
    assert main(["ground", "--checkpoint", str(trained), "--image", img, "--text", "the red circle", "a square",
                 "--out", str(tmp_path / "heat.png")]) == 0
    assert Image.open(tmp_path / "heat.png").size == (3 * 258 + 2, 256 + 18)
    assert main(["evaluate", "grounding", "--checkpoint", str(trained), "--no-progress",
                 "--out", str(tmp_path / "g.json")]) == 0
    assert "uniform random point" in capsys.readouterr().out
    assert json.loads((tmp_path / "g.json").read_text())["phrases"] > 0
    assert main(["evaluate", "cross-modal", "--checkpoint", str(trained), "--no-progress"]) == 0
    assert "MLM accuracy on masked tokens" in capsys.readouterr().out
    assert main(["plot", "--log", str(trained), "--out", str(tmp_path / "curves.png")]) == 0
    assert Image.open(tmp_path / "curves.png").size[0] > 400
    capsys.readouterr()
    assert main(["plot", "--log", str(trained), "--out", str(tmp_path / "bare")]) == 0  # printed "wrote bare"
    assert f"wrote {tmp_path / 'bare.png'}" in capsys.readouterr().out and (tmp_path / "bare.png").is_file()
    assert main(["reconstruct", "--checkpoint", str(trained), "--image", img, "--out", str(tmp_path / "x.png")]) == 2
    assert "needs --text" in capsys.readouterr().err


def test_plot_reports_a_missing_or_broken_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        insight.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="no records \\(1 lines are not JSON\\)"):
        insight.read_metrics(tmp_path)


def test_a_record_cut_by_a_killed_run_is_ended_before_the_next_and_skipped_by_readers(tmp_path, maskvlm_log):
    """A run killed while writing metrics.jsonl leaves a cut last line. The resumed run's records used
    to be glued onto it (both lost to every reader) and `maskvlm plot` then refused the whole file."""
    from maskvlm.train.logging import MetricsLogger, append_metrics
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "tr')
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(2, "train", {"loss": 1.5})
    logger.close()
    append_metrics(tmp_path, 2, "val", {"r_mean": 3.0})
    assert "its last line was cut short" in maskvlm_log.text
    rows = insight.read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "val")]
    assert "line 2 is not JSON" in maskvlm_log.text

    from maskvlm.ablation import _done  # an ablation's results.jsonl: the cut run is done again
    results = tmp_path / "results.jsonl"
    results.write_text('{"config": "itc", "fraction": 1.0, "seed": 0}\n{"config": "itc", "fra')
    assert list(_done(results)) == [("itc", 1.0, 0)]


def test_binding_probes_exchange_exactly_two_attributes():
    entry = {"image": "x.png", "caption": ["three large red squares",
                                           "an orange circle to the left of a white cross",
                                           "on the left an orange circle, on the right a white cross"],
             "objects": [{"color": "orange", "shape": "circle"}, {"color": "white", "shape": "cross"}]}
    probes = insight.binding_probes(entry)
    assert probes["colour"] == ("an orange circle to the left of a white cross",
                                "a white circle to the left of an orange cross")  # articles follow the colour
    assert probes["shape"] == ("an orange circle to the left of a white cross",
                               "an orange cross to the left of a white circle")
    assert probes["side"] == ("an orange circle to the left of a white cross",
                              "an orange circle to the right of a white cross")
    same_colour = {**entry, "objects": [{"color": "white", "shape": "circle"}, {"color": "white", "shape": "cross"}]}
    assert "colour" not in insight.binding_probes(same_colour)  # nothing to exchange
    assert insight.binding_probes({**entry, "objects": entry["objects"][:1]}) == {}  # one object: no probe
    assert insight.binding_probes({"image": "x.png", "caption": "a red circle"}) == {}  # no objects listed


def test_binding_test_figures_and_cli(trained, vlm, synthetic_dir, tmp_path, capsys):
    m = insight.binding_test(vlm, synthetic_dir / "test.json", batch_size=4, progress=False)
    assert m["probes"] and set(m["probes"]) <= set(insight.BINDING_PROBES)
    for r in m["probes"].values():
        assert r["pairs"] > 0 and all(0 <= r[k] <= 100 for k in ("itc_accuracy", "itm_accuracy",
                                                                "itc_accuracy_other_image", "itm_accuracy_other_image"))
    assert main(["evaluate", "binding", "--checkpoint", str(trained), "--data", str(synthetic_dir / "test.json"),
                 "--no-progress", "--out", str(tmp_path / "b.json")]) == 0
    assert "attribute binding on" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["probes"] == m["probes"]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"image": "a.png", "caption": ["x"]}]))
    with pytest.raises(ValueError, match="the binding test needs them"):
        insight.binding_test(vlm, plain, progress=False)


def test_a_side_word_preference_scores_chance_on_the_balanced_side_probe(vlm, synthetic_dir, tmp_path, monkeypatch):
    """A model that prefers captions saying "right", whatever the image, scores 50% on sides: the
    mirrored half turns its wins into losses one for one."""
    entries = json.loads((synthetic_dir / "test.json").read_text())[:4]
    data = tmp_path / "sides.json"
    data.write_text(json.dumps([{"image": str(synthetic_dir / e["image"]),
                                 "caption": [f"a red circle to the {'left' if i % 4 else 'right'} of a blue square"],
                                 "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]}
                                for i, e in enumerate(entries)]))

    def says_right(texts):
        return torch.tensor([[1.0, 0.0] if " right " in t else [0.0, 1.0] for t in texts])

    monkeypatch.setattr(VLM, "itm_score", lambda self, images, texts, batch_size=64: says_right(texts)[:, 0])
    monkeypatch.setattr(VLM, "encode_texts", lambda self, texts, batch_size=64: says_right(texts))
    monkeypatch.setattr(VLM, "encode_images", lambda self, images, batch_size=64: torch.tensor([[1.0, 0.0]] *
                                                                                                len(images)))
    side = insight.binding_test(vlm, data, progress=False)["probes"]["side"]
    assert side["pairs"] == 8 and side["itc_accuracy"] == side["itm_accuracy"] == 50.0
