"""Image transforms without torchvision: random resized crop, a horizontal flip that also
swaps "left"/"right" in the caption, resize and normalisation. Randomness comes from a
``torch.Generator`` so every sample is reproducible from its seed."""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def swap_left_right(caption: str) -> str:
    """Mirror the spatial words of a caption to match a horizontally flipped image."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], caption)


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratios of the random crops (width / height)
DECODE_SCALES = (8, 4, 2)  # the reductions libjpeg's DCT scaling offers (1/8, 1/4, 1/2)
FULL_SIZE = "maskvlm_full_size"  # key in Image.info: (width, height) before a reduced decode


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], generator: torch.Generator,
                            ratio: Sequence[float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """A crop box (left, top, right, bottom) covering ``scale`` of the area with aspect in ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            return left, top, left + w, top + h
    side = min(width, height)  # fallback: central square
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _full_size(image: Image.Image) -> tuple[int, int]:
    """The size ``image`` had before a reduced decode (``info[FULL_SIZE]``), or its own size. PIL
    copies ``info`` into crops and resizes too: a recorded size that does not reduce to the image's
    by one of the decode scales belongs to an image since changed, and is not used."""
    full = image.info.get(FULL_SIZE)
    if full is None or not any(-(-full[0] // s) == image.width and -(-full[1] // s) == image.height
                               for s in DECODE_SCALES):
        return image.size
    return full


class ImageTransform:
    """PIL image -> normalised float tensor (3, size, size). ``train`` adds crop and flip."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], train: bool = False,
                 crop_scale: Sequence[float] = (0.8, 1.0), hflip: float = 0.0, reduced_decode: bool = True):
        self.size = size
        self.reduced_decode = reduced_decode  # see decode_scale (data.reduced_decode)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.train = train
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip

    def decode_scale(self, width: int, height: int, generator: Optional[torch.Generator] = None) -> int:
        """By how much a ``width`` x ``height`` JPEG may be reduced while it is decoded (8, 4, 2 or 1):
        the largest of libjpeg's DCT scales at which the region this transform resizes from still has
        at least ``size`` pixels a side, so nothing is upsampled that would not have been. Decoding a
        1024 px photo at half size for a 224 px crop skips most of the decoding and resampling work
        (benchmarks/RESULTS.md). 1 when ``reduced_decode`` is off.

        The region: at evaluation the whole image. In training, with ``generator`` (in the state
        :meth:`__call__` will get it in), the very crop box ``__call__`` will then draw, so the scale
        suits this sample's crop; the generator is not advanced. Without it, the smallest crop
        :func:`random_resized_crop_box` can draw (``crop_scale[0]`` of the area at the extreme
        aspect ratio, or its fallback square), which suits any crop: for an image that serves
        several crops (two views; a stream's stand-in for a bad sample)."""
        if not self.reduced_decode:
            return 1
        side = float(min(width, height))
        if self.train and generator is not None:
            planned = torch.Generator().set_state(generator.get_state())
            left, top, right, bottom = random_resized_crop_box(width, height, self.crop_scale, planned)
            side = min(right - left, bottom - top)
        elif self.train:
            smallest = self.crop_scale[0] * width * height
            side = min(side, math.sqrt(smallest * CROP_RATIO[0]), math.sqrt(smallest / CROP_RATIO[1]))
        for scale in DECODE_SCALES:
            if side / scale >= self.size + 1:  # + 1: the crop box is rounded to whole pixels
                return scale
        return 1

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return (tensor - self.mean) / self.std

    def __call__(self, image: Image.Image, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, bool]:
        """Returns (tensor, flipped). A flipped image needs its caption passed through ``swap_left_right``."""
        # an image decoded reduced (decode_scale) is cropped as its full-size original would be: the
        # box is drawn in full-size pixels, then scaled to the decoded ones
        full_w, full_h = _full_size(image)
        image = image.convert("RGB")
        flipped = False
        if self.train:
            if generator is None:
                raise ValueError("a training transform needs a generator")
            box = random_resized_crop_box(full_w, full_h, self.crop_scale, generator)
            if (full_w, full_h) != image.size:
                fx, fy = image.width / full_w, image.height / full_h
                box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
            image = image.resize((self.size, self.size), Image.BICUBIC, box=box)
            if self.hflip > 0 and float(torch.rand((), generator=generator)) < self.hflip:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
                flipped = True
        elif image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BICUBIC)
        return self.to_tensor(image), flipped

    def denormalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixel values (for pictures)."""
        return (tensor * self.std.to(tensor.device) + self.mean.to(tensor.device)).clamp(0, 1)
