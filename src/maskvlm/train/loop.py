"""The one trainer: runs any task (a module mapping a ``Batch`` to ``(loss, metrics)``) with
AdamW + warmup/cosine, gradient accumulation and clipping, bf16 autocast, progress bar,
metrics logs, periodic evaluation and atomic checkpoints with exact resume."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from ..config import Config, ConfigError, best_metric
from ..data.formats import DataError, EpochSampler
from ..models.io import MODEL_FILE, load_state, read_weights
from ..runtime import autocast, deterministic_compiled_kernels, keep_freed_host_memory, resolve_device
from .checkpoint import (BEST_DIR, BEST_FILE, best_bytes, check_disk_room, checkpoint_bytes, keeps_model_only,
                         load_trainer_state, rng_state, save_best, save_checkpoint, set_aside_later, set_rng_state)
from .distributed import any_rank, barrier, broadcast_object, global_max, is_main, rank, world_size
from .logging import MetricsLogger, append_metrics, log
from .optim import build_optimizer, build_scheduler, freeze_parameters, layerwise_lr_scale

STATE_VERSION = 1
_NONFINITE, _TOO_MANY_BAD = 1, 2  # flags agreed over ranks after each micro-batch's forward


# Ctrl-C, SIGTERM (preemption) and SIGHUP (the terminal closed) ask a run to stop with a checkpoint.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _worker_init(worker_id: int) -> None:
    # the stop signals reach the whole process group; only the main process reacts (and checkpoints)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _detach_from_terminal() -> None:
    """After a hang-up, writing to the terminal fails (EIO) and would end the run at the next log line
    or progress-bar update: console output goes to the null device from here; train.log keeps it."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if os.isatty(fd):
            os.dup2(null, fd)
    os.close(null)


def _worker_failures_at_fetch() -> None:
    """Make a DataLoader worker's death surface where the next batch is fetched, never elsewhere.
    torch's SIGCHLD handler raises it at whatever line the main process is running (inside a forward,
    or an optimizer update); without the handler the loader finds the dead worker itself when it
    waits for its batch (within about 5 s) and raises there, at a step boundary or between the
    micro-batches of one, where the trainer can restart the loader. Process-wide; main thread only."""
    from torch.utils.data._utils import signal_handling

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGCHLD"):
        return
    signal_handling._SIGCHLD_handler_set = True  # torch installs its handler only while this is False
    if getattr(signal.getsignal(signal.SIGCHLD), "__module__", "") == signal_handling.__name__:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # installed by an earlier loader of this process


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class EvaluationStopped(Exception):
    """A stop request (SIGINT/SIGTERM) arrived during a periodic evaluation of a one-process run."""


class StopRequest(threading.Event):
    """Set by the first SIGINT/SIGTERM. While ``evaluating`` is set, that signal also ends the
    evaluation under way (``EvaluationStopped``), so the checkpoint is written at once rather than
    after a validation that can take minutes (past a scheduler's grace period)."""

    def __init__(self):
        super().__init__()
        self.evaluating = False


