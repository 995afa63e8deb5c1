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
    """Also write the log to ``output_dir/train.log`` while the block runs. An error that ends the
    block is written there too, with its traceback (the console may be a scheduler's file elsewhere,
    or gone with a closed terminal); the console shows it as the command reports it."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(output_dir) / "train.log")
    handler.setFormatter(_FORMAT)
    root = logging.getLogger("maskvlm")
    root.addHandler(handler)
    try:
        yield
    except BaseException as e:
        record = root.makeRecord(root.name, logging.ERROR, __file__, 0, "stopped by %s: %s",
                                 (type(e).__name__, e), (type(e), e, e.__traceback__))
        handler.handle(record)  # the file only
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def metrics_line(step: int, split: str, metrics: dict) -> str:
    """One ``metrics.jsonl`` record."""
    record = {"step": step, "split": split, "time": round(time.time(), 3)}
    record.update({k: (round(float(v), 6) if isinstance(v, (int, float)) else v) for k, v in metrics.items()})
    return json.dumps(record) + "\n"


def open_jsonl(path: Path):
    """A JSON-lines file (``metrics.jsonl``, an ablation's ``results.jsonl``) opened to append. A last
    line cut short (a process killed while writing it) is ended first, so the records that follow stay
    whole lines; :func:`read_jsonl` skips the cut one."""
    path = Path(path)
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                log.warning("%s: its last line was cut short (a process stopped while writing it); it is ended "
                            "here and readers skip it", path)
                f.write(b"\n")
    return open(path, "a")


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(the records of a JSON-lines file, how many lines were not JSON and skipped with a warning)."""
    rows, skipped = [], 0
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:  # e.g. cut short by a process killed while writing it
                log.warning("%s: line %d is not JSON (%s): skipped", path, n, e)
                skipped += 1
    return rows, skipped


def append_metrics(output_dir: Path, step: int, split: str, metrics: dict) -> None:
    """Add a record to ``metrics.jsonl`` after training has ended (e.g. the final weights' val figures)."""
    with open_jsonl(Path(output_dir) / "metrics.jsonl") as f:
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
        self._file = open_jsonl(self.output_dir / "metrics.jsonl")
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
