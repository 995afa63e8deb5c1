"""Shared fixtures: a micro configuration, a tiny synthetic dataset and its tokenizer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from maskvlm.config import build_config
from maskvlm.data.formats import PairDataset, PretrainCollator
from maskvlm.data.synthetic import generate
from maskvlm.data.tokenizer import train_wordpiece
from maskvlm.data.transforms import ImageTransform
from maskvlm.models.model import build_model

# Subprocesses started by tests import this checkout's code, whatever is pip-installed.
_ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join([str(_ROOT / "src"), str(_ROOT), os.environ.get("PYTHONPATH", "")])

MICRO = [
    "model.image_size=32", "model.patch_size=8", "model.vision_width=32", "model.vision_layers=2",
    "model.vision_heads=2", "model.text_width=32", "model.text_layers=1", "model.cross_layers=1",
    "model.text_heads=2", "model.text_intermediate=64", "model.image_cross_layers=1", "model.image_cross_heads=2",
    "model.embed_dim=16", "model.max_position=32", "data.max_text_len=24", "data.num_workers=0",
    "train.batch_size=8", "train.max_steps=6", "train.warmup_steps=2", "train.log_every=2",
    "train.progress=false", "train.tensorboard=false", "eval.k=4", "eval.batch_size=16",
]


def free_ports(n: int = 1) -> list[int]:
    """n distinct free TCP ports on the loopback, for process groups started by a test (the sockets
    are held until all n are bound, so no port is handed out twice)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def torchrun_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank ``rank`` of ``world`` processes on this host."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def micro_config(*overrides: str, recipe: str = "maskvlm"):
    return build_config(recipe, overrides=MICRO + list(overrides))


class LogLines(logging.Handler):
    """The messages a logger emits, joined in ``text``."""

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def clear(self):
        self.lines.clear()


@pytest.fixture
def maskvlm_log():
    """The ``maskvlm`` logger's INFO and higher messages during the test (the logger does not
    propagate to the root logger once the CLI or a job has set it up, so caplog misses them)."""
    logger = logging.getLogger("maskvlm")
    handler, level = LogLines(), logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), num_train=40, num_val=6, num_test=8, image_size=32,
                    seed=0, progress=False)


@pytest.fixture(scope="session")
def tokenizer(synthetic_dir):
    return train_wordpiece(PairDataset(synthetic_dir / "train.json", None, None).captions(), vocab_size=200)


@pytest.fixture
def config(tokenizer):
    cfg = micro_config()
    cfg.model.vocab_size = tokenizer.vocab_size
    return cfg


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return build_model(config)


@pytest.fixture
def batch(config, synthetic_dir, tokenizer):
    m = config.model
    transform = ImageTransform(m.image_size, config.data.mean, config.data.std, train=True, hflip=0.5)
    dataset = PairDataset(synthetic_dir / "train.json", None, transform)
    collator = PretrainCollator(tokenizer, config.data.max_text_len, 0.3, 0.6, (m.image_size // m.patch_size,) * 2, 2)
    return collator([dataset[i] for i in range(8)])


def save_micro_model(folder: Path, tokenizer, *overrides: str) -> Path:
    """A micro model with its initial weights (seed 0) saved as a pretrained folder."""
    cfg = micro_config(*overrides)
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    build_model(cfg).save_pretrained(folder, cfg, tokenizer)
    return folder