@contextlib.contextmanager
def stop_requests():
    """While active, SIGINT/SIGTERM/SIGHUP set the returned event instead of killing the process, so
    the loop can finish its step and checkpoint; a second signal raises KeyboardInterrupt at once."""
    event = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum, frame):
        if signum == getattr(signal, "SIGHUP", None):
            _detach_from_terminal()
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        if event.evaluating:
            log.warning("received %s: stopping this evaluation and writing a checkpoint (send again to abort now)",
                        signal.Signals(signum).name)
            raise EvaluationStopped
        log.warning("received %s: finishing this step and writing a checkpoint (send again to abort now)",
                    signal.Signals(signum).name)
    # a run started with `nohup` has SIGHUP ignored: it is asked to go on when the terminal closes
    hup = getattr(signal, "SIGHUP", None)
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS
                if not (sig == hup and signal.getsignal(sig) == signal.SIG_IGN)}
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def eager_evaluation(compiled: bool):
    """Context in which ``torch.compile``d stacks run their eager code (``train.compile``).
    Evaluation calls them without gradients and, in ITM re-ranking, at batch sizes training never
    uses: each would compile new graphs (about 35 s at the first evaluation of the tiny preset on a
    2-core CPU, where a whole evaluation takes 2 s eager; with CUDA graphs, a memory pool for each
    new shape). Eager, an evaluation gives up the few percent compilation saves per call."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


def no_negatives(config: Config) -> list[str]:
    """The contrastive objectives (ITC, ITM) that a batch of one pair leaves without a negative: ITC's
    loss is then 0 and ITM, its negative rows dropped, only ever sees matching pairs. ITC with a
    momentum queue or over an accumulated batch (train.accumulate_itc) still has negatives."""
    t, lo = config.train, config.loss
    if config.task.name not in ("pretrain", "retrieval") or t.batch_size * world_size() > 1:
        return []
    itc_alone = config.momentum.queue_size == 0 and not (t.accumulate_itc and t.grad_accum > 1)
    return [name for name, on in (("ITC", lo.itc > 0 and itc_alone), ("ITM", lo.itm > 0)) if on]


def setting_warnings(config: Config) -> list[str]:
    """Settings that are allowed but probably not meant. Warnings, not config errors: the
    checkpoints of runs made with them must stay readable."""
    t, out = config.train, []
    if t.min_lr > t.lr and t.schedule != "constant":
        out.append(f"train.min_lr={t.min_lr:g} is above train.lr={t.lr:g}: the {t.schedule} schedule goes from "
                   "train.lr up to train.min_lr after the warm-up instead of decaying")
    lonely = no_negatives(config)
    if lonely:
        out.append(f"{' and '.join(lonely)} find their negatives among the other pairs of a batch, and a batch of "
                   f"{t.batch_size} pair on {world_size()} process has none: they learn nothing (set "
                   "train.batch_size to 2 or more)")
    return out


class Trainer:
    def __init__(self, task: nn.Module, config: Config, dataset: Dataset, collator: Callable,
                 output_dir: Path, tokenizer=None, evaluate: Optional[Callable[[], dict]] = None,
                 extra_files: Optional[dict] = None):
        self.task, self.config, self.dataset, self.collator = task, config, dataset, collator
        self.output_dir = Path(output_dir)
        self.tokenizer = tokenizer
        self.evaluate = evaluate
        self.extra_files = extra_files or {}  # name -> JSON-able object written into every checkpoint
        t, job = config.train, config.task
        self.device = resolve_device(t.device)
        self.task.to(self.device)
        if t.keep_host_memory and self.device.type == "cpu" and keep_freed_host_memory():
            log.info("host allocator keeps freed memory between steps (train.keep_host_memory)")
        if t.activation_checkpointing:
            from ..models.layers import set_activation_checkpointing
            log.info("activation checkpointing on in %d encoder stacks", set_activation_checkpointing(task, True))
        if t.compile:
            from ..models.layers import compile_encoders
            log.info("torch.compile (%s) of %d encoder stacks", t.compile_backend,
                     compile_encoders(task, t.compile_backend, t.compile_mode))
            if self.device.type == "cpu":
                deterministic_compiled_kernels()
                log.info("deterministic algorithms on, so compiled runs repeat exactly "
                         "(torch.use_deterministic_algorithms)")
        if t.freeze:
            log.info("frozen (train.freeze): %s", freeze_parameters(task.model, t.freeze))
        for warning in setting_warnings(config):
            log.warning(warning)
        self.fsdp = None  # FSDPTask when train.fsdp under torchrun
        if t.fsdp and world_size() > 1:
            from .fsdp import FSDPTask
            self.fsdp = FSDPTask(task)
            log.info("FSDP: parameters, gradients and optimizer state sharded over %d processes (%d block units)",
                     world_size(), self.fsdp.units)
        elif t.fsdp:
            log.info("train.fsdp: a single process has nothing to shard; training unsharded")
        lr_scale = None
        if job.name != "pretrain" and (job.layer_decay != 1 or job.head_lr_mult != 1):
            lr_scale = layerwise_lr_scale(config.model, job.layer_decay, job.head_lr_mult)
        self.optimizer = build_optimizer(task, t.lr, t.weight_decay, t.betas, lr_scale, t.fused_adamw)
        # fp16: dynamic loss scaling; a step whose scaled gradients overflow is skipped and the scale halved
        self.scaler = torch.amp.GradScaler(self.device.type) if t.precision == "fp16" else None
        self.skipped_overflow = 0  # fp16 steps skipped by the loss scaler
        if t.precision == "fp16" and self.device.type == "cpu":
            log.warning("train.precision=fp16 on a CPU: correct but slow (CPUs rarely have fp16 arithmetic); bf16 "
                        "is the fast choice here")
        self.command = "pretrain" if job.name == "pretrain" else f"finetune {job.name}"
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.max_steps, t.lr, t.min_lr, t.schedule,
                                         t.cooldown_steps)
        self.streaming = isinstance(dataset, IterableDataset)  # webdataset shards (data/stream.py)
        if self.streaming:
            dataset.configure(t.batch_size, rank(), world_size(), config.data.num_workers)
            log.info("training data: %s", dataset.describe())
        self.mix = self._mix(dataset, config.data.train_weights)
        self.batches_per_epoch = len(dataset) // (t.batch_size * world_size())
        if self.batches_per_epoch == 0:
            raise ValueError(f"the training set has {len(dataset)} samples, fewer than train.batch_size="
                             f"{t.batch_size} x {world_size()} processes")
        # under torchrun: DDP averages gradients over ranks (the task itself stays unwrapped for saving)
        self.forward_module = task
        if world_size() > 1 and self.fsdp is None:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_module = DistributedDataParallel(task, device_ids=ids,
                                                          find_unused_parameters=t.ddp_find_unused)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.skipped_nonfinite = 0
        self.nonfinite_in_row = 0
        self.skipped_samples: dict[str, int] = {}  # bad training samples replaced, by reason
        self.samples_used = 0
        self.last_checkpoint: Optional[Path] = None
        self.interrupted = False
        self.best: Optional[dict] = None  # {"step", "metric", "value"} of the best val evaluation so far
        self.evals_since_best = 0  # periodic val evaluations since the last new best (eval.patience)
        self.stopped_early = False
        self._best_metric_missing = False

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "skipped_nonfinite": self.skipped_nonfinite,
                "skipped_samples": dict(self.skipped_samples), "samples_used": self.samples_used,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(), "data_layout": self._data_layout(), "best": self.best,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "skipped_overflow": self.skipped_overflow, "evals_since_best": self.evals_since_best}

    def _data_layout(self) -> dict:
        """What the data position means: a streamed epoch is split by processes and workers."""
        if self.streaming:
            return self.dataset.layout()
        layout = {"world": world_size(), "batch_size": self.config.train.batch_size, "samples": len(self.dataset)}
        if self.mix is not None:  # another mix orders the epoch differently
            layout["train_weights"] = self.mix[1]
        return layout

    @staticmethod
    def _mix(dataset, weights: Optional[list]) -> Optional[tuple[list[int], list[float]]]:
        """(entries per training file, weights) for ``data.train_weights``, checked against the files."""
        if weights is None:
            return None
        sizes = dataset.source_sizes() if hasattr(dataset, "source_sizes") else None
        if sizes is None:
            raise ConfigError("data.train_weights mixes several '::'-separated annotation files of image-caption "
                              "pairs (pre-training, retrieval fine-tuning); for shards use data.shard_weights")
        if len(weights) != len(sizes):
            raise ConfigError(f"data.train_weights has {len(weights)} values for {len(sizes)} training files")
        weights = [float(w) for w in weights]
        total = sum(sizes)
        shares = ", ".join(f"{f.name}: {n} entries -> {100 * w / sum(weights):.1f}% of an epoch"
                           for f, n, w in zip(dataset.files, sizes, weights))
        log.info("training mix of %d entries per epoch: %s", total, shares)
        return sizes, weights

    def save(self) -> Optional[Path]:
        """Write a checkpoint (rank 0). With FSDP every rank must call it: the shards are gathered."""
        state, model_state = self.state_dict(), None
        if self.fsdp is not None:
            model_state = self.fsdp.model_state()
            state["optimizer"] = self.fsdp.optimizer_state(self.optimizer)
        if not is_main():
            return None
        path = save_checkpoint(self.output_dir, self.step, self.task, self.config, self.tokenizer,
                               state, self.config.train.keep_last, self.extra_files, model_state)
        self.last_checkpoint = path
        log.info("checkpoint written: %s", path)
        return path

    def _writes_alone(self) -> bool:
        """Whether this process can write a checkpoint by itself (one process, or rank 0 without FSDP,
        whose save gathers over every rank): where one rank fails, the others are elsewhere."""
        return world_size() == 1 or (self.fsdp is None and is_main())

    @contextlib.contextmanager
    def _checkpoint_on_failure(self, what: str):
        """Work after a finished step: where it fails, the steps trained since the last checkpoint are
        saved first where this process can write alone (if that fails too, e.g. on a full disk, its
        error is raised, from this one); under torchrun the launcher then stops the other ranks."""
        try:
            yield
        except Exception as error:
            try:
                path = self.save() if self._writes_alone() else None
            except Exception as failed_save:
                raise failed_save from error
            if path is not None:
                log.error("step %d: %s failed (the error follows); the training so far is saved in %s: fix the "
                          "cause, then continue with --resume auto", self.step, what, path)
            raise

    def _check_disk_room(self) -> None:
        """Refuse to start where the first checkpoint cannot be written (rank 0 looks; all ranks raise)."""
        t, error = self.config.train, None
        if is_main():
            saves_left = (t.max_steps - self.step) // t.save_every + 1 if t.save_every else 1
            best = best_bytes(self.task, self.config.task.name) if self.evaluate and self.config.eval.keep_best else 0
            try:
                check_disk_room(self.output_dir, checkpoint_bytes(self.task, self.optimizer), t.keep_last, saves_left,
                                best)
            except OSError as e:
                error = e.strerror
        error = broadcast_object(error)
        if error is not None:
            raise OSError(errno.ENOSPC, error)

    def resume(self, checkpoint: Path) -> None:
        """Continue exactly where ``checkpoint`` stopped: weights, optimizer, schedule, data position, RNG."""
        weights = read_weights(checkpoint / MODEL_FILE)
        state = load_trainer_state(checkpoint)
        if self.fsdp is not None:
            self.fsdp.load(weights, state["optimizer"], self.optimizer)
        else:
            load_state(self.task, weights, str(checkpoint / MODEL_FILE))
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError as e:  # other parameter groups: a changed train.freeze, say
                raise ValueError(f"{checkpoint}: its optimizer state does not fit the parameters this run trains "
                                 f"({e}); resume with the run's own train.freeze and weight settings") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self._check_schedule_continues(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)
        self.skipped_samples = dict(state.get("skipped_samples", {}))
        self.samples_used = state.get("samples_used", 0)
        self.best = state.get("best")
        self.evals_since_best = state.get("evals_since_best", 0)
        self.skipped_overflow = state.get("skipped_overflow", 0)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        saved, layout = state.get("data_layout"), self._data_layout()
        if saved is not None and "samples" not in saved:  # written before 2026-11-24, without the size
            layout.pop("samples", None)
        if saved is not None and saved != layout and self.batch_in_epoch:
            # the position within an epoch cannot be mapped onto another split: start the next epoch
            log.warning("the run was saved with data layout %s and resumes with %s: the rest of epoch %d is "
                        "skipped so that no sample is repeated", saved, layout, self.epoch)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        log.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, self.step, self.epoch,
                 self.batch_in_epoch)
        if self.step >= self.config.train.max_steps:
            log.warning("the checkpoint is at step %d and train.max_steps is %d: there is nothing left to train, "
                        "only the final evaluations run (raise --steps / train.max_steps to train on)",
                        self.step, self.config.train.max_steps)
        if is_main():
            set_aside_later(self.output_dir, self.step)
        barrier()  # every rank then reads the same OUTPUT/best
        self._check_best_weights()

    def _check_best_weights(self) -> None:
        """After a resume: the run's record of its best val evaluation holds only while OUTPUT/best holds
        that evaluation's weights; otherwise (moved aside as chosen after the resumed step, or lost) the
        record is dropped and the next val evaluation becomes the best."""
        if self.best is None or not self.config.eval.keep_best:
            return
        try:
            saved = json.loads((self.output_dir / BEST_DIR / BEST_FILE).read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved != self.best["step"]:
            log.warning("%s does not hold the weights of the best val %s so far (step %d; it holds %s); the record "
                        "is dropped and the next val evaluation becomes the best", self.output_dir / BEST_DIR,
                        self.best["metric"], self.best["step"], "none" if saved is None else f"step {saved}'s")
            self.best, self.evals_since_best = None, 0

    def _check_schedule_continues(self, saved: dict) -> None:
        """Warn when this run's schedule gives the resumed step another learning rate than the saved
        run had (a longer train.max_steps recomputes a decaying schedule over the new length)."""
        steps = saved.get("last_epoch", 0)
        was = saved.get("_last_lr") or []
        now = [base * fn(steps) for base, fn in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        if was and now and abs(now[0] - was[0]) > 0.01 * max(abs(was[0]), 1e-12):
            t = self.config.train
            hint = ("a cooldown run keeps its learning rates only when lengthened before its cooldown begins"
                    if t.schedule == "cooldown" else
                    "to make a run longer without a jump, start it with train.schedule=cooldown (constant until "
                    "its last train.cooldown_steps) and lengthen it before the cooldown begins")
            log.warning("the learning rate at step %d was %.3g and is now %.3g: train.schedule=%s over "
                        "train.max_steps=%d differs from the saved run's; %s", steps, was[0], now[0], t.schedule,
                        t.max_steps, hint)

    def consider_best(self, val: dict) -> bool:
        """Keep track of the best val evaluation by ``best_metric(config)`` (higher is better); with
        ``eval.keep_best`` a new best's weights go to OUTPUT/best (written by rank 0; with FSDP every
        rank takes part, the weights are gathered). Call it on every rank with the same figures (the
        evaluations return rank 0's). True when ``val`` is a new best."""
        metric = best_metric(self.config)
        if metric not in val:
            if not self._best_metric_missing:
                self._best_metric_missing = True
                log.warning("eval.best_metric: the val evaluation has no %r (it has %s); no best weights are kept",
                            metric, ", ".join(sorted(val)))
            return False
        value = float(val[metric])
        if self.best is not None and not value > self.best["value"]:
            return False
        self.best = {"step": self.step, "metric": metric, "value": value}
        if self.config.eval.keep_best:
            model_state = self.fsdp.model_state() if self.fsdp is not None else None
            if is_main():
                figures = {k: float(v) for k, v in val.items() if isinstance(v, (int, float, np.floating, np.integer))}
                path = save_best(self.output_dir, self.task, self.config, self.tokenizer, {**self.best, "val": figures},
                                 self.extra_files, model_state)
                log.info("best val %s so far: %.2f at step %d, written to %s", metric, value, self.step, path)
        return True

    def record_val(self, val: dict, logger: Optional[MetricsLogger] = None) -> bool:
        """Log a val evaluation of the current weights (the log, and ``metrics.jsonl`` through ``logger``
        or, after training, appended to it) and weigh it for the best weights; True for a new best."""
        if is_main():
            log.info("step %d val: %s", self.step, {k: round(v, 2) for k, v in val.items()})
            if logger is not None:
                logger.log(self.step, "val", val)
            else:
                append_metrics(self.output_dir, self.step, "val", val)
        return self.consider_best(val)

    def load_best(self) -> None:
        """Put the weights saved in OUTPUT/best back into the model (unsharded training only; under
        torchrun every rank loads them, once rank 0 has finished writing them)."""
        barrier()
        folder = self.output_dir / BEST_DIR
        state = read_weights(folder / MODEL_FILE)
        target = self.task.model if keeps_model_only(self.config.task.name) else self.task
        load_state(target, state, str(folder / MODEL_FILE))
        log.info("weights of the best val %s (%.2f, step %d) loaded from %s", self.best["metric"],
                 self.best["value"], self.best["step"], folder)

    def use_best_for_test(self) -> str:
        """With ``eval.test_on=best``, load the best val weights unless they are the last; returns a
        note for the test table's title ("" when the last weights are tested)."""
        best = self.best
        if self.config.eval.test_on != "best" or best is None:
            return ""
        if best["step"] != self.step:
            self.load_best()
        return f" (weights of the best val {best['metric']}, step {best['step']})"

    def run_evaluation(self, evaluate: Callable[[], dict]) -> dict:
        """Run ``evaluate`` (model methods, no grad). With FSDP every rank runs it, parameters gathered.
        Compiled stacks run eager here (:func:`eager_evaluation`)."""
        with eager_evaluation(self.config.train.compile):
            if self.fsdp is None:
                return evaluate()
            with self.fsdp.gathered():
                return evaluate()

    def interruptible_evaluation(self, stop: StopRequest) -> Optional[dict]:
        """A periodic val evaluation that a stop request ends at once in a one-process run (None then):
        nothing of the training state changes during an evaluation, so leaving it part-way loses
        nothing. Under torchrun it runs to its end, since a rank that left it would leave the others
        waiting in its collectives."""
        stop.evaluating = world_size() == 1
        try:
            return self.run_evaluation(self.evaluate)
        except EvaluationStopped:
            log.warning("step %d: evaluation stopped part-way by the stop request; not recorded", self.step)
            return None
        finally:  # (the evaluations put the model's training mode back themselves)
            stop.evaluating = False

    # --- data ---------------------------------------------------------------------------------
    def _loader_batches(self):
        """``_batches``, with a DataLoader whose worker died (killed for memory, say) replaced by a new
        one at the same data position: the samples are drawn from their own seeds, so the batches are
        the ones the old loader would have given. ``data.max_loader_restarts`` restarts in a row without
        a batch between raise ``LoaderFailed``."""
        limit, restarts = self.config.data.max_loader_restarts, 0
        while True:
            try:
                for batch in self._batches():
                    restarts = 0
                    yield batch
            except RuntimeError as e:
                if not _worker_died(e):
                    raise
                restarts += 1
                if restarts > limit:
                    raise LoaderFailed(f"a data loader worker died {restarts} times in a row without "
                                       f"delivering a batch (data.max_loader_restarts={limit}); last: {e}. Check "
                                       "the memory per worker (lower data.num_workers or the image size) and the "
                                       "storage, then continue with --resume auto") from None
                log.warning("step %d: %s; the data loader restarts at epoch %d, batch %d (restart %d of at most %d "
                            "in a row)", self.step, e, self.epoch, self.batch_in_epoch, restarts, limit)

    def _batches(self):
        """Micro-batches forever, epoch after epoch, starting at the saved data position."""
        t = self.config.train
        while True:
            if self.streaming:  # the stream knows its split; it is told where the epoch resumes
                self.dataset.set_position(self.epoch, self.batch_in_epoch)
                order = {}
            else:
                order = {"sampler": EpochSampler(len(self.dataset), t.seed, self.epoch, rank=rank(),
                                                 world=world_size(), start=self.batch_in_epoch * t.batch_size,
                                                 mix=self.mix)}
            loader = DataLoader(self.dataset, batch_size=t.batch_size, collate_fn=self.collator, drop_last=True,
                                num_workers=self.config.data.num_workers, pin_memory=self.device.type == "cuda",
                                # a private generator: creating loaders must not consume the global RNG
                                generator=torch.Generator(), worker_init_fn=_worker_init,
                                persistent_workers=False, **order)
            for batch in _fetch(loader):
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    # --- faults -------------------------------------------------------------------------------
    def _skip_totals(self) -> tuple[int, int]:
        """(bad samples replaced, samples tried) so far."""
        total = sum(self.skipped_samples.values())
        return total, total + self.samples_used

    def skip_report(self) -> str:
        total, tried = self._skip_totals()
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped_samples.items(), key=lambda kv: -kv[1]))
        return f"{total} of {tried} samples skipped ({100.0 * total / max(tried, 1):.2f}%): {reasons or 'none'}"

    def _count_skips(self, batch) -> bool:
        """Add the batch's replaced samples to the counts; True when the share passed the limit."""
        for k, v in (getattr(batch, "skipped", None) or {}).items():
            self.skipped_samples[k] = self.skipped_samples.get(k, 0) + v
        self.samples_used += len(batch)
        d = self.config.data
        total, tried = self._skip_totals()
        return tried >= d.skip_check_after and total > d.max_skip_rate * tried

    def _skip_message(self) -> str:
        d = self.config.data
        return (f"too many bad training samples: {self.skip_report()}"
                f"{' on this rank' if world_size() > 1 else ''}, more than data.max_skip_rate={d.max_skip_rate} "
                f"(checked after data.skip_check_after={d.skip_check_after} samples). Fix or remove the files (the "
                "log names the first ones of each kind), or raise data.max_skip_rate")

    def _save_after_failed_step(self, step_start: tuple) -> None:
        """A step failed before its update (the loader gave up, out of memory, a shape the model cannot
        take): the weights and optimizer are still those of the last finished step, so write that step's
        checkpoint, with the data position and counts put back to its end so that no sample is skipped
        on resume, before the error goes on. The random state, and a momentum queue or prototype centre
        a failed forward updated, are as the failure left them: the resumed run is a sound continuation,
        not a bit-identical one. Only where this process can write alone (``_writes_alone``); under
        torchrun the launcher then stops the other ranks."""
        self.epoch, self.batch_in_epoch, skipped, self.samples_used = step_start
        self.skipped_samples = dict(skipped)
        if self.step > 0 and self._writes_alone():
            path = self.save()
            log.error("step %d failed (the error follows); the %d steps trained so far are saved in %s: fix the "
                      "cause, then continue with --resume auto", self.step + 1, self.step, path)

    def _gradient_sync(self, sync: bool):
        """Gradient accumulation under torchrun: reduce gradients over ranks only on the last micro-batch."""
        if sync or world_size() == 1:
            return contextlib.nullcontext()
        if self.fsdp is not None:
            @contextlib.contextmanager
            def no_fsdp_sync():
                self.task.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    self.task.set_requires_gradient_sync(True)
            return no_fsdp_sync()
        return self.forward_module.no_sync()

    # --- loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        t = self.config.train
        main = is_main()
        self._check_disk_room()
        saves = main or self.fsdp is not None  # ranks that take part in writing a checkpoint
        wandb = dict(project=t.wandb_project, name=t.wandb_name, config=self.config.to_dict()) if t.wandb else None
        logger = MetricsLogger(self.output_dir, t.tensorboard, wandb) if main else None
        self.task.train()
        window: dict[str, float] = defaultdict(float)
        window_steps, window_samples, window_start = 0, 0, time.perf_counter()
        last: dict[str, float] = {}
        bar = tqdm(total=t.max_steps, initial=self.step, desc=self.command, disable=not (t.progress and main),
                   dynamic_ncols=True)
        if self.config.data.num_workers > 0:
            _worker_failures_at_fetch()
        batches = self._loader_batches()
        with stop_requests() as stop, contextlib.ExitStack() as cleanup:
            cleanup.callback(batches.close)  # the loader's workers stop with the loop (see _fetch)
            cleanup.callback(bar.close)
            if logger:
                cleanup.callback(logger.close)
            # compile_mode=reduce-overhead replays the compiled stacks as CUDA graphs: each optimizer
            # step is a new iteration for them (buffers of the last one may be reused)
            graphs = t.compile and "reduce-overhead" in (t.compile_mode or "") and self.device.type == "cuda"
            accumulate_itc = t.accumulate_itc and t.grad_accum > 1
            def fetch():
                return next(batches).to(self.device, non_blocking=True)

            while self.step < t.max_steps:
                # the data position and counts of the step's start, saved if the step fails before its update
                step_start = (self.epoch, self.batch_in_epoch, dict(self.skipped_samples), self.samples_used)
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                self.optimizer.zero_grad(set_to_none=True)
                step_metrics: dict[str, float] = defaultdict(float)
                finite = True
                try:  # forward and backward: nothing of the model or optimizer has changed yet
                    pooled = None  # train.accumulate_itc: every micro-batch first, for the ITC pool
                    if accumulate_itc:
                        pooled = [fetch() for _ in range(t.grad_accum)]
                        with autocast(self.device, t.precision):  # through the root's forward (FSDP), not DDP's
                            self.task.pool = self.task(None, pool_of=pooled)
                    for micro in range(t.grad_accum):
                        if pooled is not None:
                            batch = pooled[micro]
                            self.task.pool.micro = micro
                        else:
                            batch = fetch()
                        too_many_bad = self._count_skips(batch)
                        with self._gradient_sync(micro == t.grad_accum - 1):
                            with autocast(self.device, t.precision):
                                loss, metrics = self.forward_module(batch)
                            # One collective decides for every rank, before any backward: a rank that skipped
                            # its backward (or stopped) alone would leave the others waiting forever.
                            flags = global_max(_NONFINITE * (not bool(torch.isfinite(loss))) +
                                               _TOO_MANY_BAD * too_many_bad)
                            if flags & _TOO_MANY_BAD:
                                if saves and self.step > 0:
                                    self.save()  # keep the progress made so far (no update of this step applied)
                                raise TooManyBadSamples(self._skip_message())
                            if flags & _NONFINITE:
                                finite = False
                                break
                            scaled = loss / t.grad_accum
                            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                        for k, v in metrics.items():
                            step_metrics[k] += float(v) / t.grad_accum
                        window_samples += len(batch)
                except TooManyBadSamples:
                    raise  # its checkpoint is written where it is raised
                except Exception as e:  # out of memory, a loader that gave up: keep the steps trained so far
                    self._save_after_failed_step(step_start)
                    if "Expected to have finished reduction in the prior iteration" in str(e):
                        raise ConfigError(  # DDP's message names its own argument, not the setting
                            f"step {self.step + 1}: DDP found parameters no objective of this run trains (recipe "
                            f"{self.config.recipe} with its loss weights), which train.ddp_find_unused=false does "
                            "not allow; continue with --resume auto train.ddp_find_unused=true") from None
                    raise
                if pooled is not None:
                    self.task.pool = None
                grad_norm = float("nan")
                if self.fsdp is not None:
                    self.fsdp.reduce_replicated()
                overflow = False
                if finite:
                    if self.scaler is not None:
                        self.scaler.unscale_(self.optimizer)
                    if t.clip_grad > 0 or self.scaler is not None:  # fp16: the norm tells an overflow
                        norm = torch.nn.utils.clip_grad_norm_(self.task.parameters(), t.clip_grad or math.inf)
                        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP
                        finite = math.isfinite(grad_norm)
                        overflow = not finite and self.scaler is not None
                if self.scaler is not None and not (flags & _NONFINITE):
                    self.scaler.update()  # after unscale_: halves the scale on an overflow, grows it over time
                if overflow:  # a loss-scale overflow: expected now and then in fp16, not a training fault
                    self.skipped_overflow += 1
                    self.optimizer.zero_grad(set_to_none=True)
                elif finite:
                    self.nonfinite_in_row = 0
                    self.optimizer.step()
                    after_step = getattr(self.task, "after_step", None)
                    if after_step is not None:  # e.g. EMA teacher update
                        after_step()
                else:
                    self.skipped_nonfinite += 1
                    self.nonfinite_in_row += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    log.warning("step %d: non-finite loss or gradient; update skipped (%d so far, %d in a row)",
                                self.step, self.skipped_nonfinite, self.nonfinite_in_row)
                with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                    self.scheduler.step()
                self.step += 1
                if self.nonfinite_in_row >= t.max_nonfinite_in_row:
                    # the weights are those of the last good step: every update since was skipped
                    path = self.save() if saves else None
                    raise NonFiniteTraining(
                        f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient (up to step "
                        f"{self.step}); stopped. The last good state is saved in {path}. Lower train.lr, "
                        "use train.precision=fp32 or check the data, then continue with --resume auto")
                for k, v in step_metrics.items():
                    window[k] += v
                window_steps += 1
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    elapsed = time.perf_counter() - window_start
                    last = {k: v / max(1, window_steps) for k, v in window.items()}
                    # the base rate (groups may carry layer-wise / head multipliers)
                    base_lr = self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0].get("lr_scale", 1.0)
                    last.update(lr=base_lr, samples_per_s=window_samples / max(elapsed, 1e-9),
                                epoch=self.epoch, skipped_nonfinite=self.skipped_nonfinite,
                                skipped_samples=sum(self.skipped_samples.values()))
                    if t.clip_grad > 0:
                        last["grad_norm"] = grad_norm
                    if self.scaler is not None:
                        last.update(loss_scale=self.scaler.get_scale(), skipped_overflow=self.skipped_overflow)
                    if logger:
                        with self._checkpoint_on_failure("writing the metrics"):  # e.g. a full disk
                            logger.log(self.step, "train", last)
                    bar.set_postfix({k: f"{last[k]:.3f}" for k in last if k.endswith("_loss")} |
                                    {"samples/s": f"{last['samples_per_s']:.0f}"} |
                                    ({"skipped": int(last["skipped_samples"])} if last["skipped_samples"] else {}))
                    window.clear()
                    window_steps, window_samples, window_start = 0, 0, time.perf_counter()
                is_last = self.step == t.max_steps
                e = self.config.eval
                evaluates = bool(self.evaluate and e.every_steps and self.step % e.every_steps == 0 and not is_last)
                if evaluates and any_rank(stop.is_set()):  # a stop request during the step: no evaluation
                    evaluates = False
                if evaluates:  # every rank takes part: the evaluations split their work over the ranks
                    with self._checkpoint_on_failure("the val evaluation"):  # a bad val image, say
                        val = self.interruptible_evaluation(stop)
                    evaluates = val is not None
                if evaluates:
                    improved = self.record_val(val, logger)
                    self.evals_since_best = 0 if improved else self.evals_since_best + 1
                if evaluates and e.patience:  # every rank learns the deciding ranks' verdict
                    self.stopped_early = any_rank(saves and self.evals_since_best >= e.patience)
                if any_rank(stop.is_set()):  # every rank stops at the same step (no collective left waiting)
                    self.interrupted = True
                if saves and (is_last or self.interrupted or self.stopped_early or
                              (t.save_every and self.step % t.save_every == 0)):
                    self.save()
                if self.stopped_early:
                    log.info("early stop at step %d of %d: no better val %s in the last %d evaluations (best %.2f "
                             "at step %d; eval.patience=%d)", self.step, t.max_steps, best_metric(self.config),
                             e.patience, self.best["value"] if self.best else float("nan"),
                             self.best["step"] if self.best else -1, e.patience)
                    break
                if self.interrupted:
                    launcher = f"torchrun ... -m maskvlm {self.command}" if world_size() > 1 else \
                        f"maskvlm {self.command}"
                    log.warning("stopped at step %d of %d; continue with: %s --output-dir %s --resume auto",
                                self.step, t.max_steps, launcher, self.output_dir)
                    break
        if self.skipped_samples:
            log.warning("bad training samples were replaced by others: %s", self.skip_report())
        return last


