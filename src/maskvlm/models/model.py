"""The MaskVLM model: image encoder, text encoder, text and image cross-modality encoders
and heads. Methods are pure functions of tensors returning typed outputs; no loss code
lives here (objectives consume these outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import Config, ModelConfig
from .fusion import ImageCrossEncoder
from .layers import set_attention_impl
from .heads import ITCHead, ITMHead, MLMHead, PixelHead
from .text import TextCrossEncoder, TextEncoder, TextOutput
from .vit import VisionOutput, VisionTransformer

from .io import TOKENIZER_FILE, load_state, model_weights, read_config, write_model_folder


@dataclass
class MaskVLMOutput:
    """Unmasked encodings of an image-text batch and their normalised ITC features."""
    image: VisionOutput
    text: TextOutput
    image_features: torch.Tensor  # (B, E), L2-normalised
    text_features: torch.Tensor  # (B, E), L2-normalised


class MaskVLM(nn.Module):
    def __init__(self, config: ModelConfig, encoder_mask_token: bool = False):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer)")
        self.config = config
        c = config
        self.visual_encoder = VisionTransformer(c.image_size, c.patch_size, c.vision_width, c.vision_layers,
                                                c.vision_heads, c.vision_mlp_ratio, use_mask_token=encoder_mask_token)
        self.text_encoder = TextEncoder(c.vocab_size, c.text_width, c.text_layers, c.text_heads, c.text_intermediate,
                                        c.max_position, c.type_vocab_size, c.hidden_dropout, c.attention_dropout)
        self.text_cross_encoder = TextCrossEncoder(c.text_width, c.cross_layers, c.text_heads, c.text_intermediate,
                                                   c.vision_width, c.hidden_dropout, c.attention_dropout)
        num_patches = (c.image_size // c.patch_size) ** 2
        self.image_cross_encoder = ImageCrossEncoder(c.vision_width, c.image_cross_layers, c.image_cross_heads,
                                                     c.text_width, num_patches, c.vision_mlp_ratio)
        self.itc_head = ITCHead.from_config(c.vision_width, c.text_width, c)
        self.itm_head = ITMHead(c.text_width)
        self.mlm_head = MLMHead(c.text_width, self.text_encoder.embeddings.word_embeddings)
        self.pixel_head = PixelHead(c.vision_width, c.patch_size)
        self.set_attention_impl(c.attention)

    def set_attention_impl(self, impl: str) -> None:
        set_attention_impl(self, impl)

    # --- encoders -------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, visible_idx: Optional[torch.Tensor] = None,
                     masked: Optional[torch.Tensor] = None) -> VisionOutput:
        return self.visual_encoder(images, visible_idx=visible_idx, masked=masked)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        return self.text_encoder(input_ids, attention_mask)

    def image_tokens(self, image: VisionOutput) -> torch.Tensor:
        """The image encoder's output tokens (B, 1 + n, D), CLS first, from the image alone."""
        return image.hidden

    def image_features(self, image: VisionOutput) -> torch.Tensor:
        return self.itc_head.image_features(image.hidden[:, 0])

    def text_features(self, text: TextOutput) -> torch.Tensor:
        return self.itc_head.text_features(text.hidden[:, 0])

    # --- fusion -----------------------------------------------------------------------------
    def fuse(self, text_hidden: torch.Tensor, text_mask: torch.Tensor, image_hidden: Optional[torch.Tensor],
             image_index: Optional[torch.Tensor] = None, image_kv: Optional[list[torch.Tensor]] = None,
             output_positions: Optional[torch.Tensor] = None, self_attended: bool = False) -> torch.Tensor:
        """Encoded text tokens (B, L, D_text) attending to encoded image tokens -> (B, L, D_text).
        ``image_index`` (B,): the image row of each text row (default: row i with row i);
        ``image_kv``: ``image_keys(image_hidden)`` made beforehand, to share it between calls;
        ``output_positions`` (B, Lq): only those tokens' states are returned (and computed in the last
        layer): (B, Lq, D_text); ``self_attended``: ``text_hidden`` is ``text_self_attention`` of the
        encoded text."""
        return self.text_cross_encoder(text_hidden, text_mask, image_hidden, image_index=image_index,
                                       image_kv=image_kv, output_positions=output_positions,
                                       self_attended=self_attended)

    def text_self_attention(self, text_hidden: torch.Tensor, text_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """The fusion's first step, which sees the text alone (the first layer's self-attention), for
        ``fuse(..., self_attended=True)``: a caption scored against many images computes it once.
        None where the model has no such step (one stream) or cannot run it apart (FSDP)."""
        return self.text_cross_encoder.self_attend_first(text_hidden, text_mask)

    def image_keys(self, image_hidden: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """The fusion layers' keys and values of these image tokens, computed once for several
        ``fuse`` calls (ITM's pairs and MLM attend to the same unmasked images); None when the
        layers are sharded (FSDP), whose weights exist only inside their own forward: each ``fuse``
        call then projects its images itself (still once per image within the call)."""
        if not self.text_cross_encoder.shares_context:
            return None
        return self.text_cross_encoder.project_context(image_hidden)

    def fuse_text(self, text: TextOutput, image_hidden: torch.Tensor) -> torch.Tensor:
        """Text tokens attending to image tokens -> (B, L, D_text)."""
        return self.fuse(text.hidden, text.attention_mask, image_hidden)

    def fuse_image(self, image: VisionOutput, text: TextOutput,
                   output_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image tokens (mask tokens where patches are missing) attending to text -> (B, 1 + N, D_image);
        with ``output_positions`` (B, Lq) (token positions, [CLS] = 0) only those tokens (B, Lq, D_image)."""
        return self.image_cross_encoder(image.hidden, image.visible_idx, image.grid, text.hidden, text.attention_mask,
                                        output_positions=output_positions)

    def itm_logits(self, fused_text: torch.Tensor) -> torch.Tensor:
        return self.itm_head(fused_text[:, 0])

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> MaskVLMOutput:
        image = self.encode_image(images)
        text = self.encode_text(input_ids, attention_mask)
        return MaskVLMOutput(image, text, self.image_features(image), self.text_features(text))

    # --- save / load --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, config: Config, tokenizer=None) -> Path:
        """Write ``config.yaml``, ``model.safetensors`` (and ``tokenizer.json``) into ``directory``."""
        return write_model_folder(Path(directory), self, config, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "MaskVLM":
        model, _, _ = load_pretrained(directory, device)
        return model


def build_model(config: Config):
    """The model named by ``model.arch``: the two-stream MaskVLM or the single-stream MLIM model."""
    if config.model.arch == "single_stream":
        from .single_stream import SingleStreamVLM
        return SingleStreamVLM(config.model)
    return MaskVLM(config.model, encoder_mask_token=not config.masking.visible_only)


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu"):
    """Load (model, config, tokenizer) from a folder written by ``save_pretrained`` or a checkpoint.
    The model is returned in eval mode (call ``.train()`` to fine-tune)."""
    from ..data.tokenizer import load_tokenizer

    directory = Path(directory)
    config = read_config(directory)
    model = build_model(config)
    load_state(model, model_weights(directory), str(directory / "model.safetensors"))
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE) if (directory / TOKENIZER_FILE).exists() else None
    return model.to(device).eval(), config, tokenizer
