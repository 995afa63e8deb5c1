import json

import pytest
import torch
from safetensors.torch import load_file

import maskvlm.train.checkpoint as checkpoint_module
from maskvlm.models.model import MaskVLM, load_pretrained
from maskvlm.pipeline import pretrain
from maskvlm.train.checkpoint import list_checkpoints, load_trainer_state, resolve_resume
from tests.conftest import micro_config


def _config(synthetic_dir, out, *overrides):
    return micro_config(f"data.train={synthetic_dir / 'train.json'}", f"data.val={synthetic_dir / 'val.json'}",
                        f"data.test={synthetic_dir / 'test.json'}", f"train.output_dir={out}", *overrides)


def _train_losses(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_pretrain_end_to_end_loss_goes_down(synthetic_dir, tmp_path):
    cfg = _config(synthetic_dir, tmp_path / "run", "train.max_steps=40", "train.log_every=1", "train.lr=0.002",
                  "train.warmup_steps=5", "eval.every_steps=20")
    result = pretrain(cfg)
    losses = _train_losses(tmp_path / "run")
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert set(result["test"]) >= {"txt_r1", "img_r1", "txt_r10", "img_r10", "r1_mean", "itc_txt_r1"}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"]["k"] == 4
    val = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"val"' in line]
    assert [v["step"] for v in val] == [20, 40]  # every eval.every_steps, then the final weights
    assert (tmp_path / "run" / "train.log").exists()


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(synthetic_dir, tmp_path):
    # dropout on, so the restored RNG state matters as much as the data position and optimizer state
    extra = ("train.max_steps=6", "train.save_every=3", "train.keep_last=5", "model.hidden_dropout=0.1",
             "data.test=null", "data.val=null")
    pretrain(_config(synthetic_dir, tmp_path / "full", *extra))
    full = list_checkpoints(tmp_path / "full")
    assert [p.name for p in full] == ["step-00000003", "step-00000006"]
    pretrain(_config(synthetic_dir, tmp_path / "resumed", *extra), resume=str(full[0]))
    a = load_file(str(full[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "resumed")[-1] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = load_trainer_state(full[-1]), load_trainer_state(list_checkpoints(tmp_path / "resumed")[-1])
    assert (sa["step"], sa["epoch"], sa["batch_in_epoch"]) == (sb["step"], sb["epoch"], sb["batch_in_epoch"])
    # the first run's batches (8 pairs of 200) put step 6 at epoch 0, batch 6
    assert (sa["epoch"], sa["batch_in_epoch"]) == (0, 6)
    # resuming step 6 with 4 steps asked for: nothing to train, and the log says so (it said "training 4 steps")
    pretrain(_config(synthetic_dir, tmp_path / "resumed", *extra), resume="auto", overrides=["train.max_steps=4"])
    log = (tmp_path / "resumed" / "train.log").read_text()
    assert "the checkpoint is at step 6 and train.max_steps is 4: there is nothing left to train" in log


def test_checkpoints_are_pruned_and_a_failed_write_keeps_the_previous(synthetic_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(_config(synthetic_dir, run, "train.max_steps=4", "train.save_every=1", "train.keep_last=2",
                     "data.test=null"))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003", "step-00000004"]
    with pytest.raises(FileExistsError, match="--resume auto"):
        pretrain(_config(synthetic_dir, run, "train.max_steps=4", "data.test=null"))

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match=r"no space left .*step-00000004\) is intact"):
        # on resume the checkpoint's config is used; changes come as explicit overrides
        pretrain(_config(synthetic_dir, run, "data.test=null"), resume="auto", overrides=["train.max_steps=5"])
    # the save removed step 3 (pruned by it anyway) to make room and tried again, which failed too
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert resolve_resume("auto", run).name == "step-00000004"


def test_trainer_state_loads_without_unpickling_code(synthetic_dir, tmp_path):
    pretrain(_config(synthetic_dir, tmp_path / "run", "train.max_steps=1", "data.test=null"))
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 1 and "optimizer" in state and "rng" in state


def test_save_and_load_pretrained_roundtrip(model, config, tokenizer, batch, tmp_path):
    model.save_pretrained(tmp_path / "m", config, tokenizer)
    again = MaskVLM.from_pretrained(tmp_path / "m")
    assert not again.training
    model.eval()
    a = model(batch.images, batch.input_ids, batch.attention_mask)
    b = again(batch.images, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(a.image_features, b.image_features)
    torch.testing.assert_close(a.text_features, b.text_features)
    assert again.mlm_head.decoder.weight is again.text_encoder.embeddings.word_embeddings.weight
    _, cfg, tok = load_pretrained(tmp_path / "m")
    assert cfg.model == config.model and tok.vocab_size == tokenizer.vocab_size


def test_loading_into_a_different_architecture_lists_the_keys(model, config, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "m", config, tokenizer)
    cfg_path = tmp_path / "m" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("vision_layers: 2", "vision_layers: 3"))
    with pytest.raises(ValueError, match=r"missing keys \['visual_encoder.blocks.2"):
        load_pretrained(tmp_path / "m")


def test_gradient_accumulation_consumes_micro_batches(synthetic_dir, tmp_path):
    pretrain(_config(synthetic_dir, tmp_path / "run", "train.max_steps=3", "train.grad_accum=2",
                     "train.batch_size=4", "data.test=null"))
    state = load_trainer_state(list_checkpoints(tmp_path / "run")[-1])
    assert (state["step"], state["batch_in_epoch"]) == (3, 6)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    rows = [r for r in rows if r["split"] == "train"]
    assert rows[-1]["step"] == 3 and rows[-1]["samples_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_sigint_finishes_the_step_checkpoints_and_resumes(synthetic_dir, tmp_path, signame):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import MICRO
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "maskvlm.cli", "pretrain", "--data", str(synthetic_dir / "train.json"),
           "--output-dir", str(run), "--no-progress", *MICRO, "data.num_workers=1",
           "train.save_every=0", "train.log_every=1", "train.max_steps=400"]  # after MICRO: the last value wins
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    # SIGINT like Ctrl-C in a terminal, SIGTERM like a scheduler's preemption: the whole process group
    os.killpg(proc.pid, getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "--resume auto" in err
    saved = list_checkpoints(run)
    assert len(saved) == 1
    step = load_trainer_state(saved[0])["step"]
    assert 3 <= step < 400
    done = subprocess.run([sys.executable, "-m", "maskvlm.cli", "pretrain", "--output-dir", str(run), "--resume",
                           "auto", "--no-progress", f"train.max_steps={step + 2}"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {saved[0]} at step {step}" in done.stderr
    assert load_trainer_state(list_checkpoints(run)[-1])["step"] == step + 2


def _run_in_a_terminal_that_closes(synthetic_dir, run, max_steps, nohup=False):
    """Run `maskvlm pretrain` in a pseudo-terminal (progress bar on) and close the terminal after its
    third metrics line, as an ssh connection that drops; ``nohup``: started with SIGHUP ignored, as
    `nohup` starts it. Returns the exit status."""
    import os
    import select
    import signal
    import sys
    import time

    pty = pytest.importorskip("pty")
    from tests.conftest import MICRO
    cmd = [sys.executable, "-m", "maskvlm.cli", "pretrain", "--data", str(synthetic_dir / "train.json"),
           "--output-dir", str(run), *MICRO, "data.num_workers=1", "train.progress=true", "train.save_every=0",
           "train.log_every=1", f"train.max_steps={max_steps}"]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the run, in the pseudo-terminal
        if nohup:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        os.execv(sys.executable, cmd)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        if select.select([terminal], [], [], 0.2)[0]:
            os.read(terminal, 65536)  # what the terminal shows
    os.close(terminal)  # the terminal closes: the kernel sends SIGHUP to the run's processes
    return os.waitpid(pid, 0)[1]


@pytest.mark.slow
def test_a_closed_terminal_stops_the_run_with_a_checkpoint(synthetic_dir, tmp_path):
    """A run in a terminal that closes (an ssh connection dropped) gets SIGHUP, which killed it with
    every step since the last checkpoint lost (before 2026-11-24). Now it stops as for SIGTERM; its
    console output, progress bar included, goes to the null device, where writing to the closed
    terminal would fail, and train.log keeps the record."""
    import os
    run = tmp_path / "run"
    status = _run_in_a_terminal_that_closes(synthetic_dir, run, 400)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    step = load_trainer_state(list_checkpoints(run)[-1])["step"]
    assert 3 <= step < 400
    log = (run / "train.log").read_text()
    assert "received SIGHUP: finishing this step" in log and "--resume auto" in log


@pytest.mark.slow
def test_a_run_started_with_nohup_goes_on_when_its_terminal_closes(synthetic_dir, tmp_path):
    import os
    run = tmp_path / "run"
    status = _run_in_a_terminal_that_closes(synthetic_dir, run, 12, nohup=True)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert load_trainer_state(list_checkpoints(run)[-1])["step"] == 12  # trained to the end
    assert "SIGHUP" not in (run / "train.log").read_text()


@pytest.mark.slow
def test_two_fresh_processes_train_identical_weights(synthetic_dir, tmp_path):
    # tokenizer training, initialisation, augmentation, masks and negatives are all seeded
    import subprocess
    import sys

    from tests.conftest import MICRO
    weights = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "maskvlm.cli", "pretrain", "--data", str(synthetic_dir / "train.json"),
               "--output-dir", str(tmp_path / name), "--steps", "3", "--no-progress", *MICRO, "data.num_workers=1"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        weights.append(load_file(str(list_checkpoints(tmp_path / name)[-1] / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_periodic_evaluation_does_not_change_training(synthetic_dir, tmp_path):
    runs = {}
    for every in (0, 2):
        out = tmp_path / f"eval{every}"
        pretrain(_config(synthetic_dir, out, "train.max_steps=4", f"eval.every_steps={every}", "data.test=null"))
        runs[every] = load_file(str(list_checkpoints(out)[-1] / "model.safetensors"))
    assert any('"val"' in line for line in open(tmp_path / "eval2" / "metrics.jsonl"))
    assert all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_a_batch_of_one_pair_is_flagged_for_the_objectives_it_leaves_without_negatives():
    # a batch of one trained before without a word: ITC's loss 0, ITM only ever shown matching pairs
    from maskvlm.config import build_config
    from maskvlm.train.loop import no_negatives
    assert no_negatives(build_config(overrides=["train.batch_size=1"])) == ["ITC", "ITM"]
    assert no_negatives(build_config("albef", overrides=["train.batch_size=1"])) == ["ITM"]  # ITC has its queue
    assert no_negatives(build_config(overrides=["train.batch_size=1", "train.grad_accum=4",
                                                "train.accumulate_itc=true"])) == ["ITM"]
    assert no_negatives(build_config(overrides=["train.batch_size=2"])) == []


def test_a_minimum_lr_above_the_peak_is_a_warning_where_the_schedule_decays_to_it():
    from maskvlm.config import build_config
    from maskvlm.train.loop import setting_warnings
    warned = setting_warnings(build_config(overrides=["train.lr=1e-6"]))  # min_lr 1e-5
    assert warned == ["train.min_lr=1e-05 is above train.lr=1e-06: the cosine schedule goes from train.lr up to "
                      "train.min_lr after the warm-up instead of decaying"]
    assert setting_warnings(build_config(overrides=["train.lr=1e-6", "train.schedule=constant"])) == []
    assert setting_warnings(build_config()) == []


def test_a_training_file_that_changed_size_before_a_resume_starts_the_next_epoch(synthetic_dir, tmp_path,
                                                                                 maskvlm_log):
    """The data position (batch 2 of an epoch) means other samples once the file has other pairs: the
    rest of that epoch is skipped with a warning instead of continuing at a position that no longer
    matches (before 2026-11-24, silently)."""
    pairs = json.loads((synthetic_dir / "train.json").read_text())
    train = tmp_path / "train.json"
    train.write_text(json.dumps(pairs[:40]))  # 5 batches of 8
    run = tmp_path / "run"
    pretrain(micro_config(f"data.train={train}", f"data.image_root={synthetic_dir}", "data.val=null",
                          "data.test=null", f"train.output_dir={run}", "train.max_steps=2"))
    train.write_text(json.dumps(pairs[:24]))
    maskvlm_log.clear()
    pretrain(micro_config(f"train.output_dir={run}"), resume="auto", overrides=["train.max_steps=3"])
    assert "'samples': 40} and resumes with {'world': 1, 'batch_size': 8, 'samples': 24}" in maskvlm_log.text
    assert "at step 2 (epoch 1, batch 0)" in maskvlm_log.text
