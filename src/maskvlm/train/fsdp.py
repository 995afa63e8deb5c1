"""Fully sharded data parallel training (``train.fsdp``, FSDP2 ``fully_shard``) under torchrun.

Every block of every encoder stack (the EMA teacher's too) is its own shard unit and the task
(embeddings, heads, norms, queues) is the root unit, so a rank holds 1/world of the parameters,
gradients and AdamW state and gathers one block at a time. The EMA update works shard by shard:
student and teacher tensors are split the same way. Checkpoints are the same files as unsharded
training: the full state dict is gathered (a collective on every rank) and rank 0 writes it; on
resume every rank reads the full files and keeps its shards. Evaluation runs on every rank
(forward passes are collectives) with the root unit gathered; only rank 0 logs it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..models.io import tied_names
from ..models.layers import encoder_stacks


class FSDPTask:
    """Shards ``task`` in place and converts its state to and from the unsharded checkpoint format."""

    def __init__(self, task: nn.Module):
        from torch.distributed.fsdp import fully_shard

        # tied tensors (e.g. the MLM decoder and the word embeddings) are saved once and loaded into both
        self.tied = tied_names(task)
        self.saved_names = [name for name in task.state_dict() if name not in self.tied]
        self.units = 0
        for stack in encoder_stacks(task):
            for child in stack.children():
                if isinstance(child, nn.ModuleList):
                    for block in child:
                        fully_shard(block)
                        self.units += 1
        # 0-d parameters (the ITC temperature) cannot be sharded: they stay replicated, and their
        # gradients are averaged by reduce_replicated() before the optimizer step
        self.replicated = [p for p in task.parameters() if p.ndim == 0]
        fully_shard(task, ignored_params=set(self.replicated))
        self.task = task

    def reduce_replicated(self) -> None:
        """Average the gradients of the replicated (unsharded) parameters over the ranks."""
        import torch.distributed as dist
        for p in self.replicated:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, **kw)

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 ({} elsewhere); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        full = get_model_state_dict(self.task, options=self._options(cpu_offload=True))
        return {k: full[k].contiguous() for k in self.saved_names if k in full}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Full AdamW state keyed by parameter name, on rank 0 ({} elsewhere); a collective."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(self.task, optimizer, options=self._options(cpu_offload=True))

    def load(self, state: dict[str, torch.Tensor], optimizer_state: dict | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> None:
        """Every rank passes the full state read from the checkpoint and keeps its shards."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        state = dict(state)
        walked = _walked_names(self.task)
        for name, source in self.tied.items():
            if name in walked:  # a parameter another module also holds: given the same full tensor
                state.setdefault(name, state[source])
            else:  # a second path to a shared module: torch's loader never distributes it, and the
                # copy of a full tensor into the sharded parameter would fail; the parameter itself
                # (loaded through ``source``) copies onto itself
                state[name] = self.task.get_parameter(name)
        set_model_state_dict(self.task, state, options=self._options())
        if optimizer is not None and optimizer_state is not None:
            # parameters a recipe never uses (e.g. ALBEF's MIM decoder) have no AdamW state to restore
            set_optimizer_state_dict(self.task, optimizer, optimizer_state, options=self._options(strict=False))

    @contextlib.contextmanager
    def gathered(self):
        """The root unit's parameters gathered (for evaluation code that calls model methods
        outside ``task.forward``); the blocks gather themselves as they run."""
        self.task.unshard()
        try:
            yield
        finally:
            self.task.reshard()



def _walked_names(module: nn.Module) -> set[str]:
    """The parameter names torch.distributed.checkpoint sees when it walks ``module``: each
    submodule once (``named_modules`` drops repeats the same way), so a module reachable under two
    names (SemMIM's prototype space, held by both of its objectives) is seen under the first only."""
    return {f"{prefix}.{name}" if prefix else name for prefix, m in module.named_modules()
            for name, _ in m.named_parameters(recurse=False)}
