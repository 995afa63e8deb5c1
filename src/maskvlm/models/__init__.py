"""Encoders, fusion and heads; inference users need only this package and ``maskvlm.data``."""

from .model import MaskVLM, MaskVLMOutput, build_model, load_pretrained
from .text import TextOutput
from .vit import VisionOutput

__all__ = ["MaskVLM", "MaskVLMOutput", "TextOutput", "VisionOutput", "build_model", "load_pretrained"]
