"""Run logs: one JSON object per line in ``metrics.jsonl``; when the ``tensorboard`` package is
installed, TensorBoard event files in the same folder; with ``train.wandb``, a Weights & Biases run."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("maskvlm")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced, e.g. by test runners)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(level: int = logging.INFO) -> None:
    """Console log for the ``maskvlm`` logger, once per process."""
    root = logging.getLogger("maskvlm")
    root.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_FORMAT)
        root.addHandler(handler)
    root.propagate = False


@contextlib.contextmanager
def log_to_file(output_dir: Path):
    """Also write the log to ``output_dir/train.log`` while the block runs."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(output_dir) / "train.log")
    handler.setFormatter(_FORMAT)
    root = logging.getLogger("maskvlm")
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def metrics_line(step: int, split: str, metrics: dict) -> str:
    """One ``metrics.jsonl`` record."""
    record = {"step": step, "split": split, "time": round(time.time(), 3)}
    record.update({k: (round(float(v), 6) if isinstance(v, (int, float)) else v) for k, v in metrics.items()})
    return json.dumps(record) + "\n"


def append_metrics(output_dir: Path, step: int, split: str, metrics: dict) -> None:
    """Add a record to ``metrics.jsonl`` after training has ended (e.g. the final weights' val figures)."""
    with open(Path(output_dir) / "metrics.jsonl", "a") as f:
        f.write(metrics_line(step, split, metrics))


WANDB_ID_FILE = "wandb_id.txt"


def start_wandb(output_dir: Path, project: str, name: Optional[str], config: dict):
    """A Weights & Biases run for ``output_dir``. Its id is kept in the run folder, so a resumed run
    (``--resume``) continues the same W&B run. Offline (no network, no account) with WANDB_MODE=offline."""
    try:
        import wandb
    except ImportError:
        raise ImportError("train.wandb=true needs the wandb package: pip install wandb (or pip install -e "
                          "'.[wandb]')") from None
    id_file = Path(output_dir) / WANDB_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = f"{Path(output_dir).name[-40:]}-{int(time.time())}".replace("/", "-")
        id_file.write_text(run_id + "\n")
    run = wandb.init(project=project, name=name or Path(output_dir).name, id=run_id, resume="allow",
                     dir=str(output_dir), config=config)
    log.info("Weights & Biases run %s (project %s)", run_id, project)
    return run


class MetricsLogger:
    def __init__(self, output_dir: Path, tensorboard: bool = True, wandb: Optional[dict] = None):
        """``wandb``: None, or the keyword arguments of :func:`start_wandb` (project, name, config)."""
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = start_wandb(self.output_dir, **wandb) if wandb is not None else None
        self._file = open(self.output_dir / "metrics.jsonl", "a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed; writing metrics.jsonl only")

    def log(self, step: int, split: str, metrics: dict) -> None:
        self._file.write(metrics_line(step, split, metrics))
        self._file.flush()
        numbers = {f"{split}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._writer is not None:
            for k, v in numbers.items():
                self._writer.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
