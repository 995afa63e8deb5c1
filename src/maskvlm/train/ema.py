"""Exponential moving average (momentum) copies of a module, used as teachers.

The teacher is a frozen deep copy of the student; after every optimizer update
``teacher <- decay * teacher + (1 - decay) * student`` for every parameter, and buffers are
copied. It is a sub-module of the task, so its weights go into every checkpoint (under
``teacher.``) and resume restores them exactly; ``models.io.model_weights`` leaves them out
of exported models."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay}: expected a value in [0, 1)")
        self.decay = decay
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.model.eval()  # no dropout in the teacher, ever
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        teacher_params = dict(self.model.named_parameters())
        student_params = dict(student.named_parameters())
        if teacher_params.keys() != student_params.keys():
            raise ValueError("EMA teacher and student have different parameters")
        names = list(teacher_params)
        t = [teacher_params[n] for n in names]
        s = [student_params[n].detach().to(t[0].dtype) for n in names]
        torch._foreach_lerp_(t, s, 1.0 - self.decay)  # t + (1 - decay) * (s - t)
        for (_, tb), (_, sb) in zip(self.model.named_buffers(), student.named_buffers()):
            tb.copy_(sb)

    def forward(self, *args, **kwargs):
        raise RuntimeError("call the teacher's methods through EMATeacher.model")
