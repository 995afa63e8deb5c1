"""Objectives: each a module ``(StepState) -> ObjectiveOutput`` over the model's outputs."""

from .base import ObjectiveOutput, StepState
from .itc import ITC, itc_loss
from .itm import ITM, sample_hard_negatives
from .mim import MIM
from .mlm import MLM

__all__ = ["ITC", "ITM", "MIM", "MLM", "ObjectiveOutput", "StepState", "itc_loss", "sample_hard_negatives"]
