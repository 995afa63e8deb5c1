"""Run logs: one JSON object per line in ``metrics.jsonl`` and, when the ``tensorboard``
package is installed, TensorBoard event files in the same folder."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("maskvlm")


def setup_logging(output_dir: Optional[Path] = None, level: int = logging.INFO) -> None:
    """Console log (and ``train.log`` in the run folder), once per process."""
    root = logging.getLogger("maskvlm")
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(fmt)
        root.addHandler(handler)
    if output_dir is not None:
        path = str(Path(output_dir) / "train.log")
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in root.handlers):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path)
            handler.setFormatter(fmt)
            root.addHandler(handler)
    root.propagate = False


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
