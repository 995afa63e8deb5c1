import json

import pytest
import torch
from PIL import Image

from maskvlm.data.formats import (DataError, EpochSampler, PairDataset, PretrainCollator, RetrievalDataset,
                                  load_annotations)
from maskvlm.data.synthetic import COLORS, SHAPES, generate
from maskvlm.data.tokenizer import load_tokenizer, train_wordpiece
from maskvlm.data.transforms import ImageTransform, swap_left_right
from maskvlm.masking import IGNORE_INDEX


def test_synthetic_layout_and_captions(synthetic_dir):
    train = load_annotations(synthetic_dir / "train.json")
    test = load_annotations(synthetic_dir / "test.json")
    assert len(train) == 40 * 5 and all(isinstance(e["caption"], str) for e in train)
    assert len(test) == 8 and all(len(e["caption"]) == 5 for e in test)
    assert len({e["image_id"] for e in train}) == 40
    for e in test:
        assert Image.open(synthetic_dir / e["image"]).size == (32, 32)
        for obj in e["objects"]:
            assert obj["shape"] in SHAPES and obj["color"] in COLORS and len(obj["box"]) == 4


def test_synthetic_pair_captions_bind_colours_to_shapes(tmp_path):
    out = generate(tmp_path, num_train=60, num_val=0, num_test=0, image_size=32, seed=3, progress=False)
    pairs = [e for e in load_annotations(out / "train.json") if len(e["objects"]) == 2
             and e["objects"][0]["color"] + e["objects"][0]["shape"] != e["objects"][1]["color"] + e["objects"][1]["shape"]]
    assert pairs
    for e in pairs:
        left, right = e["objects"]
        assert left["box"][0] + left["box"][2] < right["box"][0] + right["box"][2]  # centres: left object first
        # every caption names each colour with its own shape (in either phrase order)
        text = e["caption"]
        assert (f"{left['color']} {left['shape']}" in text or f"{left['shape']} that is {left['color']}" in text)
        assert (f"{right['color']} {right['shape']}" in text or f"{right['shape']} that is {right['color']}" in text)


def test_synthetic_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", 5, 1, 1, 32, seed=7, progress=False)
    b = generate(tmp_path / "b", 5, 1, 1, 32, seed=7, progress=False)
    assert (a / "train.json").read_text() == (b / "train.json").read_text()
    assert (a / "images/train/000003.png").read_bytes() == (b / "images/train/000003.png").read_bytes()


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"image": "x"}', "expected a JSON list"),
    ("[]", "empty"),
    ('[{"caption": "a"}]', "entry 0 has no string field 'image'"),
    ('[{"image": "a.png", "caption": 3}]', "entry 0 field 'caption'"),
])
def test_bad_annotation_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_annotations(path)


def test_missing_image_is_a_clear_error(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "nope.png", "caption": "a"}]))
    ds = PairDataset(tmp_path / "ann.json", None, ImageTransform(32, [0.5] * 3, [0.5] * 3))
    with pytest.raises(DataError, match="nope.png"):
        ds[0]


def test_runs_started_together_generate_the_synthetic_data_once(tmp_path, maskvlm_log):
    # A process that holds the folder to generate; ours must wait for it and then find the data made,
    # not generate over the files the first one has started training on.
    import subprocess
    import sys
    import threading
    import time
    from maskvlm.data.synthetic import ensure_synthetic
    out = tmp_path / "synthetic"
    code = ("import sys; from maskvlm.folder_lock import hold_folder; from maskvlm.data.synthetic import generate\n"
            f"with hold_folder({str(out)!r}, 'synthetic data generation'):\n"
            "    print('held', flush=True); sys.stdin.read()\n"
            f"    generate({str(out)!r}, 6, 2, 2, 32, 0, progress=False)")
    first = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "held"
    done = []
    ours = threading.Thread(target=lambda: done.append(ensure_synthetic(out, 6, 2, 2, 32, 0, progress=False)))
    ours.start()
    deadline = time.time() + 30
    while "waiting for it" not in maskvlm_log.text and time.time() < deadline:
        time.sleep(0.05)
    assert "synthetic data generation, pid %d" % first.pid in maskvlm_log.text and not done
    first.stdin.close()  # the first process generates now, then lets go
    assert first.wait(60) == 0
    ours.join(60)
    assert done == [out] and "generating synthetic data" not in maskvlm_log.text
    assert len({e["image"] for e in json.loads((out / "train.json").read_text())}) == 6


