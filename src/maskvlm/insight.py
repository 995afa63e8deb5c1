"""Seeing what a model learned: masked-image reconstructions with matching and mismatched
captions, fill-in-the-blank under changed images, Grad-CAM grounding heat maps with a
pointing-game score, aggregate cross-modal dependence figures, and training curves.

Every function takes a :class:`maskvlm.inference.VLM`; the CLI commands ``maskvlm reconstruct``,
``fill-mask``, ``ground``, ``evaluate grounding``, ``evaluate cross-modal`` and ``plot`` call them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .data.formats import DataError, load_annotations, open_image
from .inference import VLM, ImageLike
from .masking import block_mask, mask_to_indices
from .runtime import autocast
from .train.logging import read_jsonl

log = logging.getLogger("maskvlm")

CELL = 128  # pixels per image in the pictures (small scenes are enlarged, nearest neighbour)


# --- shared pieces -----------------------------------------------------------------------------
def _grid(vlm: VLM) -> tuple[int, int]:
    m = vlm.config.model
    return (m.image_size // m.patch_size,) * 2


def image_masks(vlm: VLM, n: int, ratio: float, seed: int) -> torch.Tensor:
    """(n, N) bool patch masks in the recipe's block layout, the same for a given seed."""
    return block_mask(n, _grid(vlm), ratio, vlm.config.masking.image_block, torch.Generator().manual_seed(seed))


@dataclass
class MaskedFill:
    """The MIM decoder's output for masked patches: ``recon`` the composed image (normalised
    pixels, visible patches kept), ``error`` the mean L1 over masked patches per image, measured
    in the space the recipe's loss uses (per-patch normalised pixels when ``loss.norm_pix``)."""
    recon: torch.Tensor
    error: torch.Tensor


@torch.no_grad()
def fill_masked_patches(vlm: VLM, pixels: torch.Tensor, mask: torch.Tensor, texts: Sequence[str]) -> MaskedFill:
    """Text-conditioned reconstruction of the masked patches of ``pixels`` (B, 3, H, W), normalised."""
    from .models.vit import patchify, unpatchify

    vlm.warn_untrained("masked-image reconstruction", ["mim"])
    m, model = vlm.config.model, vlm.model
    grid = _grid(vlm)
    pixels, mask = pixels.to(vlm.device), mask.to(vlm.device)
    ids, attn = vlm._texts(texts)
    target = patchify(pixels.float(), m.patch_size)
    with autocast(vlm.device, vlm.precision):
        text_out = model.encode_text(ids, attn)
        if hasattr(model, "reconstruct"):  # single-stream: deconvolution decoder output in [0, 1]
            encoded = model.encode_image(pixels, masked=mask)
            recon01 = model.reconstruct(model.fuse_image(encoded, text_out)).float()
            mean, std = (t.to(vlm.device).view(1, 3, 1, 1) for t in (vlm.transform.mean, vlm.transform.std))
            recon = (recon01.view_as(pixels) - mean) / std
            pred = patchify(recon, m.patch_size)
        else:
            if vlm.config.masking.visible_only:
                encoded = model.encode_image(pixels, visible_idx=mask_to_indices(~mask))
            else:
                encoded = model.encode_image(pixels, masked=mask)
            pred = model.pixel_head(model.fuse_image(encoded, text_out)[:, 1:]).float()
    if not hasattr(model, "reconstruct") and vlm.config.loss.norm_pix:
        mu, sd = target.mean(-1, keepdim=True), target.std(-1, keepdim=True)
        err = (pred - (target - mu) / (sd + 1e-6)).abs().mean(-1)
        pred = pred * sd + mu  # shown with each patch's own scale restored
    else:
        err = (pred - target).abs().mean(-1)
    error = (err * mask).sum(1) / mask.sum(1).clamp(min=1)
    recon = unpatchify(pred, m.patch_size, grid)
    pm = _pixel_mask(mask, m.patch_size, grid)
    return MaskedFill(recon=pixels * (1 - pm) + recon * pm, error=error.cpu())


