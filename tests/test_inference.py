"""The inference API on a micro model: embeddings, similarity, ITM, fill-mask, reconstruction."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maskvlm.inference import VLM


@pytest.fixture
def vlm(model, config, tokenizer):
    return VLM(model, config, tokenizer, device="cpu", precision="fp32")


@pytest.fixture
def pairs(synthetic_dir):
    entries = json.loads((synthetic_dir / "test.json").read_text())[:3]
    return [str(synthetic_dir / e["image"]) for e in entries], [e["caption"][0] for e in entries]


def test_embeddings_are_unit_vectors_and_match_the_model(vlm, pairs, model):
    images, texts = pairs
    img, txt = vlm.encode_images(images, batch_size=2), vlm.encode_texts(texts, batch_size=2)
    assert img.shape == txt.shape == (3, model.config.embed_dim)
    assert torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        direct = model.image_features(model.encode_image(vlm._image_tensor(images)))
    assert torch.allclose(img, direct, atol=1e-5)
    assert vlm.similarity(img, txt).shape == (3, 3)


def test_itm_scores_are_probabilities_of_pairs(vlm, pairs):
    images, texts = pairs
    scores = vlm.itm_score(images, texts)
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 1)).all())
    with torch.no_grad():  # the whole fusion of each pair, every layer and token, without the shortcuts
        model = vlm.model
        text = model.encode_text(*vlm._texts(texts))
        fused = model.fuse(text.hidden, text.attention_mask, model.encode_image(vlm._image_tensor(images)).hidden)
        logits = model.itm_logits(fused).float()
    torch.testing.assert_close(scores, logits.softmax(-1)[:, 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vlm.itm_score(images, texts, log_odds=True), logits[:, 1] - logits[:, 0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 images and 3 texts"):
        vlm.itm_score(images[:2], texts)


def test_itm_scores_encode_repeated_images_and_texts_once_with_the_same_result(vlm, pairs, monkeypatch):
    images, texts = pairs
    grid_images = [im for im in images for _ in texts]  # every image with every text
    grid_texts = [t for _ in images for t in texts]
    one_by_one = torch.cat([vlm.itm_score([i], [t]) for i, t in zip(grid_images, grid_texts)])
    encoded = []
    original = vlm.model.encode_image
    monkeypatch.setattr(vlm.model, "encode_image", lambda x, **kw: encoded.append(len(x)) or original(x, **kw))
    batched = vlm.itm_score(grid_images, grid_texts, batch_size=6)
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert encoded == [2, 1]  # 9 pairs in batches of 6: images 0-1 once each, then image 2 (not 6 + 3)


def test_fill_mask_ranks_tokens_for_each_mask(vlm, pairs):
    images, _ = pairs
    out = vlm.fill_mask(images[0], "a [MASK] circle left of a [MASK] square", top_k=3)
    assert len(out) == 2 and all(len(row) == 3 for row in out)
    probs = [p for _, p in out[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    with pytest.raises(ValueError, match="no \\[MASK\\] token"):
        vlm.fill_mask(images[0], "a red circle")
    # masks past the text's cut at max_len tokens: reported as missing before, or left out without a word
    long = " ".join(["circle"] * vlm.max_len)
    with pytest.raises(ValueError, match="1 of its 1 \\[MASK\\] tokens fall after the cut"):
        vlm.fill_mask(images[0], long + " [MASK]")
    with pytest.raises(ValueError, match="1 of its 2 \\[MASK\\] tokens fall after the cut"):
        vlm.fill_mask(images[0], "a [MASK] " + long + " [MASK]")


def test_one_item_arrays_and_bad_inputs(vlm, pairs):
    """A lone string or image is one item (not a sequence of characters); uint8 arrays are images;
    anything else is an error naming the item and what was expected."""
    images, texts = pairs
    assert torch.equal(vlm.encode_texts(texts[0]), vlm.encode_texts([texts[0]]))
    assert torch.equal(vlm.encode_images(images[0]), vlm.encode_images([images[0]]))
    array = np.asarray(Image.open(images[0]).convert("RGB"))
    assert torch.equal(vlm.encode_images([array]), vlm.encode_images(images[:1]))
    assert torch.equal(vlm.encode_images(np.stack([array, array])), vlm.encode_images([images[0]] * 2))
    assert torch.equal(vlm.itm_score(images[0], texts[0]), vlm.itm_score(images[:1], texts[:1]))
    with pytest.raises(TypeError, match=r"texts\[1\]: expected a string, got NoneType"):
        vlm.encode_texts([texts[0], None])
    with pytest.raises(TypeError, match=r"images\[0\]: .* uint8 array, got an array of shape \(32, 32, 3\)"):
        vlm.encode_images([array.astype(np.float32)])
    with pytest.raises(TypeError, match="got Tensor"):
        vlm.encode_images([torch.zeros(3, 32, 32)])
    with pytest.raises(ValueError, match="batch_size=0: expected an integer of 1 or more"):  # was range()'s error
        vlm.encode_images(images[:1], batch_size=0)
    with pytest.raises(ValueError, match="batch_size=0: expected an integer of 1 or more"):
        vlm.itm_score(images[:1], texts[:1], batch_size=0)
    assert len(vlm.fill_mask(images[0], "a [MASK] circle", top_k=10**6)[0]) == vlm.tokenizer.vocab_size
    with pytest.raises(ValueError, match="top_k=-1"):
        vlm.fill_mask(images[0], "a [MASK] circle", top_k=-1)
    with pytest.raises(ValueError, match="mask_ratio=1.5"):
        vlm.reconstruct(images[0], texts[0], mask_ratio=1.5)


def test_reconstruction_keeps_visible_patches(vlm, pairs):
    images, texts = pairs
    original, masked, recon = vlm.reconstruct(images[0], texts[0], mask_ratio=0.5, seed=3)
    assert original.size == masked.size == recon.size == (32, 32)
    a, b = np.asarray(original).astype(int), np.asarray(recon).astype(int)
    same = (np.abs(a - b).max(axis=2) <= 1)  # visible patches are copied from the input
    assert 0.4 < same.mean() < 0.9


def test_from_pretrained_reloads_the_same_model(vlm, model, config, tokenizer, pairs, tmp_path):
    model.save_pretrained(tmp_path / "exported", config, tokenizer)
    again = VLM.from_pretrained(tmp_path / "exported", device="cpu", precision="fp32")
    assert torch.allclose(again.encode_texts(pairs[1]), vlm.encode_texts(pairs[1]), atol=1e-6)


def test_export_writes_a_standalone_model_folder(synthetic_dir, tmp_path, capsys):
    from maskvlm.cli import main
    from maskvlm.pipeline import pretrain
    from tests.conftest import micro_config
    pretrain(micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.test=null", "momentum.queue_size=16",
                          f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", recipe="albef"))
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "out" / "model.safetensors")).keys()
    assert not any(k.startswith(("teacher", "objectives", "model.")) for k in keys)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checksums.json", "config.yaml",
                                                                     "model.safetensors", "tokenizer.json"]
    vlm = VLM.from_pretrained(tmp_path / "out", device="cpu")
    assert vlm.encode_texts(["a red circle"]).shape[0] == 1
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) != 0
    assert "already holds model.safetensors" in capsys.readouterr().err


def test_the_readme_python_example_runs_as_written(synthetic_dir, tokenizer, tmp_path, monkeypatch):
    """The README's inference example, run verbatim against a micro model saved where it looks (runs/pre)."""
    import re
    from pathlib import Path

    from tests.conftest import save_micro_model

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "VLM.from_pretrained" in b]
    assert len(blocks) == 1, "the README should hold one inference example"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(synthetic_dir)
    save_micro_model(tmp_path / "runs" / "pre", tokenizer)
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert tuple(scope["sim"].shape) == (2, 2)
    assert all(isinstance(im, Image.Image) for im in (scope["original"], scope["masked"], scope["filled"]))
