"""maskvlm: masked vision-language pre-training (MaskVLM and relatives) in PyTorch."""

__version__ = "0.1.0"

from .config import Config, ConfigError, build_config  # noqa: E402

__all__ = ["Config", "ConfigError", "build_config", "__version__"]