def test_pair_dataset_is_reproducible_per_epoch_and_index(synthetic_dir):
    t = ImageTransform(32, [0.5] * 3, [0.5] * 3, train=True, crop_scale=(0.5, 1.0), hflip=0.5)
    ds = PairDataset(synthetic_dir / "train.json", None, t, seed=1)
    a, b, c = ds[(0, 3)], ds[(0, 3)], ds[(1, 3)]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert not torch.equal(a["image"], c["image"])
    assert ds[(0, 0)]["image_id"] == ds[(0, 4)]["image_id"] != ds[(0, 5)]["image_id"]


def test_epoch_sampler_resumes_mid_epoch():
    full = list(EpochSampler(10, seed=0, epoch=2))
    assert sorted(i for _, i in full) == list(range(10))
    assert list(EpochSampler(10, seed=0, epoch=2, start=4)) == full[4:]
    assert [i for _, i in EpochSampler(10, seed=0, epoch=3)] != [i for _, i in full]


def test_flip_swaps_left_and_right_in_the_caption():
    assert swap_left_right("a red circle on the left, Right of a square") == \
        "a red circle on the right, Left of a square"
    assert swap_left_right("leftover bright") == "leftover bright"
    image = Image.new("RGB", (16, 16))
    image.paste((255, 0, 0), (0, 0, 8, 16))  # red left half
    t = ImageTransform(16, [0, 0, 0], [1, 1, 1], train=True, crop_scale=(1.0, 1.0), hflip=1.0)
    out, flipped = t(image, torch.Generator().manual_seed(0))
    assert flipped and out[0, :, -1].mean() > 0.9 and out[0, :, 0].mean() < 0.1


def test_eval_transform_resizes_and_normalises():
    t = ImageTransform(8, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    out, flipped = t(Image.new("RGB", (20, 12), (255, 255, 255)))
    assert out.shape == (3, 8, 8) and not flipped
    torch.testing.assert_close(out, torch.ones(3, 8, 8))


def test_tokenizer_train_save_load_and_vocab_txt(tmp_path):
    tok = train_wordpiece(["a red circle left of a blue square", "two green triangles"] * 5, vocab_size=100)
    ids, mask = tok(["a red circle", "two green triangles on the left"], max_len=6)
    assert ids.shape == (2, 6) and ids[0, 0] == tok.cls_id and mask[0].sum() == 5  # [CLS] a red circle [SEP]
    assert ids[1, -1] == tok.sep_id or mask[1].sum() == 6
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert torch.equal(again(["a red circle"], 8)[0], tok(["a red circle"], 8)[0])
    vocab = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    from_vocab = load_tokenizer(tmp_path / "vocab.txt")
    assert torch.equal(from_vocab(["a red circle"], 8)[0], tok(["a red circle"], 8)[0])
    assert tok.decode(tok(["a red circle"], 8)[0][0].tolist()) == "a red circle"


def test_a_vocab_txt_with_a_repeated_line_sizes_the_model_by_its_largest_id(synthetic_dir, tmp_path, maskvlm_log):
    # A token's id is its line number, so a repeated line leaves a gap: 9 tokens with ids up to 9.
    # The model used to be sized by the count and failed with "index out of range" at the first step.
    from maskvlm.pipeline import pretrain
    from tests.conftest import micro_config
    captions = [e["caption"] for e in json.loads((synthetic_dir / "train.json").read_text())]
    trained = train_wordpiece(captions)
    vocab = [trained.id_to_token(i) for i in range(trained.vocab_size)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab[:6] + [vocab[5]] + vocab[6:]) + "\n")
    tok = load_tokenizer(tmp_path / "vocab.txt")
    assert f"{vocab[5]!r} (lines 6 and 7)" in maskvlm_log.text
    assert tok.vocab_size == len(vocab) + 1 and tok.tokenizer.token_to_id(vocab[5]) == 6
    assert 5 not in tok.ordinary_ids().tolist() and tok.mask_id not in tok.ordinary_ids().tolist()
    ids, _ = tok(captions[:50], 24)
    assert int(ids.max()) == len(vocab)  # the last token is used, one above the count of distinct tokens
    cfg = micro_config(f"data.train={synthetic_dir / 'train.json'}", "data.val=null", "data.test=null",
                       f"data.tokenizer={tmp_path / 'vocab.txt'}", f"train.output_dir={tmp_path / 'run'}",
                       "train.max_steps=2", "train.precision=fp32")
    assert pretrain(cfg)["train"]["mlm_loss"] > 0


