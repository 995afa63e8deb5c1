"""`maskvlm data convert`: Karpathy split files and COCO captions files into the ALBEF layout."""

import json

import pytest

from maskvlm.cli import main
from maskvlm.data.convert import convert
from maskvlm.data.formats import DataError, PairDataset, RetrievalDataset, load_annotations


def _karpathy(synthetic_dir):
    """The synthetic train and test splits written as a Karpathy split file (every 4th training image
    as restval), with one blank caption and one image without captions."""
    images = []
    for split in ("train", "test"):
        captions: dict = {}
        for e in json.loads((synthetic_dir / f"{split}.json").read_text()):
            captions.setdefault(e["image"], []).extend(e["caption"] if isinstance(e["caption"], list)
                                                       else [e["caption"]])
        for k, (image, texts) in enumerate(captions.items()):
            folder, name = image.rsplit("/", 1)
            images.append({"filepath": folder, "filename": name, "imgid": len(images), "cocoid": 1000 + len(images),
                           "split": "restval" if split == "train" and k % 4 == 0 else split,
                           "sentences": [{"raw": c, "tokens": c.split()} for c in texts]})
    images[0]["sentences"].append({"raw": "   "})
    images.append({"filepath": "x", "filename": "none.png", "split": "val", "imgid": 99, "sentences": []})
    return {"images": images, "dataset": "synthetic"}


def test_a_karpathy_file_becomes_the_splits_the_loaders_read(synthetic_dir, tmp_path, capsys):
    source = tmp_path / "dataset_synthetic.json"
    source.write_text(json.dumps(_karpathy(synthetic_dir)))
    with pytest.raises(DataError, match="is a Karpathy split file; convert it first: maskvlm data convert"):
        load_annotations(source)
    assert main(["data", "convert", str(source), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "skipped: 1 empty or non-string caption, 1 image without a caption" in out
    # the test split reads exactly like the file it came from: same images, captions and pairing
    original = RetrievalDataset(synthetic_dir / "test.json", None, None)
    converted = RetrievalDataset(tmp_path / "out" / "synthetic_karpathy_test.json", str(synthetic_dir), None)
    assert (converted.images, converted.texts, converted.txt2img) == (original.images, original.texts,
                                                                      original.txt2img)
    # train + restval, one entry per caption, every training caption once
    train = json.loads((tmp_path / "out" / "synthetic_karpathy_train.json").read_text())
    assert all(isinstance(e["caption"], str) for e in train)
    assert sorted(e["caption"] for e in train) == sorted(PairDataset(synthetic_dir / "train.json", None,
                                                                     None).captions())
    assert len(PairDataset(tmp_path / "out" / "synthetic_karpathy_train.json", str(synthetic_dir), None)
               ) == len(train)
    assert json.loads((tmp_path / "out" / "synthetic_karpathy_val.json").read_text()) == []
    assert train[0]["image_id"] == 1000  # cocoid when there is one


def test_a_coco_captions_file_becomes_one_file_of_caption_lists(tmp_path):
    source = tmp_path / "captions_val2014.json"
    source.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}, {"id": 9, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 7, "id": 1, "caption": "A cat  on a mat. "},
                        {"image_id": 7, "id": 2, "caption": "a cat"}, {"image_id": 9, "id": 3, "caption": ""}]}))
    summary = convert(source, tmp_path / "out", prefix="val2014")
    entries = json.loads((tmp_path / "out" / "captions_val2014.json").read_text())
    assert entries == [{"image": "val2014/COCO_val2014_000000000007.jpg", "caption": ["A cat on a mat.", "a cat"],
                        "image_id": 7}]
    assert summary["skipped"] == {"empty or non-string caption": 1, "image without a caption": 1}


@pytest.mark.parametrize("data, message", [
    ({"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}, r"images\[0\]: 'split' is 'dev'"),
    ({"images": [{"split": "test", "sentences": []}]}, r"images\[0\]: expected an object with a string 'filename'"),
    ({"images": [{"filename": "a.jpg", "split": "test", "sentences": "a cat"}]}, r"'sentences' must be a list"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]},
     r"annotations\[0\]: expected an object whose 'image_id' is one of the images' 'id'"),
    ([{"image": "a.jpg", "caption": "x"}], "neither a Karpathy split file"),
])
def test_malformed_files_are_errors_naming_the_entry(data, message, tmp_path):
    source = tmp_path / "bad.json"
    source.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        convert(source, tmp_path / "out")


def _table_rows(synthetic_dir, split="train"):
    rows = []
    for e in json.loads((synthetic_dir / f"{split}.json").read_text()):
        for c in (e["caption"] if isinstance(e["caption"], list) else [e["caption"]]):
            rows.append((e["image"], c))
    return rows


