"""Streaming pre-training input from webdataset shards (maskvlm.data.stream): the split over
ranks and dataloader workers, exact mid-epoch resume, bad samples, resampling and mixing."""

import io
import itertools
import json
import tarfile
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

from maskvlm.data.formats import DataError
from maskvlm.data.shards import write_shards
from maskvlm.data.stream import ShardStream, Source, count_samples, deal_shards, expand_shards, open_stream, \
    shard_samples
from maskvlm.data.transforms import ImageTransform
from tests.conftest import free_ports

TRANSFORM = ImageTransform(16, [0.5] * 3, [0.5] * 3, train=True, hflip=0.5)


def _keys(samples):
    return [s["key"] for s in samples]


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, "PNG")
    return buf.getvalue()


def _make_shards(folder, counts, prefix="s"):
    """Shards of the given sizes, each sample a small PNG and a caption; keys unique overall."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(counts):
        members = []
        for j in range(n):
            key = f"{prefix}{i:03d}_{j:03d}"
            members += [(f"{key}.png", _png((i * 20 % 255, j * 9 % 255, 90))),
                        (f"{key}.txt", f"shape {i} {j}".encode())]
        _write_tar(folder / f"{i:05d}.tar", members)
    return str(folder / f"{{00000..{len(counts) - 1:05d}}}.tar")


def test_header_only_reading_gives_the_same_samples_as_webdataset(synthetic_dir, tmp_path):
    summary = write_shards(synthetic_dir / "train.json", None, tmp_path, shard_size=16, progress=False)
    path = tmp_path / "00001.tar"
    full = list(shard_samples(path))
    refs = list(shard_samples(path, headers_only=True))
    from maskvlm.data.stream import materialise
    assert [s["__key__"] for s in full] == [s["__key__"] for s in refs] and len(full) == 16
    assert all(materialise(r) == f for r, f in zip(refs, full))
    paths = expand_shards(str(tmp_path / "*.tar"))
    assert count_samples(paths) == list(summary["counts"].values())  # from shards.json
    (tmp_path / "shards.json").unlink()
    assert count_samples(paths) == list(summary["counts"].values())  # from the tar headers


def test_one_pass_covers_every_sample_once_over_ranks_and_workers(tmp_path):
    pattern = _make_shards(tmp_path, [7, 3, 9, 4, 4, 8, 2, 5, 6])  # uneven on purpose
    stream = open_stream(pattern, None, TRANSFORM, shuffle_buffer=5)
    stream.configure(None, rank=0, world=2, num_workers=2)
    seen = [s["__key__"] for slot in range(4) for s in stream.raw_items(epoch=3, slot=slot, workers=2)]
    assert len(seen) == len(set(seen)) == 48
    again = [s["__key__"] for slot in range(4) for s in stream.raw_items(epoch=4, slot=slot, workers=2)]
    assert sorted(again) == sorted(seen) and again != seen  # another epoch: another order
    # the split is balanced: no reader gets more than one shard's worth beyond its share
    shares = deal_shards(range(9), [7, 3, 9, 4, 4, 8, 2, 5, 6], [12.0] * 4)
    assert sorted(i for s in shares for i in s) == list(range(9))
    assert max(abs(sum([7, 3, 9, 4, 4, 8, 2, 5, 6][i] for i in s) - 12) for s in shares) <= 9


def _spawned_reader(rank: int, port: int, pattern: str, out: str):
    """A rank of a 2-process gloo group reading one epoch through a DataLoader with 2 workers."""
    import os

    from maskvlm.train.distributed import rank as get_rank
    from maskvlm.train.distributed import world_size

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        stream = open_stream(pattern, None, TRANSFORM, shuffle_buffer=8, seed=1)
        stream.configure(4, get_rank(), world_size(), num_workers=2)
        keys = {}
        for epoch in (0, 1):
            stream.set_position(epoch)
            loader = DataLoader(stream, batch_size=4, num_workers=2, collate_fn=_keys, drop_last=True)
            keys[epoch] = [k for batch in loader for k in batch]
        json.dump(keys, open(f"{out}/rank{rank}.json", "w"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_two_workers_see_every_sample_exactly_once_per_epoch(tmp_path):
    pattern = _make_shards(tmp_path / "shards", [12] * 8)  # 96 samples: 24 per reader, 6 batches of 4
    mp.spawn(_spawned_reader, args=(free_ports()[0], pattern, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in ("0", "1"):
        keys = ranks[0][epoch] + ranks[1][epoch]
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 48
        assert len(keys) == len(set(keys)) == 96, Counter(keys).most_common(2)
    assert ranks[0]["0"] != ranks[0]["1"]
    stream = open_stream(pattern, None, TRANSFORM)
    stream.configure(4, 0, 2, 2)
    assert "exactly once per epoch" in stream.describe()


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_mid_epoch_continues_with_the_next_samples(tmp_path, workers):
    pattern = _make_shards(tmp_path, [10] * 6)
    stream = open_stream(pattern, None, TRANSFORM, shuffle_buffer=7, seed=3)
    stream.configure(5, num_workers=workers)

    def batches(start):
        stream.set_position(2, start)
        loader = DataLoader(stream, batch_size=5, num_workers=workers, collate_fn=lambda b: b, drop_last=True)
        return [(_keys(b), torch.stack([s["image"] for s in b])) for b in loader]

    full = batches(0)
    assert len(full) == 12
    resumed = batches(5)
    assert [k for k, _ in resumed] == [k for k, _ in full[5:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, full[5:]))  # same augmentation too


def test_bad_samples_are_replaced_and_counted(tmp_path):
    good = [(f"k{j}.png", _png()) for j in range(6)] + [(f"k{j}.txt", b"a red square") for j in range(6)]
    members = sorted(good, key=lambda m: m[0])
    members[members.index(("k1.png", _png()))] = ("k1.png", b"not a png")
    members = [m for m in members if m[0] != "k3.txt"]  # no caption
    _write_tar(tmp_path / "00000.tar", members)
    stream = open_stream(str(tmp_path / "00000.tar"), None, TRANSFORM, shuffle_buffer=1)
    stream.configure(3)
    samples = list(stream)
    assert len(samples) == 6  # batch shapes kept: the bad ones are stood in for
    skipped = Counter()
    for s in samples:
        skipped.update(s["skipped"])
    assert skipped == {"not an image": 1, "bad caption": 1}


def test_a_truncated_shard_is_counted_and_the_stream_goes_on(tmp_path):
    pattern = _make_shards(tmp_path, [6, 6])
    stream = open_stream(pattern, None, TRANSFORM, shuffle_buffer=1)  # counts taken before the damage
    with tarfile.open(tmp_path / "00001.tar") as tar:
        member = tar.getmembers()[6]  # the fourth sample's image
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: member.offset_data + member.size // 2])  # cut inside it
    stream.configure(4)
    samples = list(stream)
    assert len(samples) == 12  # the epoch is still complete: stood-in samples fill it
    skipped = Counter()
    for s in samples:
        skipped.update(s["skipped"])
    assert skipped == {"truncated shard": 1}


def test_a_shard_cut_between_two_members_is_counted_too(tmp_path):
    # a cut exactly at a member boundary leaves a valid, shorter tar: only the known count tells
    pattern = _make_shards(tmp_path, [6, 6])
    stream = open_stream(pattern, None, TRANSFORM, shuffle_buffer=1)
    with tarfile.open(tmp_path / "00001.tar") as tar:
        member = tar.getmembers()[6]  # the fourth sample's image: cut just before its header
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: member.offset] + bytes(1024))  # tar's end-of-archive blocks
    with tarfile.open(tmp_path / "00001.tar") as tar:
        assert len(tar.getmembers()) == 6  # a readable archive of 3 samples
    stream.configure(4)
    samples = list(stream)
    assert len(samples) == 12
    skipped = Counter()
    for s in samples:
        skipped.update(s["skipped"])
    assert skipped == {"truncated shard": 1}


def test_resampled_mixing_follows_the_weights_and_the_declared_epoch(tmp_path):
    a = _make_shards(tmp_path / "a", [10] * 3, prefix="a")
    b = _make_shards(tmp_path / "b", [10] * 3, prefix="b")
    stream = open_stream([a, b], [3.0, 1.0], TRANSFORM, resampled=True, samples_per_epoch=400, shuffle_buffer=20)
    stream.configure(8)
    keys = [s["__key__"] for s in itertools.islice(stream.raw_items(0, 0, 1), 400)]  # the raw stream is endless
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.68 < share_a < 0.82, share_a
    assert sum(1 for _ in stream) == 400 and len(stream) == 400


def test_layout_errors_are_clear(tmp_path):
    pattern = _make_shards(tmp_path, [4, 4])
    stream = open_stream(pattern, None, TRANSFORM)
    with pytest.raises(DataError, match="2 shards for 4 readers"):
        stream.configure(2, rank=0, world=2, num_workers=2)
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        expand_shards(str(tmp_path / "{00000..00002}.tar"))
    with pytest.raises(DataError, match="2 values for 1 shard sources"):
        open_stream(pattern, [1, 2], TRANSFORM)
    with pytest.raises(DataError, match="weight must be positive"):
        ShardStream([Source.open(pattern, 0.0)], TRANSFORM)
    with pytest.raises(DataError, match="fewer than one batch"):
        open_stream(pattern, None, TRANSFORM, samples_per_epoch=3).configure(4)


def test_streamed_pretraining_resumes_to_the_same_weights(synthetic_dir, tmp_path):
    from safetensors.torch import load_file

    from maskvlm.pipeline import pretrain
    from maskvlm.train.checkpoint import list_checkpoints, load_trainer_state
    from tests.conftest import micro_config

    summary = write_shards(synthetic_dir / "train.json", None, tmp_path / "shards", shard_size=25, progress=False)

    def config(out):  # 6 batches per epoch, so step 8 is in the second epoch; dropout uses the restored RNG
        return micro_config(f"data.shards={summary['pattern']}", "data.samples_per_epoch=48", "data.num_workers=2",
                            "data.shuffle_buffer=16", "data.test=null", "train.max_steps=8", "train.save_every=3",
                            "train.keep_last=5", "model.hidden_dropout=0.1", "data.vocab_size=200",
                            f"train.output_dir={out}")
    pretrain(config(tmp_path / "full"))
    full = list_checkpoints(tmp_path / "full")
    assert (load_trainer_state(full[0])["epoch"], load_trainer_state(full[0])["batch_in_epoch"]) == (0, 3)
    pretrain(config(tmp_path / "resumed"), resume=str(full[0]))
    a = load_file(str(full[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "resumed")[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_trainer_state(full[-1])["epoch"] == 1
    # another worker count cannot continue the split: the rest of the epoch is skipped, not repeated
    pretrain(config(tmp_path / "other"), resume=str(full[0]), overrides=["data.num_workers=1"])
    assert "the rest of epoch 0 is skipped" in (tmp_path / "other" / "train.log").read_text()
    assert load_trainer_state(list_checkpoints(tmp_path / "other")[-1])["epoch"] == 1


def test_captions_come_from_txt_or_json_without_reading_images(tmp_path):
    members = [("a.png", _png()), ("a.txt", b"a red square"),
               ("b.png", _png()), ("b.json", json.dumps({"caption": "a blue circle", "image_id": 7}).encode())]
    _write_tar(tmp_path / "00000.tar", members)
    stream = open_stream(str(tmp_path / "00000.tar"), None, TRANSFORM, shuffle_buffer=1)
    assert sorted(stream.captions()) == ["a blue circle", "a red square"]
    stream.configure(2)
    assert sorted(s["caption"] for s in stream) == ["a blue circle", "a red square"]


def test_a_killed_worker_is_replaced_at_the_same_stream_position(synthetic_dir, tmp_path, monkeypatch):
    """As for map-style data (tests/train/test_integrity.py): the stream restarts where the dead worker's
    share stood, and the weights equal those of a run whose workers never died."""
    import os
    import signal

    from safetensors.torch import load_file

    from maskvlm.data.stream import ShardStream
    from maskvlm.pipeline import pretrain
    from maskvlm.train.checkpoint import list_checkpoints
    from tests.conftest import micro_config

    summary = write_shards(synthetic_dir / "train.json", None, tmp_path / "shards", shard_size=25, progress=False)

    def config(out):
        return micro_config(f"data.shards={summary['pattern']}", "data.samples_per_epoch=48", "data.num_workers=2",
                            "data.shuffle_buffer=16", "data.test=null", "train.max_steps=8", "train.save_every=8",
                            "model.hidden_dropout=0.1", "data.vocab_size=200", f"train.output_dir={out}")
    pretrain(config(tmp_path / "full"))
    decode, killed, calls = ShardStream._decode, tmp_path / "killed-once", {}

    def dying_decode(self, item, seed):
        calls[os.getpid()] = calls.get(os.getpid(), 0) + 1
        if calls[os.getpid()] == 10:  # the first worker to decode its 10th sample dies; the marker makes it once
            try:  # (a shared call counter raced: two workers could read the same count and skip the kill)
                os.close(os.open(killed, os.O_CREAT | os.O_EXCL))
                os.kill(os.getpid(), signal.SIGKILL)
            except FileExistsError:
                pass
        return decode(self, item, seed)
    monkeypatch.setattr(ShardStream, "_decode", dying_decode)
    pretrain(config(tmp_path / "killed"))
    assert "the data loader restarts" in (tmp_path / "killed" / "train.log").read_text()
    a = load_file(str(list_checkpoints(tmp_path / "full")[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "killed")[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