def test_a_text_with_a_lone_surrogate_is_tokenized_with_a_replacement_character(maskvlm_log, monkeypatch):
    """JSON's "\\ud83d" escape alone (an emoji cut in half by a scraper) loads as a lone surrogate, which
    the tokenizer refused: one such caption of 20,000 ended a run while training its tokenizer."""
    from maskvlm.data import tokenizer as module
    monkeypatch.setattr(module, "_surrogates_seen", False)  # logged once a process
    caption = json.loads('"a red ball \\ud83d cut"')
    tokenizer = train_wordpiece(["a red ball cut", caption], vocab_size=100)
    ids, _ = tokenizer([caption, "a red ball \ufffd cut"], 12)
    assert torch.equal(ids[0], ids[1])
    assert "lone UTF-16 surrogate" in maskvlm_log.text


def test_collator_builds_masked_views(synthetic_dir, tokenizer):
    ds = PairDataset(synthetic_dir / "train.json", None, ImageTransform(32, [0.5] * 3, [0.5] * 3))
    collate = PretrainCollator(tokenizer, 24, text_ratio=0.3, image_ratio=0.6, grid=(4, 4), image_block=2)
    samples = [ds[(0, i)] for i in range(6)]
    batch = collate(samples)
    assert batch.images.shape == (6, 3, 32, 32) and batch.image_mask.shape == (6, 16)
    assert (batch.image_mask.sum(1) == round(0.6 * 16)).all()
    assert ((batch.mlm_labels != IGNORE_INDEX).sum(1) >= 1).all()
    again = collate(samples)
    assert torch.equal(again.mlm_input_ids, batch.mlm_input_ids) and torch.equal(again.image_mask, batch.image_mask)
    plain = PretrainCollator(tokenizer, 24)(samples)
    assert plain.mlm_input_ids is None and plain.image_mask is None


def test_fixed_text_len_pads_every_batch_to_max_len(synthetic_dir, tokenizer):
    ds = PairDataset(synthetic_dir / "train.json", None, ImageTransform(32, [0.5] * 3, [0.5] * 3))
    samples = [ds[(0, i)] for i in range(4)]
    longest = PretrainCollator(tokenizer, 40)(samples)
    assert longest.input_ids.shape[1] < 40  # padded to the longest caption
    fixed = PretrainCollator(tokenizer, 40, fixed_len=True)(samples)
    assert fixed.input_ids.shape == (4, 40)
    n = longest.input_ids.shape[1]
    assert torch.equal(fixed.input_ids[:, :n], longest.input_ids) and not fixed.attention_mask[:, n:].any()
    assert PretrainCollator(tokenizer, 40)(samples).input_ids.shape[1] == n  # the tokenizer switches back


def test_retrieval_dataset_indexes(synthetic_dir):
    ds = RetrievalDataset(synthetic_dir / "test.json", None, ImageTransform(32, [0.5] * 3, [0.5] * 3))
    assert len(ds) == 8 and len(ds.texts) == 40
    assert all(ds.txt2img[t] == i for i, ts in enumerate(ds.img2txt) for t in ts)
    assert ds[0].shape == (3, 32, 32)


