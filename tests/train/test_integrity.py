"""A checkpoint or model folder damaged after it was written (cut, changed bytes) is never loaded
silently: the checksums written with it catch it, ``--resume auto`` passes over it to the one
before, and what a run folder holds from after the resumed step is moved aside, not used. A data
loader worker that dies is replaced at the same data position, without changing the run's weights."""

import json
import logging
import os
import re
import zipfile

import pytest

from maskvlm.cli import main
from maskvlm.insight import read_metrics
from maskvlm.models.io import CHECKSUM_FILE, folder_damage, read_weights
from maskvlm.pipeline import pretrain
from maskvlm.train.checkpoint import (CHECKPOINT_FILES, checkpoint_damage, list_checkpoints, load_trainer_state,
                                      resolve_resume, save_best, save_checkpoint, set_aside_later)
from tests.conftest import micro_config


@pytest.fixture
def warnings_seen():
    """Records of the maskvlm logger (it does not propagate to the root logger)."""
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("maskvlm")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def _cut(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_inside_member(path, member):
    """Change one byte inside a member of torch's (uncompressed) zip archive."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _save(tmp_path, step, model, config):
    return save_checkpoint(tmp_path, step, model, config, None, {"step": step}, keep_last=0)


def test_checksums_are_written_and_a_changed_byte_is_caught(model, config, tmp_path):
    ckpt = _save(tmp_path, 1, model, config)
    sums = json.loads((ckpt / CHECKSUM_FILE).read_text())
    assert set(sums) == set(CHECKPOINT_FILES)
    assert all(sums[name]["bytes"] == (ckpt / name).stat().st_size for name in sums)
    assert checkpoint_damage(ckpt) is None
    assert read_weights(ckpt / "model.safetensors").keys()
    with open(ckpt / "config.yaml", "a") as f:  # a hand edit of a text file is deliberate, not damage
        f.write("# edited\n")
    assert checkpoint_damage(ckpt) is None

    _flip_last_byte(ckpt / "model.safetensors")  # inside the last tensor's data: safetensors itself reads it fine
    assert "model.safetensors is not the file that was written" in checkpoint_damage(ckpt)
    with pytest.raises(ValueError, match="damaged: model.safetensors is not the file that was written"):
        read_weights(ckpt / "model.safetensors")
    assert load_trainer_state(ckpt) == {"step": 1}  # the other files are still whole

    _cut(ckpt / "trainer_state.pt")
    with pytest.raises(ValueError, match="damaged: trainer_state.pt holds .* bytes, but .* were written"):
        load_trainer_state(ckpt)

    (ckpt / "config.yaml").unlink()
    assert checkpoint_damage(ckpt) == "config.yaml is missing"
    (ckpt / "config.yaml").write_text("{}")
    (ckpt / CHECKSUM_FILE).write_text("not json")
    assert checkpoint_damage(ckpt).startswith("checksums.json cannot be read")


def test_folders_without_checksums_are_checked_by_structure(model, config, tmp_path):
    """Folders written before checksums (or by another program): a cut weight file, a cut trainer state
    and a changed byte in the trainer state (its archive has CRCs) are still caught."""
    ckpt = _save(tmp_path, 1, model, config)
    (ckpt / CHECKSUM_FILE).unlink()
    assert checkpoint_damage(ckpt) is None
    _flip_inside_member(ckpt / "trainer_state.pt", "data.pkl")
    assert "trainer_state.pt: its member" in checkpoint_damage(ckpt)
    ckpt = _save(tmp_path, 2, model, config)
    (ckpt / CHECKSUM_FILE).unlink()
    _cut(ckpt / "trainer_state.pt")
    assert "trainer_state.pt is not a whole archive" in checkpoint_damage(ckpt)
    _cut(ckpt / "model.safetensors")
    assert "model.safetensors is not a whole safetensors file" in folder_damage(ckpt, ("model.safetensors",))
    with pytest.raises(ValueError, match="damaged: model.safetensors is not a whole safetensors file"):
        read_weights(ckpt / "model.safetensors")


def test_resume_auto_passes_over_damaged_checkpoints(model, config, tmp_path, warnings_seen):
    for step in (1, 2, 3):
        _save(tmp_path, step, model, config)
    ckpts = list_checkpoints(tmp_path)
    _cut(ckpts[2] / "trainer_state.pt")
    _flip_last_byte(ckpts[1] / "model.safetensors")
    assert resolve_resume("auto", tmp_path) == ckpts[0]
    said = [r.getMessage() for r in warnings_seen]
    assert len(said) == 2 and "step-00000003 is damaged (trainer_state.pt holds" in said[0]
    assert "step-00000002 is damaged (model.safetensors is not the file" in said[1]

    with pytest.raises(ValueError, match="step-00000003 is damaged: .* newest whole checkpoint beside it is "
                                         ".*step-00000001"):
        resolve_resume(str(ckpts[2]), None)
    with pytest.raises(ValueError, match="step-00000003 is damaged"):
        resolve_resume(str(tmp_path), None)  # a run folder: its newest checkpoint
    _cut(ckpts[0] / "model.safetensors")
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        resolve_resume("auto", tmp_path)


def test_set_aside_moves_what_follows_the_resumed_step(model, config, tmp_path, warnings_seen):
    for step in (1, 2, 3):
        _save(tmp_path, step, model, config)
    save_best(tmp_path, model, config, None, {"step": 3, "metric": "r_mean", "value": 1.0})
    moved = set_aside_later(tmp_path, 1)
    assert [p.name for p in moved] == ["step-00000002", "step-00000003", "best-step-00000003"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert not (tmp_path / "best").exists()
    assert checkpoint_damage(tmp_path / "superseded" / "step-00000003") is None  # moved whole
    assert "nothing deleted" in warnings_seen[-1].getMessage()
    _save(tmp_path, 2, model, config)
    assert [p.name for p in set_aside_later(tmp_path, 1)] == ["step-00000002-1"]  # the earlier one is kept
    assert set_aside_later(tmp_path, 1) == []


def _run_config(synthetic_dir, out, *overrides):
    return micro_config(f"data.train={synthetic_dir / 'train.json'}", f"data.val={synthetic_dir / 'val.json'}",
                        "data.test=null", f"train.output_dir={out}", "train.max_steps=4", "train.save_every=1",
                        "train.keep_last=5", "train.log_every=1", "eval.every_steps=2", *overrides)


def test_resuming_an_earlier_step_sets_the_later_run_aside(synthetic_dir, tmp_path, warnings_seen):
    """A run resumed from step 2 of 4 (a roll-back): its later checkpoints and the best weights chosen after
    step 2 are moved aside, so ``--resume auto`` cannot return to them and the best record stays true;
    the curves show the resumed stretch once."""
    run = tmp_path / "run"
    pretrain(_run_config(synthetic_dir, run))
    best = json.loads((run / "best" / "best.json").read_text())
    # make OUTPUT/best one chosen after step 2 (whichever step the short run picked)
    best["step"] = 4
    (run / "best" / "best.json").write_text(json.dumps(best))

    pretrain(_run_config(synthetic_dir, run), resume=str(run / "checkpoints" / "step-00000002"))
    said = " | ".join(r.getMessage() for r in warnings_seen)
    assert "step-00000003, step-00000004, best-step-00000004" in said
    assert "the record is dropped" in said
    assert sorted(p.name for p in (run / "superseded").iterdir()) == [
        "best-step-00000004", "step-00000003", "step-00000004"]
    assert [p.name for p in list_checkpoints(run)] == [f"step-0000000{i}" for i in (1, 2, 3, 4)]
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 4  # chosen again by the resumed run
    assert resolve_resume("auto", run).name == "step-00000004"

    train_steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    assert sum(1 for line in open(run / "metrics.jsonl") if '"train"' in line) == 6  # the file keeps both


def test_a_damaged_model_folder_is_a_clear_cli_error(synthetic_dir, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(_run_config(synthetic_dir, run, "train.max_steps=1", "data.val=null"))
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "model")]) == 0
    assert folder_damage(tmp_path / "model", ("model.safetensors",)) is None
    assert "model.safetensors" in json.loads((tmp_path / "model" / CHECKSUM_FILE).read_text())
    _flip_last_byte(tmp_path / "model" / "model.safetensors")
    assert main(["export", "--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "again")]) == 2
    assert "damaged: model.safetensors is not the file that was written" in capsys.readouterr().err


# --- a data loader worker that dies --------------------------------------------------------------------------
def _kill_workers(monkeypatch, counter, kill):
    """Make every ``PairDataset.__getitem__`` in a DataLoader worker count itself in ``counter`` (a file
    shared by all workers and loaders) and SIGKILL its own process when ``kill(n)`` for its number n."""
    import signal
    import torch.utils.data

    from maskvlm.data.formats import PairDataset

    original = PairDataset.__getitem__

    def getitem(self, key):
        if torch.utils.data.get_worker_info() is not None:
            with open(counter, "ab") as f:
                n = f.tell()
                f.write(b".")
            if kill(n):
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, key)
    monkeypatch.setattr(PairDataset, "__getitem__", getitem)


def _weights(run):
    from safetensors.torch import load_file
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


def _assert_same(a, b):
    import torch
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("loader") / "run"
    pretrain(_loader_config(synthetic_dir, run))
    return _weights(run)


def _loader_config(synthetic_dir, run, *overrides):
    return _run_config(synthetic_dir, run, "data.val=null", "data.num_workers=1", "train.max_steps=5",
                       "model.hidden_dropout=0.1", *overrides)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs POSIX signals")
def test_a_killed_loader_worker_is_replaced_at_the_same_data_position(synthetic_dir, tmp_path, monkeypatch,
                                                                      warnings_seen, uninterrupted):
    """A worker killed in the middle of the run (as the kernel's OOM killer does): the loader restarts at
    the batch it owed, and the run ends with the weights of a run whose worker never died."""
    _kill_workers(monkeypatch, tmp_path / "calls", lambda n: n == 19)  # inside the third batch of 8
    run = tmp_path / "run"
    pretrain(_loader_config(synthetic_dir, run))
    said = [r.getMessage() for r in warnings_seen]
    assert any("killed by signal" in m or "exited unexpectedly" in m for m in said), said
    # at the batch owed next: 1 or 2, as the batch the worker had made before dying may die with it
    assert any(re.search(r"the data loader restarts at epoch 0, batch [12] \(restart 1 of at most 3", m)
               for m in said), said
    _assert_same(_weights(run), uninterrupted)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs POSIX signals")
def test_workers_that_keep_dying_stop_the_run_with_a_checkpoint_to_resume(synthetic_dir, tmp_path, monkeypatch,
                                                                          uninterrupted):
    from maskvlm.train.loop import LoaderFailed

    _kill_workers(monkeypatch, tmp_path / "calls", lambda n: n >= 19)  # from the third batch on, always
    run = tmp_path / "run"
    with pytest.raises(LoaderFailed, match="died 2 times in a row .*data.max_loader_restarts=1"):
        pretrain(_loader_config(synthetic_dir, run, "data.max_loader_restarts=1"))
    # the last finished step, 1 or 2 (as above, the batch made before a death may die with the worker)
    assert list_checkpoints(run)[-1].name in ("step-00000001", "step-00000002")
    monkeypatch.undo()
    pretrain(_loader_config(synthetic_dir, run), resume="auto")
    _assert_same(_weights(run), uninterrupted)



def test_a_file_found_whole_is_hashed_once_per_process(model, config, tmp_path, monkeypatch):
    """Resume checks the checkpoint when choosing it and reads it after: one hash of each file, unless
    the file changed in between."""
    import maskvlm.models.io as io

    ckpt = _save(tmp_path, 1, model, config)
    hashed = []
    real = io.file_sha256
    monkeypatch.setattr(io, "file_sha256", lambda path, *a: hashed.append(path.name) or real(path, *a))
    assert checkpoint_damage(ckpt) is None
    read_weights(ckpt / "model.safetensors")
    load_trainer_state(ckpt)
    assert sorted(hashed) == ["model.safetensors", "trainer_state.pt"]
    _flip_last_byte(ckpt / "model.safetensors")
    assert "not the file that was written" in checkpoint_damage(ckpt)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs POSIX signals")
def test_a_batch_lost_with_its_worker_is_made_again(synthetic_dir, tmp_path, monkeypatch, warnings_seen, uninterrupted):
    """The batches a worker had handed over, but the trainer had not read, die with it: their tensors are
    shared through the dead process, and reading one fails with a connection error. torch reports a dead
    worker only if the worker already looks dead then, and an exiting process closes its sockets a moment
    before it does (seen once in CI). A slow step leaves batches queued, and each dead worker is made to
    look alive at the first check, as in that race. The loader must still restart at the batch owed."""
    import multiprocessing.process
    import time

    from maskvlm.tasks.pretrain import PretrainTask

    forward, is_alive, lied = PretrainTask.forward, multiprocessing.process.BaseProcess.is_alive, set()

    def slow_forward(self, *args, **kwargs):
        time.sleep(0.4)  # the worker meanwhile fills its prefetch slots
        return forward(self, *args, **kwargs)

    def is_alive_late(self):
        if is_alive(self) or self.pid in lied:
            return is_alive(self)
        lied.add(self.pid)
        return True
    monkeypatch.setattr(PretrainTask, "forward", slow_forward)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "is_alive", is_alive_late)
    _kill_workers(monkeypatch, tmp_path / "calls", lambda n: n == 27)  # in the fourth batch; the third is queued
    run = tmp_path / "run"
    pretrain(_loader_config(synthetic_dir, run))
    said = [r.getMessage() for r in warnings_seen]
    assert lied and any("a batch it had made was lost with it" in m for m in said), said
    assert any("the data loader restarts at epoch 0, batch 2 (restart 1" in m for m in said), said
    _assert_same(_weights(run), uninterrupted)


def test_a_loaders_workers_stop_when_its_batches_end_even_if_it_is_still_referenced():
    # A logged exception's traceback can keep the loader's iterator alive. Its workers ignore SIGTERM
    # (a Ctrl-C or scheduler signal is for the main process), so left running they made the
    # interpreter's exit (terminate, then join every child) wait forever: seen as a hung test run.
    import torch
    from torch.utils.data import DataLoader

    from maskvlm.train.loop import _fetch, _worker_init

    loader = DataLoader(torch.arange(64), batch_size=4, num_workers=2, worker_init_fn=_worker_init)
    batches = _fetch(loader)
    next(batches)
    it = batches.gi_frame.f_locals["it"]  # the reference a traceback would hold
    workers = list(it._workers)
    assert all(w.is_alive() for w in workers)
    batches.close()
    assert not any(w.is_alive() for w in workers)
    del it
