import subprocess
import sys

import pytest

from maskvlm.cli import build_parser, main


def _help(*argv):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])


def test_pretrain_help_describes_every_option(capsys):
    _help("pretrain")
    out = capsys.readouterr().out
    for option in ("--recipe", "--preset", "--config", "--data", "--image-root", "--output-dir", "--resume",
                   "--steps", "--device", "--print-config", "key.sub=value"):
        assert option in out


def test_evaluate_help_describes_every_option(capsys):
    _help("evaluate", "retrieval")
    out = capsys.readouterr().out
    for option in ("--checkpoint", "--data", "--image-root", "--k", "--score", "--batch-size", "--device",
                   "--precision", "--out"):
        assert option in out


def test_version_names_maskvlm_python_and_torch(capsys):
    import torch

    import maskvlm

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"maskvlm {maskvlm.__version__} (") and f"torch {torch.__version__}" in out


def test_config_error_exits_2_with_the_key(capsys):
    assert main(["pretrain", "train.nope=1", "--print-config"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err


def test_print_config_and_recipes(capsys):
    assert main(["pretrain", "--print-config", "--steps", "5"]) == 0
    assert "max_steps: 5" in capsys.readouterr().out
    assert main(["recipes"]) == 0
    assert "maskvlm" in capsys.readouterr().out


@pytest.mark.slow
def test_console_script_pretrain_then_evaluate(synthetic_dir, tmp_path):
    from tests.conftest import MICRO
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "maskvlm.cli", "pretrain", "--data", str(synthetic_dir / "train.json"),
           "--test-data", str(synthetic_dir / "test.json"), "--output-dir", str(run), "--steps", "3",
           "--no-progress", *MICRO]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "image (text->image)" in done.stdout and "R@10" in done.stdout
    out_json = tmp_path / "metrics.json"
    done = subprocess.run([sys.executable, "-m", "maskvlm.cli", "evaluate", "retrieval", "--checkpoint", str(run),
                           "--k", "2", "--out", str(out_json), "--no-progress"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ITM re-rank k=2" in done.stdout and out_json.exists()


def test_finetune_help_and_missing_checkpoint(capsys):
    _help("finetune")
    out = capsys.readouterr().out
    for text in ("retrieval", "vqa", "nlvr2", "ve", "--checkpoint", "--data", "--val-data", "--test-data",
                 "--image-root", "--resume", "--print-config"):
        assert text in out
    for task in ("vqa", "nlvr2", "ve"):
        _help("evaluate", task)
        assert "--predictions" in capsys.readouterr().out
    assert main(["finetune", "vqa"]) == 2
    assert "pass --checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["evaluate", "retrieval", "--checkpoint", "x", "--batch-size", "0"], "--batch-size: 0: expected an integer of 1"),
    (["evaluate", "retrieval", "--checkpoint", "x", "--k", "-1"], "--k: -1: expected an integer of 0 or more"),
    (["search", "--index", "x", "--query", "red", "--top-k", "two"], "--top-k: 'two': expected an integer"),
    (["reconstruct", "--checkpoint", "x", "--out", "y.png", "--mask-ratio", "1.5"], "--mask-ratio: 1.5: expected a "
                                                                                     "value in [0, 1]"),
    (["evaluate", "linear-probe", "--checkpoint", "x", "--val-fraction", "0"], "--val-fraction: 0: expected a value "
                                                                               "in (0, 1)"),
    (["data", "synthetic", "--out", "x", "--num-train", "0"], "--num-train: 0: expected an integer of 1 or more"),
    (["data", "synthetic", "--out", "x", "--image-size", "8"], "--image-size: 8: expected at least 16 pixels"),
    # checked before the work: a batch reconstruction failed in PIL's save after rendering every image
    (["reconstruct", "--checkpoint", "x", "--data", "d.json", "--out", "grid"], "--out: grid: expected an image file"),
    (["ground", "--checkpoint", "x", "--image", "a.png", "--text", "t", "--out", "g.txt"], "--out: g.txt: expected"),
])
def test_out_of_range_numbers_are_refused_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_or_empty_checkpoint_folders_are_named(tmp_path, capsys):
    assert main(["evaluate", "retrieval", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert f"checkpoint not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert main(["fill-mask", "--checkpoint", str(tmp_path), "--image", "a.png", "--text", "a [MASK]"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: not a model folder (no model.safetensors) and no complete checkpoint" in err


def test_evaluate_task_on_a_malformed_file_exits_2_naming_it(tmp_path, capsys):
    bad = tmp_path / "dev.json"
    bad.write_text('{"identifier": "dev-1-0-0", "sentence": "s", "label": 1}\n')
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.yaml").write_text("task: {name: nlvr2}\n")
    (folder / "classes.json").write_text('["False", "True"]')
    (folder / "tokenizer.json").write_text("{}")
    assert main(["evaluate", "nlvr2", "--checkpoint", str(folder), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"maskvlm evaluate: error: {bad}: line 1 (dev-1-0-0): field 'label'" in err


def test_overrides_may_follow_options_that_take_several_values(monkeypatch):
    """`--seeds 0 1 train.clip_grad=0` must give the override to the config, not to --seeds."""
    import maskvlm.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_ablate", lambda args: seen.update(seeds=args.seeds, overrides=args.overrides) or 0)
    assert main(["ablate", "--seeds", "0", "1", "train.clip_grad=0", "--fractions", "0.5", "loss.mim=0"]) == 0
    assert seen == {"seeds": [0, 1], "overrides": ["train.clip_grad=0", "loss.mim=0"]}


def test_folder_outputs_given_a_file_name_it(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    model = tmp_path / "model"
    model.mkdir()
    assert main(["export", "--checkpoint", str(model), "--out", str(taken)]) == 2
    assert f"{taken} is a file; --out names a folder" in capsys.readouterr().err  # was "[Errno 17] File exists"
    assert main(["pretrain", "--output-dir", str(taken), "--print-config"]) == 0  # nothing is written
    capsys.readouterr()
    assert main(["pretrain", "--output-dir", str(taken), "--steps", "1"]) == 2
    assert f"{taken} is a file, not a folder; pass another --output-dir" in capsys.readouterr().err  # was [Errno 17]


def test_a_full_disk_is_a_clear_error_and_an_interrupted_export_leaves_no_partial_model(tmp_path, capsys,
                                                                                      monkeypatch, model, config):
    import safetensors.torch

    source = model.save_pretrained(tmp_path / "model", config)
    real = safetensors.torch.save_file

    def full(tensors, path, metadata=None):  # writes part of the file, then fails as safetensors does
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(source), "--out", str(out)]) == 1
    assert "maskvlm export: error: no space left on the device (Error while serializing" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main(["export", "--checkpoint", str(source), "--out", str(out)]) == 0  # once there is room


def test_a_data_error_in_a_loader_worker_is_one_clear_line_with_the_backslash_hint(synthetic_dir, tmp_path, capsys):
    """A training file written on Windows (images\\train\\x.png): every image is missing. The error is
    raised in a DataLoader worker, which torch re-raises with the worker's traceback as its message;
    the CLI prints the message alone (before 2026-11-24, the traceback) and names the backslashes."""
    import json

    from tests.conftest import MICRO
    entries = json.loads((synthetic_dir / "train.json").read_text())
    for e in entries:
        e["image"] = e["image"].replace("/", "\\")
    train = tmp_path / "win.json"
    train.write_text(json.dumps(entries))
    code = main(["pretrain", "--data", str(train), "--image-root", str(synthetic_dir), "--output-dir",
                 str(tmp_path / "run"), "--no-progress", *MICRO, "data.num_workers=1", "data.test=null",
                 "data.val=null"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith(f"maskvlm pretrain: error: {train}: 32 bad samples in a row ({{'missing file': 32}})")
    assert "The image paths hold backslashes (Windows separators?)" in err


def test_a_path_that_cannot_be_written_is_one_line_naming_it(monkeypatch, capsys):
    """e.g. --output-dir on a read-only disk: the OS error's path and reason, exit 2 (was a traceback)."""
    import errno

    import maskvlm.cli as cli

    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")
    monkeypatch.setattr(cli, "_pretrain", read_only)
    assert main(["pretrain"]) == 2
    assert capsys.readouterr().err.strip() == "maskvlm pretrain: error: /mnt/ro/run: Read-only file system"

    def other(args):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(cli, "_pretrain", other)
    with pytest.raises(OSError, match="Input/output error"):  # anything else keeps its traceback
        main(["pretrain"])


def test_an_out_file_that_is_a_folder_is_refused_before_the_evaluation(tmp_path, capsys):
    """The metrics were computed, then writing them failed with IsADirectoryError (a traceback)."""
    with pytest.raises(SystemExit):
        main(["evaluate", "retrieval", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert f"argument --out: {tmp_path} is a folder; it names the file to write" in capsys.readouterr().err


def test_a_leading_tilde_in_a_path_option_is_the_home_folder(tmp_path, capsys, monkeypatch):
    """No shell expands `--checkpoint=~/x`: it named a folder `~` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "metrics.json").mkdir()
    with pytest.raises(SystemExit):
        main(["evaluate", "retrieval", "--checkpoint=~/none", "--out=~/metrics.json"])
    assert f"argument --out: {tmp_path}/metrics.json is a folder" in capsys.readouterr().err
    assert main(["export", "--checkpoint=~/none", "--out=~/model"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/none" in err and "~" not in err


def test_output_into_a_closed_pipe_ends_quietly():
    """`maskvlm recipes | head -1`: the reader leaves; the command used to end in a BrokenPipeError
    traceback. Now it stops quietly with the status of a process SIGPIPE ends (141)."""
    proc = subprocess.Popen([sys.executable, "-m", "maskvlm.cli", "recipes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command writes: the pipe has no reader
    err = proc.stderr.read()
    assert proc.wait(60) == 141 and "Traceback" not in err, err


def test_val_and_test_data_flags_take_none_for_no_evaluation(capsys):
    assert main(["pretrain", "--val-data", "none", "--test-data", "NULL", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "  val: null\n" in out and "  test: null\n" in out  # was a file named "none", not found after setup