def test_trained_tokenizer_is_the_same_in_every_process(tmp_path, synthetic_dir):
    # the tokenizers library hashes with a per-process random seed, so compare separate processes
    import subprocess
    import sys
    code = ("import sys; from maskvlm.data.formats import PairDataset; from maskvlm.data.tokenizer import "
            "train_wordpiece; t = train_wordpiece(PairDataset(sys.argv[1], None, None).captions(), int(sys.argv[2])); "
            "print(' '.join(t.id_to_token(i) for i in range(t.vocab_size)))")
    runs = [subprocess.run([sys.executable, "-c", code, str(synthetic_dir / "train.json"), "500"],
                           capture_output=True, text=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].split()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = train_wordpiece(["a red circle"] * 3 + ["two tiny triangles"], vocab_size=500)
    assert tok.tokenizer.encode("two red circle").tokens == ["[CLS]", "two", "red", "circle", "[SEP]"]
    assert tok.tokenizer.encode("triangles").tokens[1] == "triangles"
    assert tok.tokenizer.encode("tent").tokens == ["[CLS]", "t", "##e", "##n", "##t", "[SEP]"]  # unseen word
    assert tok.tokenizer.encode("a [MASK] circle").tokens == ["[CLS]", "a", "[MASK]", "circle", "[SEP]"]
    small = train_wordpiece(["a red circle"] * 3 + ["two tiny triangles"], vocab_size=40)  # subword trainer path
    assert small.vocab_size <= 40 and small.tokenizer.encode("red").tokens[1:-1]


def test_several_training_files_are_concatenated_each_with_its_own_image_folder(synthetic_dir, tmp_path):
    """data.train="a.json::b.json": entries of both, images relative to each file's folder, image ids
    kept apart, and a bad sample's message names its own file and line."""
    import shutil

    entries = load_annotations(synthetic_dir / "train.json")
    files = []
    # b reuses a's image_id values for its own, different images (ids are per dataset)
    b_part = [{**e, "image_id": entries[0]["image_id"]} for e in entries[10:25]]
    for name, part in (("a", entries[:10]), ("b", b_part)):
        folder = tmp_path / name
        for e in part:
            (folder / e["image"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(synthetic_dir / e["image"], folder / e["image"])
        files.append(folder / "train.json")
        files[-1].write_text(json.dumps(part))
    transform = ImageTransform(32, (0.5,) * 3, (0.5,) * 3, train=False)
    both = PairDataset(f"{files[0]}::{files[1]}", None, transform)
    assert len(both) == 25 and both.captions() == [e["caption"] for e in entries[:25]]
    alone = [PairDataset(f, None, transform) for f in files]
    assert torch.equal(both[(0, 12)]["image"], alone[1][(0, 2)]["image"])  # from b's own folder
    # image ids: within a file as before, across files never shared (the same image_id means another image)
    assert len(set(both.image_ids)) == len(set(alone[0].image_ids)) + len(set(alone[1].image_ids)) == 2 + 1
    broken = json.loads(files[1].read_text())
    broken[3]["caption"] = ""
    files[1].write_text(json.dumps(broken))
    with pytest.raises(Exception, match=f"{files[1]}: entry 3 has no usable caption"):
        PairDataset(f"{files[0]}::{files[1]}", None, transform)._load(0, 13)
    with pytest.raises(DataError, match="annotation file not found"):
        PairDataset(f"{files[0]}::{tmp_path / 'missing.json'}", None, transform)


def _photo(side_w: int, side_h: int, seed: int = 0) -> Image.Image:
    """A smooth picture with a few edges (reduced decoding is compared against full decoding)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    small = (rng.random((side_h // 16, side_w // 16, 3)) * 255).astype("uint8")
    return Image.fromarray(small).resize((side_w, side_h), Image.BICUBIC)


@pytest.mark.parametrize("train,size,dims,expected", [
    (True, 224, (1024, 1024), 2),  # smallest crop: sqrt(0.8 * 0.75) * 1024 = 793 px -> 396 at 1/2
    (False, 224, (1024, 1024), 4),  # evaluation resizes the whole image: 1024 / 4 = 256
    (True, 224, (512, 512), 1),  # 397 px crops: halving would upsample them
    (True, 64, (512, 384), 4),  # 343 px smallest crop side -> 85 at 1/4, 42 at 1/8
    (False, 64, (4096, 600), 8),  # the short side decides
    (True, 64, (64, 64), 1),
])
def test_decode_scale_never_takes_a_crop_below_the_model_size(train, size, dims, expected):
    t = ImageTransform(size, [0.5] * 3, [0.5] * 3, train=train)
    assert t.decode_scale(*dims) == expected
    assert ImageTransform(size, [0.5] * 3, [0.5] * 3, train=train, reduced_decode=False).decode_scale(*dims) == 1
    if train and expected > 1:  # every crop drawn from the reduced image keeps >= size pixels a side
        from maskvlm.data.transforms import random_resized_crop_box

        w, h = -(-dims[0] // expected), -(-dims[1] // expected)
        g = torch.Generator().manual_seed(0)
        for _ in range(2000):
            left, top, right, bottom = random_resized_crop_box(w, h, t.crop_scale, g)
            assert min(right - left, bottom - top) >= size


def test_jpegs_are_decoded_reduced_where_the_crop_allows(tmp_path):
    from maskvlm.data.formats import open_image

    _photo(1024, 768).save(tmp_path / "a.jpg", quality=95)
    _photo(1024, 768).save(tmp_path / "a.png")
    t = ImageTransform(64, [0.5] * 3, [0.5] * 3, train=False)
    assert open_image(tmp_path / "a.jpg", decode_scale=t.decode_scale).size == (128, 96)  # 768 / 8 = 96 >= 65
    assert open_image(tmp_path / "a.png", decode_scale=t.decode_scale).size == (1024, 768)  # not a JPEG: whole
    assert open_image(tmp_path / "a.jpg").size == (1024, 768)
    # the model sees nearly the same picture: at 1/8 scale the normalised tensors (std 0.5) differ by
    # 0.019 on average, 2.5 grey levels of 255 (a shifted or misscaled image differs by 10x that)
    full = t(open_image(tmp_path / "a.jpg"))[0]
    reduced = t(open_image(tmp_path / "a.jpg", decode_scale=t.decode_scale))[0]
    assert full.shape == reduced.shape == (3, 64, 64)
    assert (full - reduced).abs().mean() < 0.04, (full - reduced).abs().mean()
    shifted = t(open_image(tmp_path / "a.jpg").crop((64, 48, 1024, 768)))[0]  # what the bound must catch
    assert (full - shifted).abs().mean() > 0.1
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])  # truncated: still a bad sample when reduced
    from maskvlm.data.formats import BadSample
    with pytest.raises(BadSample, match="truncated"):
        open_image(tmp_path / "cut.jpg", decode_scale=t.decode_scale)


def test_decode_scale_for_a_planned_crop_fits_that_crop():
    from maskvlm.data.transforms import random_resized_crop_box

    t = ImageTransform(224, [0.5] * 3, [0.5] * 3, train=True)
    scales = []
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        scale = t.decode_scale(512, 512, g)  # does not advance g: the transform then draws this very box
        left, top, right, bottom = random_resized_crop_box(512, 512, t.crop_scale, g)
        assert min(right - left, bottom - top) / scale >= 224
        scales.append(scale)
    # 397-512 px crops of a 512 px image: halved where the crop has 449 px a side or more, which
    # the any-crop bound (1 here) cannot do
    assert set(scales) == {1, 2} and 0.5 < scales.count(2) / len(scales) < 0.9


def test_training_pairs_from_large_jpegs_use_reduced_decoding(tmp_path):
    for i in range(4):
        _photo(640, 480, seed=i).save(tmp_path / f"{i}.jpg", quality=90)
    (tmp_path / "train.json").write_text(json.dumps([{"image": f"{i}.jpg", "caption": "a picture"} for i in range(4)]))
    sizes = []

    class Recording(ImageTransform):
        def __call__(self, image, generator=None):
            sizes.append(image.size)
            return super().__call__(image, generator)

    out = {}
    for reduced in (True, False):
        t = Recording(64, [0.5] * 3, [0.5] * 3, train=True, hflip=0.5, reduced_decode=reduced)
        ds = PairDataset(tmp_path / "train.json", None, t)
        out[reduced] = [ds[(epoch, i)] for epoch in range(3) for i in range(4)]
    reduced_sizes, full_sizes = sizes[:12], sizes[12:]
    assert set(full_sizes) == {(640, 480)}
    assert all(w < 640 for w, _ in reduced_sizes) and len(set(reduced_sizes)) >= 1
    for a, b in zip(out[True], out[False]):
        # the same crop, flip and caption as full decoding: the crop is placed in full-size pixels
        assert a["caption"] == b["caption"]
        assert (a["image"] - b["image"]).abs().mean() < 0.04, (a["image"] - b["image"]).abs().mean()


def test_reduced_decoding_of_a_rotated_jpeg_crops_the_same_region(tmp_path):
    # EXIF orientation 6 (turned a quarter): the crop is planned on the sides as shown, 480 x 640
    from maskvlm.data.formats import open_image

    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(640, 480).save(tmp_path / "turned.jpg", quality=90, exif=exif)
    t = ImageTransform(64, [0.5] * 3, [0.5] * 3, train=True)
    for seed in range(5):
        full = t(open_image(tmp_path / "turned.jpg"), torch.Generator().manual_seed(seed))[0]
        g = torch.Generator().manual_seed(seed)
        pil = open_image(tmp_path / "turned.jpg", decode_scale=lambda w, h: t.decode_scale(w, h, g))
        assert pil.width < 480 and pil.height > pil.width  # reduced, and turned
        reduced = t(pil, g)[0]
        assert (full - reduced).abs().mean() < 0.04, (seed, (full - reduced).abs().mean())
    # PIL copies info into a crop: the full size recorded for the decoded image must not place the
    # crop's box any more (it would reach outside the cropped picture)
    from maskvlm.data.transforms import FULL_SIZE, _full_size

    part = pil.crop((0, 0, pil.width - 7, pil.height - 5))  # (a half would pass for a 1/8 decode)
    assert part.info.get(FULL_SIZE) == (480, 640) and _full_size(part) == part.size
    assert _full_size(pil) == (480, 640)


def test_a_binary_file_given_as_text_input_is_named_not_a_codec_error(tmp_path):
    """An image passed where an annotation, config or vocabulary file goes: the error names the file
    and what was expected (was "'utf-8' codec can't decode byte 0x89 in position 0")."""
    from maskvlm.config import ConfigError, build_config
    from maskvlm.data.formats import read_json_lines
    from maskvlm.data.tokenizer import load_tokenizer
    png = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(png)
    with pytest.raises(DataError, match=r"photo.png: not UTF-8 text \(byte 0: invalid start byte\); expected a JSON"):
        load_annotations(png)
    with pytest.raises(DataError, match="photo.png: not UTF-8 text"):
        read_json_lines(png)
    with pytest.raises(ConfigError, match="photo.png: not UTF-8 text .*expected a YAML config"):
        build_config("maskvlm", config_file=str(png))
    with pytest.raises(ValueError, match="photo.png: not UTF-8 text .*expected a vocab.txt"):
        load_tokenizer(png)


def test_an_empty_caption_in_an_evaluation_file_is_an_error_naming_the_entry(synthetic_dir, tmp_path):
    """Training skips and counts a blank caption; an evaluation cannot (before 2026-11-24 it ranked
    '   ' as a query and counted it in R@1)."""
    entries = json.loads((synthetic_dir / "test.json").read_text())[:4]
    entries[2]["caption"][1] = "   "
    (tmp_path / "test.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"test.json: entry 2 \(images/test/000002.png\) has an empty caption"):
        RetrievalDataset(tmp_path / "test.json", str(synthetic_dir), ImageTransform(32, [0.5] * 3, [0.5] * 3))


def test_synthetic_data_of_other_settings_goes_beside_the_existing_one_not_over_it(tmp_path, maskvlm_log):
    """Before 2026-11-24 a command with other synthetic settings regenerated data/synthetic in place:
    under a run reading it, and under a finished run that would resume on other data."""
    from maskvlm.data.synthetic import ensure_synthetic
    first = ensure_synthetic(tmp_path / "synthetic", 6, 2, 2, 32, 0, progress=False)
    before = (first / "train.json").read_text()
    other = ensure_synthetic(tmp_path / "synthetic", 4, 2, 2, 32, 0, progress=False)
    assert other == tmp_path / "synthetic-4-2-2-32px-seed0" and other != first
    assert (first / "train.json").read_text() == before
    assert len(json.loads((other / "train.json").read_text())) == 4 * 5  # 5 captions per image
    assert "made with other settings (6 train / 2 val / 2 test images of 32 px, seed 0)" in maskvlm_log.text
    assert ensure_synthetic(tmp_path / "synthetic", 6, 2, 2, 32, 0, progress=False) == first
    maskvlm_log.clear()
    assert ensure_synthetic(tmp_path / "synthetic", 4, 2, 2, 32, 0, progress=False) == other  # made once
    assert "generating" not in maskvlm_log.text