def test_a_csv_table_groups_the_captions_of_each_image(synthetic_dir, tmp_path, capsys):
    import csv

    rows = _table_rows(synthetic_dir)
    source = tmp_path / "pairs.csv"
    with open(source, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "url"])
        w.writerows((image, caption, "x") for image, caption in rows)
        w.writerow([rows[0][0], "  ", "x"])  # an empty caption
        w.writerow(["", "a caption without an image", "x"])
    assert main(["data", "convert", str(source), "--out", str(tmp_path / "out")]) == 0
    assert "skipped: 1 empty or non-string caption, 1 row without an image path" in capsys.readouterr().out
    entries = json.loads((tmp_path / "out" / "pairs.json").read_text())
    assert [(e["image"], e["caption"]) for e in entries] == rows  # one training pair per row, in order
    ids = {}
    for e in entries:  # the captions of one image share its id (ITC positives), and only they do
        assert ids.setdefault(e["image"], e["image_id"]) == e["image_id"]
    assert len(set(ids.values())) == len(ids) == len({image for image, _ in rows})
    assert len(PairDataset(tmp_path / "out" / "pairs.json", str(synthetic_dir), None)) == len(rows)


def test_files_with_a_byte_order_mark_read_as_without(synthetic_dir, tmp_path):
    """Excel's "CSV UTF-8" and older Notepad start a file with U+FEFF: a JSON file was refused, a table's
    first column was named '\\ufefffilepath', a vocab.txt's first token and a class list's first name
    carried it."""
    from maskvlm.config import build_config
    from maskvlm.data.convert import convert_table
    from maskvlm.data.formats import read_json, read_json_lines
    from maskvlm.data.tokenizer import load_tokenizer, train_wordpiece
    from maskvlm.tasks.zeroshot import read_classnames

    def bom(name, text):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
        assert (tmp_path / name).read_bytes().startswith(b"\xef\xbb\xbf")
        return tmp_path / name

    rows = _table_rows(synthetic_dir)[:3]
    table = bom("pairs.tsv", "filepath\ttitle\n" + "".join(f"{image}\t{caption}\n" for image, caption in rows))
    entries, _ = convert_table(table)
    assert [(e["image"], e["caption"]) for e in entries] == rows
    assert read_json(bom("a.json", json.dumps([{"image": "x.png", "caption": "c"}]))) == [{"image": "x.png",
                                                                                             "caption": "c"}]
    assert read_json_lines(bom("a.jsonl", '{"a": 1}\n\n{"a": 2}\n')) == [(1, {"a": 1}), (3, {"a": 2})]
    assert read_classnames(bom("names.txt", "dog\ncat\n")) == ["dog", "cat"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "ball"]
    tokenizer = load_tokenizer(bom("vocab.txt", "\n".join(vocab) + "\n"))
    assert tokenizer.pad_id == 0 and tokenizer(["red ball"], 8)[0][0].tolist() == [2, 5, 6, 3]
    trained = train_wordpiece(["a red ball"] * 4, vocab_size=60)
    trained.save(str(tmp_path / "plain.json"))
    text = (tmp_path / "plain.json").read_text(encoding="utf-8")
    assert load_tokenizer(bom("tokenizer.json", text)).vocab_size == trained.vocab_size
    assert build_config(config_file=str(bom("c.yaml", "train:\n  max_steps: 7\n"))).train.max_steps == 7


def test_a_tsv_table_with_other_column_names(synthetic_dir, tmp_path):
    rows = _table_rows(synthetic_dir, "test")
    source = tmp_path / "test.tsv"
    source.write_text("caption\timage\n" + "".join(f"{c}\t{i}\n" for i, c in rows))
    with pytest.raises(DataError, match="no column 'filepath', 'title'; the header has 'caption', 'image'"):
        convert(source, tmp_path / "out")
    assert main(["data", "convert", str(source), "--out", str(tmp_path / "out"), "--image-column", "image",
                 "--caption-column", "caption"]) == 0
    got = RetrievalDataset(tmp_path / "out" / "test.json", str(synthetic_dir), None)
    original = RetrievalDataset(synthetic_dir / "test.json", None, None)
    assert got.texts == original.texts and got.img2txt == original.img2txt
    plain = tmp_path / "test.txt"  # no table suffix: the separator is named
    plain.write_text(source.read_text())
    assert main(["data", "convert", str(plain), "--out", str(tmp_path / "txt"), "--separator", "\\t",
                 "--image-column", "image", "--caption-column", "caption"]) == 0
    assert json.loads((tmp_path / "txt" / "test.json").read_text()) == json.loads(
        (tmp_path / "out" / "test.json").read_text())
    with pytest.raises(DataError, match="expected one character"):
        convert(plain, tmp_path / "bad", separator="::")


def test_image_urls_are_named_as_urls(tmp_path, capsys):
    """A web-scale table (caption, url) converted as it is, then trained on: every sample was a 'missing
    file' under the image root, '/data/https:/host/a.jpg', with the advice to check the image root."""
    from maskvlm.data.formats import root_hint
    (tmp_path / "cc.tsv").write_text("url\tcaption\nhttps://example.org/a.jpg\ta dog\nb.jpg\ta cat\n")
    assert main(["data", "convert", str(tmp_path / "cc.tsv"), "--out", str(tmp_path / "out"), "--image-column", "url",
                 "--caption-column", "caption"]) == 2
    assert "1 of 2 image paths are URLs (e.g. https://example.org/a.jpg)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert "download the images first" in root_hint("image file not found: /data/https:/example.org/a.jpg")
    assert "URL" not in root_hint("image file not found: /data/images/a.jpg")