WORKER_EXIT_WAIT_S = 5.0  # how long a worker whose batch could not be read is given to show as dead


class WorkerLost(RuntimeError):
    """A batch could not be read because the worker that made it died (see ``_fetch``)."""


def _fetch(loader: DataLoader):
    """The batches of ``loader``, with every worker death reported as one. A batch a worker had handed
    over before it died carries tensors shared through that process; reading it then fails with a
    connection error. The loader turns that into its report of a dead worker only when the worker
    already looks dead, and a process that is exiting has closed its sockets a moment before it does.
    So on such an error the workers are watched for a few seconds, and a death raises ``WorkerLost``.

    However the iteration ends (the epoch's end, an error, the generator closed), the loader's
    workers are shut down at once rather than when the iterator is garbage-collected: an iterator
    kept alive by a reference (a logged exception's traceback holds its frame) would otherwise keep
    them running, and as they ignore SIGTERM (``_worker_init``), the interpreter's exit, which
    terminates and then joins its child processes, would wait for them forever."""
    it = iter(loader)
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except (ConnectionError, EOFError) as e:
                workers = list(getattr(it, "_workers", []))
                deadline = time.monotonic() + WORKER_EXIT_WAIT_S
                while workers and time.monotonic() < deadline:
                    dead = [w.pid for w in workers if not w.is_alive()]
                    if dead:
                        raise WorkerLost(f"DataLoader worker (pid(s) {', '.join(map(str, dead))}) died, and a "
                                         f"batch it had made was lost with it ({e!r})") from None
                    time.sleep(0.05)
                raise
            yield batch
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # worker processes (none with num_workers=0)
        if shutdown is not None:
            shutdown()


def _worker_died(error: RuntimeError) -> bool:
    """Whether ``error`` is the DataLoader's report of a worker process that ended without finishing
    (killed by a signal or exited), as opposed to an error raised by the code the worker ran. (The
    loader's own ``timeout`` is left off: while it is set, the loader looks for dead workers only
    when the timeout has passed.)"""
    if isinstance(error, WorkerLost):
        return True
    text = str(error)
    return "DataLoader worker" in text and ("exited unexpectedly" in text or "killed by signal" in text)


class LoaderFailed(DataError):
    """DataLoader workers kept dying: data.max_loader_restarts restarts in a row without a batch."""


class TooManyBadSamples(DataError):
    """The share of bad training samples passed data.max_skip_rate."""


class NonFiniteTraining(RuntimeError):
    """train.max_nonfinite_in_row steps in a row had a non-finite loss or gradient."""
