"""Device and precision helpers shared by training, evaluation and inference."""

from __future__ import annotations

import contextlib

from typing import Optional

import torch

from .config import PRECISIONS


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N (or another torch device "
                         "type)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    # another accelerator (mps, xpu, ...): torch.device() accepts every type name, whether or not
    # this build or machine has one, and the first tensor moved there failed with a traceback
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type not in ("cpu", "cuda") and (available is None or not available()):
        raise ValueError(f"device {name!r} requested but this torch build has no {device.type} support or no "
                         f"{device.type} device is present (torch {torch.__version__}); use cpu, cuda or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def keep_freed_host_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse rather than return it to the kernel.

    A training step frees and re-allocates hundreds of MB of activations and gradients. Returned to
    the kernel (glibc's default for blocks over 128 KiB and at the top of the heap), they come back
    as page faults on zeroed pages: about 50,000 faults and 0.1 s of system time per tiny-preset
    step on the 2-core development VM (benchmarks/RESULTS.md). Blocks up to 32 MiB (glibc's
    largest mmap threshold) are then served from the heap, and up to 1 GiB of free heap is kept.
    The process's RSS stays near its peak instead of shrinking between steps. Returns whether it
    applied (Linux with glibc only; elsewhere a no-op)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)
                and mallopt(m_top_pad, 64 << 20))


def deterministic_compiled_kernels() -> None:
    """Make ``torch.compile``d CPU training reproducible run to run, as eager training is.

    Inductor turns the backward of an embedding lookup (and of other gathers) into a scatter-add
    whose threads add into shared rows in whatever order they reach them: two compiled backward
    passes of the same batch gave word-embedding gradients differing by 2e-7, and two compiled
    120-step runs of the main job differed in their losses from step 10 on. With torch's
    deterministic-algorithms flag on when the graphs are compiled, inductor falls back to the
    eager (ordered) kernel for those scatters; the flag is part of its cache key. Ops without a
    deterministic implementation only warn (``warn_only``), and new tensors are not filled with
    NaN (torch's default in this mode, a cost on every allocation). Measured on the tiny preset
    at batch 64 on 2 CPU cores: no change in step time (benchmarks/RESULTS.md). Global: it stays
    on for the rest of the process."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def autocast(device: torch.device, precision: str):
    """bf16 or fp16 autocast on CPU or GPU for precision 'bf16' / 'fp16'; a no-op for 'fp32'. (fp16
    training also needs loss scaling: the trainer's ``torch.amp.GradScaler``.)"""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    if precision != "fp32":
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return contextlib.nullcontext()


def machine_description() -> str:
    """One line naming the CPU (and GPU when there is one), thread count and torch version, for reports."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [cpu, f"{torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    return ", ".join(parts + [f"torch {torch.__version__}"])


def invocation() -> str:
    """The command line this process was started with, as a user would type it again (quoted)."""
    import shlex
    import sys
    from pathlib import Path

    if not sys.argv or not sys.argv[0]:
        return ""
    if Path(sys.argv[0]).name == "maskvlm":
        return shlex.join(["maskvlm", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def report_header(device: Optional[str] = None, details: str = "") -> list[str]:
    """The lines that open every benchmark report: machine, command, date (and ``details``)."""
    import time

    machine = machine_description() + (f"; device {device}" if device else "")
    date = time.strftime("%Y-%m-%d") + (f"; {details}" if details else "")
    return [f"Machine: {machine}", f"Command: `{invocation()}`", f"Date: {date}"]
