"""Built-in synthetic scenes: seeded, procedurally drawn images of coloured shapes over
textured backgrounds with paraphrased captions that need attribute binding ("a red circle
left of a blue square" vs "a blue circle left of a red square"). Written as PNG files plus
annotation JSON in the ALBEF layout, so the ordinary annotation loader reads them."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from ..folder_lock import hold_folder

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (35, 70, 230), "yellow": (240, 220, 30),
    "purple": (140, 40, 180), "orange": (245, 130, 20), "white": (250, 250, 250),
}
SIZES = {"small": 0.10, "large": 0.17}  # radius as a fraction of the image side
NUMBER_WORDS = {2: "two", 3: "three"}
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 2
SUPERSAMPLE = 4


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    cx: float  # centre, fraction of the image side
    cy: float

    def box(self, side: int) -> list[int]:
        r = SIZES[self.size] * side
        return [round(self.cx * side - r), round(self.cy * side - r), round(self.cx * side + r), round(self.cy * side + r)]

    def phrase(self, with_size: bool = False) -> str:
        return f"{self.size + ' ' if with_size else ''}{self.color} {self.shape}"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _region(cx: float, cy: float) -> str:
    """Where a single object is, on a 3x3 grid: "in the top left", "on the right", "in the middle"."""
    col = "left" if cx < 0.38 else "right" if cx > 0.62 else ""
    row = "top" if cy < 0.38 else "bottom" if cy > 0.62 else ""
    if row and col:
        return f"in the {row} {col}"
    if col:
        return f"on the {col}"
    if row:
        return f"at the {row}"
    return "in the middle"


BACKGROUNDS = ("speckled", "striped", "checkered", "shaded")


def _texture(rng: np.random.Generator, side: int) -> tuple[np.ndarray, str]:
    """A low-contrast, low-saturation background so that objects stay the salient content.
    Returns the pixels and a phrase naming it ("a dark striped background")."""
    level = rng.uniform(70, 170)
    base = level + rng.uniform(-15, 15, size=3)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    kind = rng.integers(4)
    amp = rng.uniform(8, 22)
    if kind == 0:  # noise
        pattern = rng.normal(0, 0.5, size=(side, side))
    elif kind == 1:  # stripes at a random angle
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 9)
        pattern = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    elif kind == 2:  # checkerboard
        cells = rng.integers(4, 10)
        pattern = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2) * 2 - 1
    else:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        pattern = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)
        pattern = pattern * 2
    image = base[None, None, :] + amp * pattern[..., None]
    phrase = f"{'dark' if level < 120 else 'light'} {BACKGROUNDS[kind]}"
    return np.clip(image, 0, 255).astype(np.uint8), phrase


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    s = side * SUPERSAMPLE
    cx, cy, r = obj.cx * s, obj.cy * s, SIZES[obj.size] * s
    color = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif obj.shape == "square":
        q = r * 0.85
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=color)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=color)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif obj.shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)


def render(objects: list[SceneObject], side: int, background: np.ndarray) -> Image.Image:
    canvas = Image.fromarray(background).resize((side * SUPERSAMPLE, side * SUPERSAMPLE), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw(draw, obj, side)
    return canvas.resize((side, side), Image.LANCZOS)


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _single_scene(rng, bg: str):
    obj = SceneObject(_pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES), 0, 0)
    r = SIZES[obj.size]
    obj.cx, obj.cy = rng.uniform(r + 0.03, 1 - r - 0.03, size=2)
    where, p, ps = _region(obj.cx, obj.cy), obj.phrase(), obj.phrase(with_size=True)
    captions = [
        f"{_article(ps)} {where} on {_article(bg)} background",
        f"just one {p} {where}, {bg} background",
        f"there is one {ps} {where} of the picture",
        f"a single {p}, {obj.size}, {where}, over {_article(bg)} pattern",
        f"{where} of the {bg} picture is {_article(ps)}",
        f"an image with only one {obj.shape}: it is {obj.color} and {obj.size}, {where}",
        f"one {obj.color} {obj.shape} {where} on {_article(bg)} background",
    ]
    return [obj], captions


def _pair_scene(rng, bg: str):
    while True:
        a = SceneObject(_pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES), 0, 0)
        b = SceneObject(_pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES), 0, 0)
        if (a.shape, a.color) != (b.shape, b.color):
            break
    for obj, (lo, hi) in ((a, (0.05, 0.45)), (b, (0.55, 0.95))):  # a on the left, b on the right
        r = SIZES[obj.size]
        obj.cx = rng.uniform(max(lo, r + 0.02) + 0.0, min(hi, 1 - r - 0.02))
        obj.cy = rng.uniform(r + 0.03, 1 - r - 0.03)
    pa, pb, sa, sb = a.phrase(), b.phrase(), a.phrase(True), b.phrase(True)
    captions = [
        f"{_article(sa)} to the left of {_article(sb)}",
        f"{_article(pb)} to the right of {_article(pa)} on {_article(bg)} background",
        f"{_article(sa)} and {_article(sb)}, {bg} background",
        f"on the left {_article(sa)}, on the right {_article(sb)}",
        f"{_article(sb)} next to {_article(pa)}, which is {a.size}",
        f"two shapes on {_article(bg)} background: {_article(pa)} left and {_article(pb)} right",
        f"a {a.size} {a.shape} that is {a.color} and a {b.size} {b.shape} that is {b.color}, left to right",
    ]
    return [a, b], captions


def _count_scene(rng, bg: str):
    n = int(rng.integers(2, 4))
    shape, color, size = _pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES)
    r = SIZES[size]
    objects: list[SceneObject] = []
    for _ in range(200):  # rejection-sample positions without overlap
        if len(objects) == n:
            break
        cx, cy = rng.uniform(r + 0.03, 1 - r - 0.03, size=2)
        if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (2.2 * r) ** 2 for o in objects):
            objects.append(SceneObject(shape, color, size, cx, cy))
    n = len(objects)
    word = NUMBER_WORDS.get(n, str(n))
    plural = _plural(shape)
    captions = [
        f"{word} {size} {color} {plural} on {_article(bg)} background",
        f"{word} {size} {color} {plural}",
        f"there are {word} {size} {plural} and they are all {color}, {bg} background",
        f"{n} {color} {plural} on {_article(bg)} background",
        f"a group of {word} {size} {plural}, all {color}",
        f"exactly {word} {color} {plural} in the {bg} image",
    ]
    return objects, captions


def make_scene(rng: np.random.Generator, side: int):
    """(image, objects, candidate captions) of one random scene."""
    background, bg = _texture(rng, side * SUPERSAMPLE // 4)
    u = rng.random()
    build = _single_scene if u < 0.3 else _pair_scene if u < 0.8 else _count_scene
    objects, captions = build(rng, bg)
    return render(objects, side, background), objects, captions


def _choose_captions(rng, captions: list[str], k: int) -> list[str]:
    order = rng.permutation(len(captions))[:k]
    return [captions[i] for i in sorted(order)]


MARKER = "synthetic.json"  # a complete dataset's settings, written last


def generate(out_dir: str | Path, num_train: int = 4000, num_val: int = 100, num_test: int = 200,
             image_size: int = 64, seed: int = 0, captions_per_image: int = 5, progress: bool = True) -> Path:
    """Write images and ``{train,val,test}.json`` under ``out_dir``; returns the folder.

    train.json: one entry per caption (``image``, ``caption``, ``image_id``) as in ALBEF/BLIP
    pre-training files; val.json/test.json: one entry per image with a list of captions, as in
    the COCO Karpathy test layout. Every entry also lists its ``objects`` with boxes."""
    from tqdm import tqdm

    out = Path(out_dir)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for split_id, split in enumerate(SPLITS):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, split_id])
        entries = []
        for i in tqdm(range(counts[split]), desc=f"synthetic {split}", disable=not progress, leave=False):
            image, objects, captions = make_scene(rng, image_size)
            rel = f"images/{split}/{i:06d}.png"
            image.save(out / rel)
            chosen = _choose_captions(rng, captions, captions_per_image)
            meta = [dict(shape=o.shape, color=o.color, size=o.size, box=o.box(image_size)) for o in objects]
            image_id = f"synthetic_{split}_{i:06d}"
            if split == "train":
                entries += [dict(image=rel, caption=c, image_id=image_id, objects=meta) for c in chosen]
            else:
                entries.append(dict(image=rel, caption=chosen, image_id=image_id, objects=meta))
        with open(out / f"{split}.json", "w") as f:
            json.dump(entries, f)
    with open(out / MARKER, "w") as f:  # written last: marks a complete dataset
        json.dump(dict(version=FORMAT_VERSION, seed=seed, image_size=image_size, **counts), f)
    return out


def _settings(folder: Path) -> Optional[dict]:
    """The settings of the complete synthetic dataset in ``folder`` (its synthetic.json), or None."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def made_once(out: Path, wanted: dict, make: Callable[[Path], None], describe: Callable[[dict], str],
              sibling: Optional[str] = None) -> Path:
    """The folder holding a complete synthetic dataset of the settings ``wanted``: ``out``, made by
    ``make(out)`` unless it is there already (``MARKER``, written last, records the settings).
    Processes started together make it once: one generates, the others wait on the folder's lock and
    find it made (each would otherwise rewrite files another has started reading). With ``sibling``,
    a dataset of other settings (same format) already in ``out`` stays as it is (a run may be reading
    it, or resume on it) and this one goes to the sibling folder of that name."""
    found = _settings(out)
    if sibling and found is not None and found != wanted and found.get("version") == wanted["version"]:
        log.info("%s holds synthetic data made with other settings (%s); these (%s) are in %s", out,
                 describe(found), describe(wanted), out.with_name(sibling))
        out = out.with_name(sibling)
    if _settings(out) == wanted:
        return out
    with hold_folder(out, "synthetic data generation", wait=True):
        if _settings(out) != wanted:
            (out / MARKER).unlink(missing_ok=True)  # incomplete until make() is done
            log.info("generating synthetic data in %s (%s)", out, describe(wanted))
            make(out)
            if _settings(out) != wanted:
                (out / MARKER).write_text(json.dumps(wanted))
    return out


def _scenes_text(settings: dict) -> str:
    return (f"{settings.get('train')} train / {settings.get('val')} val / {settings.get('test')} test images of "
            f"{settings.get('image_size')} px, seed {settings.get('seed')}")


def ensure_synthetic(out_dir: str | Path, num_train: int, num_val: int, num_test: int, image_size: int,
                     seed: int, progress: bool = True) -> Path:
    """Generate the dataset unless a complete one with the same settings is already there; returns its
    folder. Where ``out_dir`` holds one made with other settings (sizes, seed), those stay as they are
    and these go to a sibling folder named by them (``made_once``)."""
    wanted = dict(version=FORMAT_VERSION, seed=seed, image_size=image_size, train=num_train, val=num_val,
                  test=num_test)
    out = Path(out_dir)
    return made_once(out, wanted,
                     lambda folder: generate(folder, num_train, num_val, num_test, image_size, seed, progress=progress),
                     _scenes_text, sibling=f"{out.name}-{num_train}-{num_val}-{num_test}-{image_size}px-seed{seed}")
