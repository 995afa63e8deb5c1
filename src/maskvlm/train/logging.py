"""Run logs: one JSON object per line in ``metrics.jsonl`` and, when the ``tensorboard``
package is installed, TensorBoard event files in the same folder."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

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


class MetricsLogger:
    def __init__(self, output_dir: Path, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.output_dir / "metrics.jsonl", "a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed; writing metrics.jsonl only")

    def log(self, step: int, split: str, metrics: dict) -> None:
        record = {"step": step, "split": split, "time": round(time.time(), 3)}
        record.update({k: (round(float(v), 6) if isinstance(v, (int, float)) else v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
