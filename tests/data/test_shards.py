"""Writing and inspecting webdataset-layout tar shards (maskvlm data shard / inspect)."""

import json
import tarfile

import pytest

from maskvlm.cli import main
from maskvlm.data.formats import DataError
from maskvlm.data.shards import inspect_shards, write_shards
from maskvlm.data.stream import expand_shards, shard_samples


def test_shards_hold_every_caption_once_with_its_image(synthetic_dir, tmp_path):
    entries = json.loads((synthetic_dir / "train.json").read_text())
    summary = write_shards(synthetic_dir / "train.json", None, tmp_path, shard_size=64, progress=False)
    assert summary["samples"] == len(entries) and summary["shards"] == -(-len(entries) // 64)
    paths = expand_shards(summary["pattern"])
    samples = [s for p in paths for s in shard_samples(p)]
    assert len(samples) == len(entries) and len({s["__key__"] for s in samples}) == len(entries)
    for s, e in zip(samples, entries):
        assert set(s) == {"__key__", "__url__", "png", "txt", "json"}
        assert s["txt"].decode() == e["caption"] and s["png"] == (synthetic_dir / e["image"]).read_bytes()
        assert json.loads(s["json"])["image_id"] == e["image_id"]
    assert not list(tmp_path.glob(".*.tmp"))
    text = inspect_shards(paths, show=2)
    assert text.endswith(f"{len(paths)} shards, {len(entries)} samples") and text.count(", caption ") == 2


def test_a_caption_with_a_lone_surrogate_is_written_with_a_replacement_character(synthetic_dir, tmp_path):
    entries = json.loads((synthetic_dir / "train.json").read_text())[:3]
    entries[1]["caption"] = json.loads('"cut \\ud83d"')  # "surrogates not allowed" ended the command
    (tmp_path / "a.json").write_text(json.dumps(entries))
    summary = write_shards(tmp_path / "a.json", str(synthetic_dir), tmp_path / "out", shard_size=8, progress=False)
    samples = list(shard_samples(expand_shards(summary["pattern"])[0]))
    assert samples[1]["txt"].decode() == "cut \ufffd"


def test_inspect_flags_a_shard_holding_fewer_samples_than_listed(synthetic_dir, tmp_path):
    write_shards(synthetic_dir / "train.json", None, tmp_path, shard_size=50, progress=False)
    with tarfile.open(tmp_path / "00001.tar") as tar:
        cut = tar.getmembers()[3 * 20].offset  # the header of the 21st sample (3 members each)
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[:cut] + bytes(1024))  # a valid, shorter archive
    text = inspect_shards([tmp_path / "00000.tar", tmp_path / "00001.tar"], show=0)
    assert "00000.tar: 50 samples (png)\n" in text
    assert "00001.tar: 20 samples (png); MISMATCH: 50 listed next to it" in text


def test_caption_lists_give_one_sample_per_caption(synthetic_dir, tmp_path):
    test = json.loads((synthetic_dir / "test.json").read_text())  # one entry per image, 5 captions
    summary = write_shards(synthetic_dir / "test.json", None, tmp_path, shard_size=1000, progress=False)
    assert summary["samples"] == sum(len(e["caption"]) for e in test)
    keys = [s["__key__"] for s in shard_samples(tmp_path / "00000.tar")]
    assert keys[:2] == ["000000000_0", "000000000_1"]


def test_missing_image_and_truncated_shard_are_clear_errors(synthetic_dir, tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "nope.png", "caption": "a"}]))
    with pytest.raises(DataError, match="entry 0: image file not found"):
        write_shards(tmp_path / "ann.json", None, tmp_path / "out", progress=False)
    write_shards(synthetic_dir / "train.json", None, tmp_path / "ok", shard_size=1000, progress=False)
    data = (tmp_path / "ok" / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match="cut.tar: unreadable or truncated tar shard after"):
        list(shard_samples(tmp_path / "cut.tar"))
    with pytest.raises(FileNotFoundError, match="shard not found"):
        expand_shards(str(tmp_path / "ok" / "{00000..00003}.tar"))


def test_cli_shard_and_inspect(synthetic_dir, tmp_path, capsys):
    assert main(["data", "shard", "--data", str(synthetic_dir / "train.json"), "--out", str(tmp_path),
                 "--shard-size", "100"]) == 0
    assert "samples in 2 shards" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "*.tar"), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 shards, 200 samples" in out
    with tarfile.open(tmp_path / "00001.tar") as tar:
        assert len(tar.getnames()) == 3 * 100


def test_shards_are_not_written_over_earlier_ones(synthetic_dir, tmp_path):
    """Writing again into a folder of shards rewrote them under any run streaming them, and with a
    larger --shard-size left the old higher-numbered shards behind, read by a `*.tar` pattern."""
    write_shards(synthetic_dir / "train.json", None, tmp_path / "s", shard_size=50, progress=False)
    with pytest.raises(FileExistsError, match=r"s already holds 4 shards \(00000.tar ...\); choose another --out"):
        write_shards(synthetic_dir / "train.json", None, tmp_path / "s", shard_size=100, progress=False)
    assert len(list((tmp_path / "s").glob("*.tar"))) == 4
