"""What checkpoint checksums cost: writing a pre-training checkpoint with and without
``checksums.json``, checking a checkpoint (``checkpoint_damage``, what ``--resume`` does), and
reading it back with the checks against plain ``safetensors`` + ``torch.load``; side by side in
one run, alternating, median of the repeats.

    python benchmarks/checkpoint_io.py                        # tiny and small
    python benchmarks/checkpoint_io.py --presets base --repeats 3

The checkpoint is the default recipe's task with random weights and a filled AdamW state (one
update with zero gradients), so its size is a real run's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", default="runs/checkpoint-bench")
    args = p.parse_args()

    import maskvlm.train.checkpoint as checkpoint_module
    from maskvlm.config import build_config
    from maskvlm.models.io import _VERIFIED as verified
    from maskvlm.models.io import MODEL_FILE, read_weights
    from maskvlm.models.model import build_model
    from maskvlm.runtime import report_header
    from maskvlm.tasks.pretrain import PretrainTask
    from maskvlm.train.checkpoint import STATE_FILE, checkpoint_damage, load_trainer_state, save_checkpoint
    from safetensors.torch import load_file

    print("\n".join(report_header()) + "\n")
    print("| preset | checkpoint MiB | write s, no checksums | write s, with | write ratio | check s (resume) "
          "| read s, plain | read s, checked | read ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    keep = checkpoint_module.write_checksums
    for preset in args.presets:
        cfg = build_config("maskvlm", preset)
        cfg.model.vocab_size = 30522  # BERT's, the size a run on real captions would have
        torch.manual_seed(0)
        task = PretrainTask(build_model(cfg), cfg)
        optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
        for param in task.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()
        state = {"step": 1, "optimizer": optimizer.state_dict()}
        out = Path(args.work) / preset
        shutil.rmtree(out, ignore_errors=True)
        plain, checked, check, read_plain, read_checked = [], [], [], [], []
        for _ in range(args.repeats):
            checkpoint_module.write_checksums = lambda folder: None
            plain.append(_time(lambda: save_checkpoint(out, 1, task, cfg, None, state, keep_last=1)))
            checkpoint_module.write_checksums = keep
            checked.append(_time(lambda: save_checkpoint(out, 2, task, cfg, None, state, keep_last=1)))
            folder = out / "checkpoints" / "step-00000002"
            verified.clear()  # files found whole are not hashed again in a process: time cold checks
            check.append(_time(lambda: checkpoint_damage(folder)))
            verified.clear()
            read_plain.append(_time(lambda: (load_file(str(folder / MODEL_FILE)),
                                             torch.load(folder / STATE_FILE, weights_only=True))))
            read_checked.append(_time(lambda: (read_weights(folder / MODEL_FILE), load_trainer_state(folder))))
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2 ** 20
        m = {k: statistics.median(v) for k, v in dict(plain=plain, checked=checked, check=check,
                                                          read_plain=read_plain, read_checked=read_checked).items()}
        print(f"| {preset} | {size:.0f} | {m['plain']:.3f} | {m['checked']:.3f} | {m['checked'] / m['plain']:.2f}x "
              f"| {m['check']:.3f} | {m['read_plain']:.3f} | {m['read_checked']:.3f} "
              f"| {m['read_checked'] / m['read_plain']:.2f}x |", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