def _pixel_mask(mask: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    pm = mask.view(-1, 1, *grid).float()
    return pm.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def _masked_view(vlm: VLM, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked patches shown in the dataset mean colour (zero after normalisation)."""
    m = vlm.config.model
    return pixels * (1 - _pixel_mask(mask.to(pixels.device), m.patch_size, _grid(vlm)))


def _to_pil(vlm: VLM, t: torch.Tensor, size: int = CELL) -> Image.Image:
    arr = (vlm.transform.denormalize(t.float().cpu()) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr).resize((size, size), Image.NEAREST)


def _grid_picture(rows: list[list[Image.Image]], header: Sequence[str], notes: Sequence[str] = ()) -> Image.Image:
    """Cells in rows, a header line over the columns and an optional note under each row."""
    cols = max(len(r) for r in rows)
    w = rows[0][0].width
    head, note_h, pad = 16, 14 if notes else 0, 2
    out = Image.new("RGB", (cols * (w + pad) + pad, head + len(rows) * (w + note_h + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    for c, title in enumerate(header):
        draw.text((pad + c * (w + pad) + 2, 2), title, fill="black")
    for r, row in enumerate(rows):
        y = head + r * (w + note_h + pad)
        for c, cell in enumerate(row):
            out.paste(cell, (pad + c * (w + pad), y))
        if notes:
            draw.text((pad + 2, y + w + 1), notes[r], fill="black")
    return out


# --- reconstructions -----------------------------------------------------------------------------
@dataclass
class ReconstructionResult:
    picture: Image.Image
    error_matching: list[float]
    error_mismatched: list[float]


def reconstruction_grid(vlm: VLM, images: Sequence[ImageLike], texts: Sequence[str],
                        mismatched: Sequence[str], mask_ratio: float = 0.6, seed: int = 0) -> ReconstructionResult:
    """One row per image: original, masked input, reconstruction with the matching caption, with a
    mismatched caption (the same mask for both). Returns the picture and the masked-patch L1 errors."""
    if not (len(images) == len(texts) == len(mismatched)) or not images:
        raise ValueError(f"reconstruction_grid: got {len(images)} images, {len(texts)} captions and "
                         f"{len(mismatched)} mismatched captions; expected the same non-zero number")
    pixels = vlm._image_tensor(images)
    mask = image_masks(vlm, len(images), mask_ratio, seed)
    match = fill_masked_patches(vlm, pixels, mask, texts)
    other = fill_masked_patches(vlm, pixels, mask, mismatched)
    masked = _masked_view(vlm, pixels, mask)
    rows, notes = [], []
    for i in range(len(images)):
        rows.append([_to_pil(vlm, t[i]) for t in (pixels, masked, match.recon, other.recon)])
        notes.append(f"L1 {match.error[i]:.3f} vs {other.error[i]:.3f}")
    picture = _grid_picture(rows, ["original", f"masked {mask_ratio:.0%}", "matching text", "mismatched text"],
                            notes)
    return ReconstructionResult(picture, match.error.tolist(), other.error.tolist())


# --- fill-in-the-blank ------------------------------------------------------------------------------
FILL_CONDITIONS = ("image", "masked image", "mismatched image")


@torch.no_grad()
def fill_mask_compare(vlm: VLM, image: ImageLike, mismatched_image: ImageLike, text: str, top_k: int = 5
                      ) -> list[dict[str, list[tuple[str, float]]]]:
    """For each [MASK] in ``text``: the top-k tokens given the image, the image with every patch
    masked, and a mismatched image."""
    vlm.warn_untrained("fill-mask", ["mlm"])
    ids, attn, positions = vlm._masked_text(text, "fill-mask")
    pixels = vlm._image_tensor([image, mismatched_image])
    results: dict[str, torch.Tensor] = {}
    with autocast(vlm.device, vlm.precision):
        text_out = vlm.model.encode_text(ids, attn)
        for name, hidden in (("image", _image_hidden(vlm, pixels[:1], full_mask=False)),
                             ("masked image", _image_hidden(vlm, pixels[:1], full_mask=True)),
                             ("mismatched image", _image_hidden(vlm, pixels[1:], full_mask=False))):
            fused = vlm.model.fuse_text(text_out, hidden)
            results[name] = vlm.model.mlm_head(fused[0, positions]).float().softmax(-1)
    out = []
    for j in range(len(positions)):
        row = {}
        for name in FILL_CONDITIONS:
            p, idx = results[name][j].topk(min(top_k, results[name].shape[-1]))
            row[name] = [(vlm.tokenizer.id_to_token(int(i)), float(v)) for v, i in zip(p, idx)]
        out.append(row)
    return out


def _image_hidden(vlm: VLM, pixels: torch.Tensor, full_mask: bool) -> torch.Tensor:
    """Encoded image tokens; with ``full_mask`` every patch is masked the way the recipe masks
    (dropped for visible-only encoders, the mask token otherwise)."""
    if not full_mask:
        return vlm.model.encode_image(pixels).hidden
    n = pixels.shape[0]
    num = _grid(vlm)[0] * _grid(vlm)[1]
    if vlm.config.masking.visible_only:
        return vlm.model.encode_image(pixels, visible_idx=torch.zeros(n, 0, dtype=torch.long,
                                                                      device=pixels.device)).hidden
    return vlm.model.encode_image(pixels, masked=torch.ones(n, num, dtype=torch.bool, device=pixels.device)).hidden


def fill_mask_markdown(text: str, rows: list[dict[str, list[tuple[str, float]]]]) -> str:
    lines = [f"`{text}`", ""]
    for j, row in enumerate(rows):
        lines += [f"mask {j + 1}:", "", "| rank | " + " | ".join(FILL_CONDITIONS) + " |",
                  "|---|" + "---|" * len(FILL_CONDITIONS)]
        for r in range(max(len(v) for v in row.values())):
            cells = [f"{row[c][r][0]} ({row[c][r][1]:.2f})" if r < len(row[c]) else "" for c in FILL_CONDITIONS]
            lines.append(f"| {r + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# --- grounding ----------------------------------------------------------------------------------------
def _grounding_attention(vlm: VLM) -> tuple[list, str]:
    """The attention modules Grad-CAM reads, one per layer, and what they are: the cross-attention of
    the text cross-modality encoder (two-stream) or the joint self-attention over ``[text; image]``
    of the single-stream model, whose text-to-image block plays the same part."""
    model = vlm.model
    if hasattr(model, "text_cross_encoder"):
        return [layer.crossattention.attn for layer in model.text_cross_encoder.layer], "cross-attention"
    return [block.attn for block in model.blocks], "joint attention"


def default_layer(vlm: VLM) -> int:
    """The middle attention layer, rounded down (ALBEF uses the 3rd of its 6 fusion layers). In the
    last layer only the [CLS] output reaches the ITM head, so word tokens get no gradient there."""
    return (len(_grounding_attention(vlm)[0]) - 1) // 2


def grounding_layer_name(vlm: VLM, layer: Optional[int] = None) -> str:
    """E.g. "cross-attention layer 0", for reports."""
    return f"{_grounding_attention(vlm)[1]} layer {default_layer(vlm) if layer is None else layer}"


def _attention_at(vlm: VLM, layer: Optional[int]):
    layers, kind = _grounding_attention(vlm)
    index = default_layer(vlm) if layer is None else layer
    if not -len(layers) <= index < len(layers):
        where = "text cross-modality encoder" if kind == "cross-attention" else "single-stream transformer"
        raise ValueError(f"--layer {layer}: the {where} has {len(layers)} layers")
    return layers[index], layers[index] is layers[-1]


def grounding_maps(vlm: VLM, images: Sequence[ImageLike], texts: Sequence[str], layer: Optional[int] = None
                   ) -> torch.Tensor:
    """Grad-CAM of each text over its image (B, gh, gw), each map scaled to [0, 1].

    The attention probabilities of text tokens over image patches in one layer (the text
    cross-modality encoder's cross-attention; in the single-stream model, the text rows and image
    columns of the joint self-attention) are weighted by the positive part of their gradient of the
    ITM match logit, averaged over heads and over the text's word tokens ([CLS], [SEP] and padding
    left out; in the last layer, where only [CLS] has a gradient, the [CLS] row): the
    weakly-supervised grounding of ALBEF and MAMO. Computed in fp32."""
    if len(images) != len(texts):
        raise ValueError(f"grounding pairs images with texts: got {len(images)} images and {len(texts)} texts")
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:  # no word tokens to ground: the map would be of nothing the text says
        raise ValueError(f"grounding: text {blank[0]} is empty")
    vlm.warn_untrained("grounding", ["itm"])
    attn, last = _attention_at(vlm, layer)
    pixels = vlm._image_tensor(images)
    ids, mask = vlm._texts(texts)
    length = ids.shape[1]
    attn.record = True
    try:
        with torch.enable_grad():
            image = vlm.model.encode_image(pixels)
            fused = vlm.model.fuse_text(vlm.model.encode_text(ids, mask), image.hidden)
            logits = vlm.model.itm_logits(fused).float()
            probs = attn.probs
            logits[:, 1].sum().backward(inputs=[probs])
            cam = (probs.detach() * probs.grad.clamp(min=0)).mean(1)
            # (B, L, N): text rows over image patches, the image CLS left out
            cam = cam[:, :, 1:] if attn.is_cross else cam[:, :length, length + 1:]
    finally:
        attn.record = False
        attn.probs = None
        vlm.model.zero_grad(set_to_none=True)
    words = mask.clone().float()
    words[:, 0] = 0  # [CLS]
    words[torch.arange(len(texts)), mask.sum(1) - 1] = 0  # [SEP]
    if last:
        words = torch.zeros_like(words)
        words[:, 0] = 1
    cam = (cam * words.unsqueeze(-1)).sum(1) / words.sum(1, keepdim=True).clamp(min=1)
    cam = cam.view(len(texts), *_grid(vlm))
    lo = cam.flatten(1).min(1).values.view(-1, 1, 1)
    hi = cam.flatten(1).max(1).values.view(-1, 1, 1)
    return ((cam - lo) / (hi - lo).clamp(min=1e-12)).cpu()


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, gh, gw) patch maps -> (B, size, size), bilinear."""
    return F.interpolate(maps.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def overlay(vlm: VLM, image: ImageLike, heat: torch.Tensor, size: int = 256) -> Image.Image:
    """The image with the heat map (gh, gw) blended over it (blue = low, red = high)."""
    base = _to_pil(vlm, vlm._image_tensor([image])[0], size).convert("RGB")
    h = upsample(heat[None], size)[0].numpy()[..., None]
    # the "jet" colour scale, piecewise linear: blue -> cyan -> yellow -> red
    colours = (np.clip(1.5 - np.abs(4 * h - np.array([3.0, 2.0, 1.0])), 0, 1) * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(colours), 0.45)


def pointing_hit(heat: torch.Tensor, box: Sequence[float], image_size: int) -> bool:
    """True when the maximum of the heat map (upsampled to the image) falls inside the box
    ``[x0, y0, x1, y1]`` (pixels, inclusive)."""
    full = upsample(heat[None], image_size)[0]
    y, x = divmod(int(full.argmax()), image_size)
    x0, y0, x1, y1 = box
    return x0 <= x <= x1 and y0 <= y <= y1


def _box_fraction(box: Sequence[float], image_size: int) -> float:
    """Share of the image's pixel positions inside the (clipped) box: a uniform random point's hit rate."""
    x0, y0, x1, y1 = (min(max(v, 0), image_size - 1) for v in box)
    return max(0, x1 - x0 + 1) * max(0, y1 - y0 + 1) / image_size ** 2


def referring_phrases(entry: dict, where: str = "entry") -> list[tuple[str, list[float], list[list[float]]]]:
    """("the red circle", box, other objects' boxes) for each object whose colour and shape no other
    object in the scene shares. A malformed ``objects`` list is an error naming ``where``."""
    objects = entry.get("objects") or []
    for j, o in enumerate(objects if isinstance(objects, list) else [objects]):
        box = o.get("box") if isinstance(o, dict) else None
        if not (isinstance(o, dict) and isinstance(o.get("color"), str) and isinstance(o.get("shape"), str)
                and isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise DataError(f"{where}: objects[{j}] must be an object with string 'color' and 'shape' and a 'box' "
                            "of 4 numbers [x0, y0, x1, y1]")
    names = [f"{o['color']} {o['shape']}" for o in objects]
    return [(f"the {n}", o["box"], [b["box"] for b in objects if b is not o])
            for n, o in zip(names, objects) if names.count(n) == 1]


def pointing_game(vlm: VLM, annotations: Path, image_root: Optional[Path] = None, layer: Optional[int] = None,
                  batch_size: int = 32, progress: bool = True) -> dict:
    """Pointing-game accuracy of the Grad-CAM maps for every uniquely named object of a retrieval
    JSON whose entries list ``objects`` with boxes (the synthetic scenes do)."""
    from tqdm import tqdm

    entries = load_annotations(annotations, strict=False)
    root = Path(image_root) if image_root else Path(annotations).parent
    queries = [(root / e["image"], phrase, box, others) for i, e in enumerate(entries)
               for phrase, box, others in referring_phrases(e, f"{annotations}: entry {i}")]
    if not queries:
        raise ValueError(f"{annotations}: no entry lists 'objects' with 'color', 'shape' and 'box'; the pointing "
                         "game needs object boxes (the synthetic scenes have them)")
    size = vlm.config.model.image_size
    hits, random_rate, centre, multi, multi_hits, wrong = 0, 0.0, 0, 0, 0, 0
    for start in tqdm(range(0, len(queries), batch_size), desc="grounding", disable=not progress):
        chunk = queries[start:start + batch_size]
        maps = grounding_maps(vlm, [q[0] for q in chunk], [q[1] for q in chunk], layer)
        for heat, (_, _, box, others) in zip(maps, chunk):
            hit = pointing_hit(heat, box, size)
            hits += hit
            random_rate += _box_fraction(box, size)
            if others:  # scenes with several objects: does it point at the named one or another?
                multi += 1
                multi_hits += hit
                wrong += not hit and any(pointing_hit(heat, b, size) for b in others)
            c = size // 2
            centre += box[0] <= c <= box[2] and box[1] <= c <= box[3]
    n = len(queries)
    return {"phrases": n, "images": len(entries), "pointing_accuracy": 100.0 * hits / n,
            "uniform_random_point": 100.0 * random_rate / n, "image_centre": 100.0 * centre / n,
            "multi_object_phrases": multi, "multi_object_accuracy": 100.0 * multi_hits / max(multi, 1),
            "multi_object_other_object": 100.0 * wrong / max(multi, 1),
            "layer": default_layer(vlm) if layer is None else layer, "attention": grounding_layer_name(vlm, layer)}


# --- cross-modal dependence ----------------------------------------------------------------------------
@torch.no_grad()
def cross_modal_dependence(vlm: VLM, annotations: Path, image_root: Optional[Path] = None,
                           text_ratio: Optional[float] = None, image_ratio: Optional[float] = None,
                           batch_size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """How much each modality helps the other's masked prediction, over a retrieval JSON (first
    caption of each image). MLM accuracy on masked caption tokens given the matching image, a
    mismatched image (another scene of the split) and a fully masked image; MIM L1 error on masked
    patches given the matching caption, a mismatched caption and an empty caption. The masks are
    the same in every condition (seeded)."""
    from tqdm import tqdm

    vlm.warn_untrained("cross-modal dependence", ["mlm", "mim"])
    entries = load_annotations(annotations)
    if len(entries) < 2:
        raise ValueError(f"{annotations}: needs at least 2 images (mismatched pairs come from other images)")
    root = Path(image_root) if image_root else Path(annotations).parent
    paths = [root / e["image"] for e in entries]
    captions = [e["caption"][0] if isinstance(e["caption"], list) else e["caption"] for e in entries]
    shift = len(entries) // 2  # the mismatched partner of item i is item i + shift
    t_ratio = vlm.config.masking.text_ratio if text_ratio is None else text_ratio
    i_ratio = vlm.config.masking.image_ratio if image_ratio is None else image_ratio
    gen = torch.Generator().manual_seed(seed)
    mlm = {k: [0, 0] for k in ("matching image", "mismatched image", "masked image")}
    mim = {k: [] for k in ("matching text", "mismatched text", "empty text")}
    for start in tqdm(range(0, len(entries), batch_size), desc="cross-modal", disable=not progress):
        idx = list(range(start, min(start + batch_size, len(entries))))
        other = [(i + shift) % len(entries) for i in idx]
        pixels = vlm._image_tensor([paths[i] for i in idx])
        other_pixels = vlm._image_tensor([paths[i] for i in other])
        # MLM: mask t_ratio of the word tokens (at least one) by [MASK]
        ids, attn = vlm._texts([captions[i] for i in idx])
        words = attn.bool().clone()
        words[:, 0] = False
        words[torch.arange(len(idx)), attn.sum(1) - 1] = False
        pick = (torch.rand(ids.shape, generator=gen).to(ids.device) < t_ratio) & words
        first = (words.float().cumsum(1) == 1) & words
        pick |= first & ~pick.any(1, keepdim=True)
        masked_ids = ids.masked_fill(pick, vlm.tokenizer.mask_id)
        with autocast(vlm.device, vlm.precision):
            text_out = vlm.model.encode_text(masked_ids, attn)
            for name, hidden in (("matching image", _image_hidden(vlm, pixels, False)),
                                 ("mismatched image", _image_hidden(vlm, other_pixels, False)),
                                 ("masked image", _image_hidden(vlm, pixels, True))):
                logits = vlm.model.mlm_head(vlm.model.fuse_text(text_out, hidden)[pick])
                mlm[name][0] += int((logits.argmax(-1) == ids[pick]).sum())
                mlm[name][1] += int(pick.sum())
        # MIM: the same patch mask under three captions
        mask = block_mask(len(idx), _grid(vlm), i_ratio, vlm.config.masking.image_block, gen)
        for name, texts in (("matching text", [captions[i] for i in idx]),
                            ("mismatched text", [captions[i] for i in other]),
                            ("empty text", [""] * len(idx))):
            mim[name].extend(fill_masked_patches(vlm, pixels, mask, texts).error.tolist())
    diff = np.array(mim["mismatched text"]) - np.array(mim["matching text"])
    return {"images": len(entries), "text_ratio": t_ratio, "image_ratio": i_ratio,
            "mlm_accuracy": {k: 100.0 * c / max(n, 1) for k, (c, n) in mlm.items()},
            "mim_l1": {k: float(np.mean(v)) for k, v in mim.items()},
            # paired over images: how much (and how often) the matching caption lowers the error
            "mim_gain_mean": float(diff.mean()), "mim_gain_stderr": float(diff.std(ddof=1) / math.sqrt(len(diff))),
            "mim_matching_lower_share": 100.0 * float((diff > 0).mean())}


# --- training curves ---------------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` as its curves should show them: where a resumed run logged
    steps again, its rows replace those written before the resume from that step on."""
    path = Path(run_dir) / "metrics.jsonl" if Path(run_dir).is_dir() else Path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (give a run folder written by maskvlm pretrain/finetune)")
    rows: list[dict] = []
    last_train = None
    records, skipped = read_jsonl(path)
    for row in records:
        if row.get("split") == "train" and isinstance(row.get("step"), (int, float)):
            if last_train is not None and row["step"] <= last_train:
                # a resumed run logs again the steps after its checkpoint: the rows written before
                # the resume from those steps on are the lost (or abandoned) stretch
                rows = [r for r in rows if not (isinstance(r.get("step"), (int, float))
                                                and r["step"] >= row["step"])]
            last_train = row["step"]
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no records" + (f" ({skipped} lines are not JSON)" if skipped else " yet"))
    return rows


def plot_curves(run_dirs: Sequence[Path], out: Path) -> Path:
    """Loss terms, learning rate, throughput and evaluation metrics over steps, one line per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("maskvlm plot needs matplotlib: pip install matplotlib (or the [plot] extra)") from None
    runs = [(Path(d).name, read_metrics(Path(d))) for d in run_dirs]
    skip = {"step", "time", "epoch", "split", "lr", "samples_per_s"}
    losses = sorted({k for _, rows in runs for r in rows if r.get("split", "train") == "train"
                     for k, v in r.items() if k.endswith("loss") and k not in skip and isinstance(v, (int, float))})
    evals = sorted({k for _, rows in runs for r in rows if r.get("split", "train") != "train"
                    for k, v in r.items() if k not in skip and isinstance(v, (int, float))
                    and (k.startswith(("r1", "itc_r1", "acc", "vqa")) or k in ("accuracy", "r_mean"))})
    panels = [(k, "train") for k in losses] + [("lr", "train"), ("samples_per_s", "train")] + [(k, "eval")
                                                                                                for k in evals]
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, (key, kind) in zip(axes.flat, panels):
        for name, rows in runs:
            for split in sorted({r.get("split", "train") for r in rows}):
                if (kind == "train") != (split == "train"):
                    continue
                pts = [(r["step"], r[key]) for r in rows if r.get("split", "train") == split and key in r
                       and isinstance(r[key], (int, float)) and "step" in r]
                if pts:
                    xs, ys = zip(*pts)
                    label = name if kind == "train" else f"{name} ({split})"
                    ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, ms=3, label=label)
        splits = sorted({r.get("split", "train") for _, rows in runs for r in rows if key in r} - {"train"})
        ax.set_title(key if kind == "train" else f"{key} ({', '.join(splits)})", fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if key.endswith("loss"):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(runs) > 1 and handles:
        fig.legend(handles, labels, loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    if not out.suffix:  # matplotlib would add .png itself, and the caller report the name without it
        out = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --- attribute binding ---------------------------------------------------------------------------
BINDING_PROBES = ("colour", "shape", "side")


def _swap_words(text: str, a: str, b: str) -> Optional[str]:
    """``text`` with the whole words ``a`` and ``b`` exchanged, or None unless each occurs exactly once."""
    import re

    words = {w: re.findall(rf"\b{re.escape(w)}\b", text) for w in (a, b)}
    if a == b or any(len(found) != 1 for found in words.values()):
        return None
    return re.sub(rf"\b({re.escape(a)}|{re.escape(b)})\b", lambda m: b if m.group(0) == a else a, text)


def binding_probes(entry: dict) -> dict[str, tuple[str, str]]:
    """(caption, the same caption with two attributes exchanged) per probe, for a scene of two
    objects (``objects`` with ``color`` and ``shape``, as the synthetic scenes list them):

    - ``colour``: the two objects' colours swapped ("an orange circle left of a white cross" ->
      "a white circle left of an orange cross");
    - ``shape``: their shapes swapped;
    - ``side``: "left" and "right" swapped (every occurrence).

    Each probe uses the first caption where the swap applies (each word exactly once; both sides
    named, or one); scenes where it does not apply get no probe. The swapped caption describes
    another scene with the same words, so only binding tells them apart. An article before a
    swapped colour is fixed ("a orange" -> "an orange")."""
    import re

    objects = entry.get("objects")
    captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
    if not isinstance(objects, list) or len(objects) != 2 or not all(isinstance(o, dict) for o in objects):
        return {}
    out = {}
    pairs = {"colour": (objects[0].get("color"), objects[1].get("color")),
             "shape": (objects[0].get("shape"), objects[1].get("shape"))}
    for probe, (a, b) in pairs.items():
        if isinstance(a, str) and isinstance(b, str):
            for caption in captions:
                swapped = _swap_words(caption, a, b)
                if swapped is not None:
                    out[probe] = (caption, re.sub(r"\ba(n?) (\w)", lambda m: ("an " if m.group(2) in "aeiou" else "a ")
                                                  + m.group(2), swapped))
                    break
    for caption in captions:
        if re.search(r"\b(left|right)\b", caption):
            swapped = re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(0) == "left" else "left", caption)
            out["side"] = (caption, swapped)
            break
    return out


@torch.no_grad()
def binding_test(vlm: VLM, annotations: Path, image_root: Optional[Path] = None, batch_size: int = 64,
                 progress: bool = True) -> dict:
    """How often the model scores an image's caption above the same caption with two attributes
    exchanged (:func:`binding_probes`), by ITC similarity and by the ITM match probability; 50% is
    chance. The control asks the same of another scene's image (the pair half the list away):
    a model that reads the image is near 50% there, while a preference for one wording that does
    not depend on the image shows up in both. The side probe is also asked of each scene mirrored
    (the image flipped, "left" and "right" swapped in both captions), so that a preference for
    one side word, whatever the image, scores 50% rather than the share of captions that use it.
    Needs scenes that list their ``objects`` (the synthetic ones do)."""
    from tqdm import tqdm

    from .data.transforms import swap_left_right

    entries = load_annotations(annotations, strict=False)
    root = Path(image_root) if image_root else Path(annotations).parent
    items = []
    for e in entries:
        for probe, (true, swapped) in binding_probes(e).items():
            items.append((root / e["image"], probe, true, swapped, False))
            if probe == "side":  # and mirrored: the image flipped, both captions' sides swapped
                items.append((root / e["image"], probe, swap_left_right(true), swap_left_right(swapped), True))
    if not items:
        raise ValueError(f"{annotations}: no scene of two objects with 'color' and 'shape' (the synthetic scenes "
                         "list them); the binding test needs them")
    n = len(items)
    others = [(items[(k + n // 2) % n][0], items[(k + n // 2) % n][4]) for k in range(n)]

    def load(path: Path, mirrored: bool):
        image = open_image(path)
        return image.transpose(Image.FLIP_LEFT_RIGHT) if mirrored else image
    wins = {(p, score, view): [] for p in BINDING_PROBES for score in ("itc", "itm") for view in ("own", "other")}
    for start in tqdm(range(0, n, batch_size), desc="binding", disable=not progress):
        chunk = items[start:start + batch_size]
        true, swapped = [c[2] for c in chunk], [c[3] for c in chunk]
        true_feats = vlm.encode_texts(true, batch_size=batch_size)
        swap_feats = vlm.encode_texts(swapped, batch_size=batch_size)
        for view, where in (("own", [(c[0], c[4]) for c in chunk]), ("other", others[start:start + batch_size])):
            images = [load(path, mirrored) for path, mirrored in where]
            feats = vlm.encode_images(images, batch_size=batch_size)
            itc = ((feats * true_feats).sum(1) > (feats * swap_feats).sum(1)).tolist()
            itm = (vlm.itm_score(images, true, batch_size=batch_size) >
                   vlm.itm_score(images, swapped, batch_size=batch_size)).tolist()
            for j, (_, probe, _, _, _) in enumerate(chunk):
                wins[(probe, "itc", view)].append(itc[j])
                wins[(probe, "itm", view)].append(itm[j])
    result = {"images": len(entries), "probes": {}}
    for probe in BINDING_PROBES:
        counts = {key: w for key, w in wins.items() if key[0] == probe}
        if counts[(probe, "itc", "own")]:
            result["probes"][probe] = {"pairs": len(counts[(probe, "itc", "own")]), **{
                f"{score}_accuracy{'' if view == 'own' else '_other_image'}": 100.0 * sum(w) / len(w)
                for (_, score, view), w in counts.items()}}
    result["examples"] = {p: {"caption": t, "swapped": s} for _, p, t, s, _ in
                          {item[1]: item for item in reversed(items) if not item[4]}.values()}
    return result
