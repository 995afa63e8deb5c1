"""Using a trained model: embeddings, similarity, matching scores, fill-in-the-blank and
masked-image reconstruction, batched, without gradients, under autocast.

    from maskvlm.inference import VLM
    vlm = VLM.from_pretrained("runs/pre")                 # a run, checkpoint or exported folder
    img = vlm.encode_images(["a.png", "b.png"])             # (2, E), unit length
    txt = vlm.encode_texts(["a red circle", "a blue square"])
    vlm.similarity(img, txt)                                # (2, 2) cosine similarities
    vlm.itm_score(["a.png"], ["a red circle"])              # match probability of each pair
    vlm.encode_texts("a red circle")                        # (1, E): one string is one text
    vlm.fill_mask("a.png", "a [MASK] circle left of a blue square")
    vlm.reconstruct("a.png", "a red circle ...", mask_ratio=0.6)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .config import untrained_heads, untrained_note
from .data.formats import open_image
from .data.transforms import ImageTransform
from .models.io import load_state, model_weights, read_config
from .runtime import autocast, resolve_device

log = logging.getLogger("maskvlm")

# a path, a PIL image, or an (H, W) / (H, W, 3 or 4) uint8 array
ImageLike = Union[str, Path, Image.Image, np.ndarray]


def _one_or_many(items, single: tuple) -> list:
    """A list of the inputs: a lone item (a string, a path, a PIL image, one image array) is a list of one;
    a (N, H, W, C) array is N images."""
    if isinstance(items, np.ndarray) and items.ndim == 4:
        return list(items)
    return [items] if isinstance(items, single) else list(items)


def _images(images) -> list:
    images = _one_or_many(images, (str, Path, Image.Image, np.ndarray))
    for i, image in enumerate(images):
        if not (isinstance(image, (str, Path, Image.Image)) or (
                isinstance(image, np.ndarray) and image.dtype == np.uint8 and
                (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))))):
            what = (f"an array of shape {image.shape} and dtype {image.dtype}" if isinstance(image, np.ndarray)
                    else type(image).__name__)
            raise TypeError(f"images[{i}]: expected a path, a PIL image or an (H, W) / (H, W, 3 or 4) uint8 "
                            f"array, got {what}")
    return images


def _strings(texts) -> list[str]:
    texts = _one_or_many(texts, (str,))
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}]: expected a string, got {type(text).__name__}")
    return texts


def _to_pil(image: ImageLike, decode_scale=None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return open_image(Path(image), decode_scale=decode_scale)  # decoded as evaluation decodes it


class VLM:
    def __init__(self, model, config, tokenizer, device: str | torch.device = "auto", precision: str = "auto"):
        self.device = resolve_device(str(device))
        self.model = model.to(self.device).eval()
        self.config, self.tokenizer = config, tokenizer
        # bf16 autocast where it is fast (CPUs with bf16 units, GPUs); "fp32" for exact numbers
        self.precision = config.train.precision if precision == "auto" else precision
        m, d = config.model, config.data
        self.transform = ImageTransform(m.image_size, d.mean, d.std, train=False, reduced_decode=d.reduced_decode)
        self.max_len = d.max_text_len
        self._warned: set[str] = set()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", precision: str = "auto") -> "VLM":
        """Load a run folder (its newest checkpoint), a checkpoint or an exported model folder."""
        from .data.tokenizer import load_tokenizer
        from .models.io import TOKENIZER_FILE
        from .models.model import build_model

        from .train.checkpoint import model_folder

        folder = model_folder(path)
        config = read_config(folder)
        model = build_model(config)
        load_state(model, model_weights(folder), str(folder / "model.safetensors"))
        if not (folder / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no {TOKENIZER_FILE} next to the weights")
        return cls(model, config, load_tokenizer(folder / TOKENIZER_FILE), device, precision)

    def warn_untrained(self, what: str, heads: Sequence[str]) -> None:
        """Log a warning, once per head, when ``what`` uses a head that no training run of this
        model trained (e.g. ITM in an ``itc`` or ``mlim`` pre-training checkpoint)."""
        new = [h for h in untrained_heads(self.config, heads) if h not in self._warned]
        if new:
            self._warned.update(new)
            log.warning("%s: %s", what, untrained_note(self.config, new))

    # --- inputs ---------------------------------------------------------------------------------
    def _image_tensor(self, images: Sequence[ImageLike]) -> torch.Tensor:
        out = [self.transform(_to_pil(image, self.transform.decode_scale))[0] for image in _images(images)]
        return torch.stack(out).to(self.device)

    def _texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(_strings(texts), self.max_len)
        return ids.to(self.device), mask.to(self.device)

    def _masked_text(self, text: str, who: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention mask, positions of the mask tokens) of one text with at least one mask
        token, every one of them within the model's max_len tokens."""
        ids, mask = self._texts([text])
        positions = (ids[0] == self.tokenizer.mask_id).nonzero().flatten()
        mask_token = self.tokenizer.id_to_token(self.tokenizer.mask_id)
        written = text.count(mask_token)
        if written == 0:
            raise ValueError(f"{who}: the text has no {mask_token} token: {text!r}")
        cut = written - len(positions)
        if cut > 0:  # the text was cut at max_len tokens
            raise ValueError(f"{who}: the text is longer than the model's {self.max_len} tokens and {cut} of its "
                             f"{written} {mask_token} tokens fall after the cut; shorten it")
        return ids, mask, positions

    @staticmethod
    def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_size={size!r}: expected an integer of 1 or more")
        for start in range(0, len(items), size):
            yield items[start:start + size]

    # --- embeddings -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageLike] | ImageLike, batch_size: int = 64) -> torch.Tensor:
        """(N, embed_dim) L2-normalised ITC image features, on the CPU in float32 (N = 1 for one image)."""
        self.warn_untrained("encode_images", ["itc"])
        feats = [self.encode_pixels(self._image_tensor(chunk)) for chunk in self._batches(_images(images), batch_size)]
        return torch.cat(feats) if feats else torch.zeros(0, self.config.model.embed_dim)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_images` for images already through ``self.transform`` ((N, 3, H, W), e.g.
        from DataLoader workers): (N, embed_dim) features on the CPU in float32."""
        with autocast(self.device, self.precision):
            return self.model.image_features(self.model.encode_image(pixels.to(self.device))).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str] | str, batch_size: int = 256) -> torch.Tensor:
        """(N, embed_dim) L2-normalised ITC text features, on the CPU in float32 (N = 1 for one string)."""
        self.warn_untrained("encode_texts", ["itc"])
        feats = []
        for chunk in self._batches(_strings(texts), batch_size):
            with autocast(self.device, self.precision):
                feats.append(self.model.text_features(self.model.encode_text(*self._texts(chunk))).float())
        return torch.cat(feats).cpu() if feats else torch.zeros(0, self.config.model.embed_dim)

    @staticmethod
    def similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (images x texts) of features from ``encode_images`` / ``encode_texts``."""
        return image_features @ text_features.t()

    @torch.no_grad()
    def itm_score(self, images: Sequence[ImageLike] | ImageLike, texts: Sequence[str] | str,
                  batch_size: int = 64, log_odds: bool = False) -> torch.Tensor:
        """Probability that ``texts[i]`` describes ``images[i]`` (ITM head), for each pair
        (``log_odds``: its log-odds, the match logit minus the no-match logit, which does not
        saturate as the probability does near 0 and 1). Within a batch of pairs each distinct image
        (same path, or the same PIL object) and each distinct text is encoded once (the text with the
        fusion's first, text-only step), and the fusion reads only [CLS], so scoring one image against
        many texts (or one text against many images) costs little more than the fusion itself."""
        images, texts = _images(images), _strings(texts)
        if len(images) != len(texts):
            raise ValueError(f"itm_score pairs images with texts: got {len(images)} images and {len(texts)} texts")
        self.warn_untrained("itm_score", ["itm"])
        scores = []
        for pair_images, pair_texts in zip(self._batches(images, batch_size), self._batches(texts, batch_size)):
            image_rows, image_index = _distinct(pair_images)
            text_rows, text_index = _distinct(pair_texts)
            with autocast(self.device, self.precision):
                image = self.model.encode_image(self._image_tensor(image_rows))
                text = self.model.encode_text(*self._texts(text_rows))
                # the fusion's text-only first step once per distinct text, not once per pair
                first = self.model.text_self_attention(text.hidden, text.attention_mask)
                t = text_index.to(self.device)
                cls = torch.zeros(len(t), 1, dtype=torch.long, device=self.device)
                fused = self.model.fuse((text.hidden if first is None else first)[t], text.attention_mask[t],
                                        image.hidden, image_index=image_index.to(self.device), output_positions=cls,
                                        self_attended=first is not None)
                logits = self.model.itm_logits(fused).float()
            scores.append(logits[:, 1] - logits[:, 0] if log_odds else logits.softmax(dim=-1)[:, 1])
        return torch.cat(scores).cpu() if scores else torch.zeros(0)

    # --- masked modelling ---------------------------------------------------------------------------
    @torch.no_grad()
    def fill_mask(self, image: ImageLike, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """For each ``[MASK]`` in ``text`` (in order), the ``top_k`` (token, probability) predictions
        of the image-conditioned MLM head."""
        if top_k < 0:
            raise ValueError(f"fill_mask: top_k={top_k}: expected 0 or more")
        self.warn_untrained("fill_mask", ["mlm"])
        ids, mask, positions = self._masked_text(text, "fill_mask")
        with autocast(self.device, self.precision):
            encoded = self.model.encode_image(self._image_tensor([image]))
            fused = self.model.fuse_text(self.model.encode_text(ids, mask), encoded.hidden)
            logits = self.model.mlm_head(fused[0, positions]).float()
        # only ids a token has: not the gaps nor unused rows of a padded embedding table
        tokens = self.tokenizer.token_mask(logits.shape[-1]).to(logits.device)
        probs = logits.masked_fill(~tokens, -torch.inf).softmax(dim=-1)
        out = []
        for row in probs:
            p, idx = row.topk(min(top_k, int(tokens.sum())))
            out.append([(self.tokenizer.id_to_token(int(i)), float(v)) for v, i in zip(p, idx)])
        return out

    @torch.no_grad()
    def reconstruct(self, image: ImageLike, text: str, mask_ratio: float = 0.6, seed: int = 0
                    ) -> tuple[Image.Image, Image.Image, Image.Image]:
        """Mask ``mask_ratio`` of the image (2x2-patch blocks, seeded), let the text-conditioned MIM
        decoder fill it in. Returns (input, masked input, reconstruction) as PIL images; the
        reconstruction keeps the visible patches and shows predictions in the masked ones."""
        from .insight import _masked_view, fill_masked_patches, image_masks

        if not 0 <= mask_ratio <= 1:
            raise ValueError(f"reconstruct: mask_ratio={mask_ratio}: expected a value in [0, 1]")
        pixels = self._image_tensor([image])
        mask = image_masks(self, 1, mask_ratio, seed).to(self.device)
        composed = fill_masked_patches(self, pixels, mask, [text]).recon
        masked_view = _masked_view(self, pixels, mask)  # masked regions in the dataset mean colour

        def to_pil(t: torch.Tensor) -> Image.Image:
            arr = (self.transform.denormalize(t[0].float().cpu()) * 255).round().byte().permute(1, 2, 0).numpy()
            return Image.fromarray(arr)
        return to_pil(pixels), to_pil(masked_view), to_pil(composed)


def _distinct(items: Sequence) -> tuple[list, torch.Tensor]:
    """(the distinct items in first-seen order, each item's index into them). Paths and strings
    count as equal by value, PIL images by identity."""
    first: dict = {}
    index = [first.setdefault(item if isinstance(item, (str, Path)) else id(item), len(first)) for item in items]
    rows = list({key: item for key, item in zip(index, items)}.values())
    return rows, torch.tensor(index, dtype=torch.long)
