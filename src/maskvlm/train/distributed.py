"""Process-group helpers. Every function is a no-op with one process, so single-process and
``torchrun`` runs take the same code path."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """Forward: every rank's tensor, concatenated. Backward: each rank's loss depends on every part,
    so the gradient of this rank's part is the sum over ranks of the gradient on that part."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        return all_gather_no_grad(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (equal shapes); gradients flow back to
    each rank's part."""
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def init_from_env(timeout_minutes: float | None = None) -> bool:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1 in the environment): NCCL on
    GPUs, gloo on CPUs, with a timeout so a dead rank ends the job instead of hanging it
    (``MASKVLM_DIST_TIMEOUT_MIN``, default 30 minutes). Returns whether this process is distributed."""
    import os
    from datetime import timedelta

    if timeout_minutes is None:
        timeout_minutes = float(os.environ.get("MASKVLM_DIST_TIMEOUT_MIN", "30"))

    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return True


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (e.g. a run folder name that contains a timestamp)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective on ``tensor`` must run: the current GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_share(n: int) -> torch.Tensor:
    """This rank's share of ``n`` items for work split over the ranks, as item indices.

    The items are cut into contiguous runs of ``ceil(n / world)``, one per rank in rank order, so
    only the last ranks' runs are short (or empty). Every rank gets exactly ``ceil(n / world)``
    indices, a short run padded with repeats of an index near its end, so the ranks run the same
    number of batches: under FSDP each batch's forward is a collective that all ranks must join.
    :func:`gather_shares` puts the results back together in item order."""
    world = world_size()
    size = -(-n // world) if n else 0
    start = min(n, rank() * size)
    own = min(n, start + size) - start
    indices = torch.arange(start, start + own)
    if own < size:  # padding: repeats of a real item, whose results are dropped
        indices = torch.cat([indices, torch.full((size - own,), max(0, min(n, start + own) - 1))])
    return indices


def gather_shares(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's results for its :func:`rank_share` (``local``: one row per index, padding included)
    concatenated in item order and trimmed to the ``n`` items, on ``local``'s device."""
    if world_size() == 1:
        return local[:n]
    moved = local.contiguous().to(_collective_device(local))
    # straight into one tensor: no list of parts to concatenate, so the peak is the result's size
    # (retrieval gathers every token state of the split this way)
    out = moved.new_empty((world_size() * moved.shape[0], *moved.shape[1:]))
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer torch: renamed
    gather_into(out, moved)
    # the runs are full up to the last rank holding items, so the real rows are the first n
    return out[:n].to(local.device)


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` (same shape and dtype on every rank) on every rank, on ``tensor``'s device."""
    if world_size() == 1:
        return tensor
    moved = tensor.contiguous().to(_collective_device(tensor))
    dist.broadcast(moved, src=src)
    return moved.to(tensor.device)


def global_max(value: int) -> int:
    """The largest ``value`` over all ranks."""
    if world_size() == 1:
        return value
    t = torch.tensor([int(value)])
    t = t.to(_collective_device(t))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop request that reached only
    some processes), so all ranks leave the loop at the same step."""
    return bool(global_max(int(flag)))


def shutdown(clean: bool = True) -> None:
    """Leave the process group before the interpreter exits (call it once, at the end of a job).

    gloo's worker threads free each finished collective's tensors after the caller has moved on,
    and freeing a tensor that Python has seen needs the GIL. If the interpreter is already shutting
    down by then, that thread is killed in the middle of a destructor and the process aborts with
    "terminate called without an active exception": a job that saved everything still exits with
    SIGABRT. With ``clean`` (the job finished on every rank), all ranks meet at a barrier and then
    release the GIL briefly so those threads can finish before the group is destroyed
    (docs/scale-out.md has the measurement). After an error the barrier is skipped (another rank may
    never reach it) and the group is only destroyed."""
    import logging
    import time

    if not is_distributed():
        return
    if clean:
        try:
            dist.barrier()
        except RuntimeError as e:  # another rank left after an error: there is nothing to wait for
            logging.getLogger("maskvlm").warning("leaving the process group without the other ranks: %s", e)
        else:
            time.sleep(0.2)  # no API reports gloo's worker threads idle; they need the GIL for milliseconds
    dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
