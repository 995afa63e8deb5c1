"""Downstream-task data drawn from the synthetic scenes, written in the real datasets' file
formats so the real loaders read them:

- ``vqa/``: VQA v2 official files (``v2_OpenEnded_mscoco_{split}2014_questions.json`` and
  ``v2_mscoco_{split}2014_annotations.json``, ten answers per question from simulated
  annotators who sometimes write "two" for "2" or "Red." for "red" and sometimes disagree),
  images as ``{split}2014/COCO_{split}2014_{image_id:012d}.jpg``. Questions ask for colour,
  shape, count, yes/no and position; yes/no are balanced.
- ``nlvr2/``: NLVR2 official JSON lines (``train.json``, ``dev.json``, ``test1.json``) with
  ``identifier``, ``sentence``, ``label`` ("True"/"False"), ``directory`` on train; images
  ``{split}/[{directory}/]{split}-{set}-{pair}-img{0,1}.png``. Each image pair gets one true and
  one false statement of the same template, so the text alone says nothing about the label.
- ``ve/``: SNLI-VE official JSON lines (``snli_ve_{train,dev,test}.jsonl``) with
  ``Flickr30K_ID``, ``sentence1`` (a caption), ``sentence2`` (the hypothesis) and
  ``gold_label``; images ``flickr30k_images/{id}.jpg``. Every image gets one hypothesis per
  label: entailment = a true clause; contradiction = a false clause (half of them followed by an
  unverifiable clause); neutral = a true clause followed by an unverifiable clause ("..., and it
  was drawn first"). The hypothesis text alone therefore gets at most 2/3 right (see README).

Retrieval uses the pre-training splits themselves (``train.json`` one entry per caption,
``val.json``/``test.json`` one entry per image with five captions: the Karpathy layout).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from .synthetic import (COLORS, NUMBER_WORDS, SHAPES, SceneObject, _article, _pick, _plural, _region, made_once,
                        make_scene)

log = logging.getLogger(__name__)

TASKS = ("vqa", "nlvr2", "ve")
TASK_FORMAT_VERSION = 1
DEFAULT_SIZES = {  # images (VQA, VE) or image pairs (NLVR2) per split
    "vqa": {"train": 1600, "val": 200, "test": 200},
    "nlvr2": {"train": 2000, "dev": 200, "test1": 200},
    "ve": {"train": 2000, "dev": 200, "test": 200},
}
_DIGIT_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}


# --- scene facts ------------------------------------------------------------------------------
def _has(objects: list[SceneObject], color: str | None = None, shape: str | None = None) -> bool:
    return any((color is None or o.color == color) and (shape is None or o.shape == shape) for o in objects)


def _count(objects: list[SceneObject], color: str | None = None, shape: str | None = None) -> int:
    return sum((color is None or o.color == color) and (shape is None or o.shape == shape) for o in objects)


def _absent_pair(rng, objects: list[SceneObject]) -> tuple[str, str]:
    """A (colour, shape) not in the scene; preferably one that swaps attributes of present objects."""
    colors = [o.color for o in objects]
    shapes = [o.shape for o in objects]
    for _ in range(20):
        c, s = (_pick(rng, colors), _pick(rng, shapes)) if rng.random() < 0.6 else (_pick(rng, COLORS),
                                                                                   _pick(rng, SHAPES))
        if not _has(objects, c, s):
            return c, s
    while True:
        c, s = _pick(rng, COLORS), _pick(rng, SHAPES)
        if not _has(objects, c, s):
            return c, s


# --- VQA ------------------------------------------------------------------------------------------
def _vqa_questions(rng, objects: list[SceneObject]) -> list[tuple[str, str, str]]:
    """Candidate (question, answer, answer_type) triples for one scene, one per question kind."""
    out = []
    obj = objects[int(rng.integers(len(objects)))]
    if _count(objects, shape=obj.shape) == 1:
        out.append((f"what color is the {obj.shape}?", obj.color, "other"))
    else:
        out.append((f"what color are the {_plural(obj.shape)}?", obj.color, "other"))
    if _count(objects, color=obj.color) == 1:
        out.append((f"what shape is the {obj.color} object?", obj.shape, "other"))
    shape = obj.shape if rng.random() < 0.7 else _pick(rng, SHAPES)
    out.append((f"how many {_plural(shape)} are there?", str(_count(objects, shape=shape)), "number"))
    if rng.random() < 0.5:
        out.append((f"is there {_article(obj.phrase())}?", "yes", "yes/no"))
    else:
        c, s = _absent_pair(rng, objects)
        out.append((f"is there {_article(c + ' ' + s)}?", "no", "yes/no"))
    if len(objects) == 2 and objects[0].shape != objects[1].shape:
        side = int(rng.integers(2))
        o = objects[side]
        out.append((f"is the {o.color} {o.shape} on the left or on the right?", ("left", "right")[side], "other"))
        out.append((f"what color is the shape on the {('left', 'right')[side]}?", o.color, "other"))
    elif len(objects) == 1:
        where = _region(obj.cx, obj.cy).split(" the ")[-1]
        out.append((f"where is the {obj.shape}?", where, "other"))
    return out


# The question types of the generated questions, named as in VQA v2's annotations (a question's type
# is the longest of these its words begin with).
QUESTION_TYPES = ("what color is the", "what color are the", "what shape is the", "how many", "is there a",
                  "is there", "is the", "where is the")


def _question_type(question: str) -> str:
    words = question.rstrip("?").split()
    matches = [t for t in QUESTION_TYPES if words[:len(t.split())] == t.split()]
    return max(matches, key=len) if matches else "none of the above"


def _annotator_answers(rng, answer: str, answer_type: str, distractors: list[str]) -> list[dict]:
    """Ten answers: mostly the right one (written in varied surface forms), sometimes a wrong one."""
    forms = [answer, answer.capitalize(), answer + "."]
    if answer_type == "number":
        forms.append(_DIGIT_WORDS.get(int(answer), answer))
    if answer_type == "other" and answer in COLORS:
        forms.append(f"{answer} ")
    n_wrong = int(rng.choice([0, 0, 0, 1, 1, 2, 3])) if distractors else 0
    answers = []
    for j in range(10):
        text = _pick(rng, distractors) if j < n_wrong else _pick(rng, forms)
        answers.append({"answer": text, "answer_confidence": "yes" if j >= n_wrong else "maybe", "answer_id": j + 1})
    order = rng.permutation(10)
    return [dict(answers[i], answer_id=k + 1) for k, i in enumerate(order)]


def _distractors(answer: str) -> list[str]:
    """Plausible wrong answers of the same kind as ``answer``."""
    for group in (["yes", "no"], ["0", "1", "2", "3"], list(COLORS), list(SHAPES), ["left", "right"],
                  ["top left", "top right", "bottom left", "bottom right", "left", "right", "top", "bottom",
                   "middle"]):
        if answer in group:
            return [g for g in group if g != answer]
    return []


def _write_vqa(out: Path, sizes: dict, image_size: int, seed: int, progress: bool) -> None:
    from tqdm import tqdm

    qid = 0
    for split_id, (split, n_images) in enumerate(sizes.items()):
        subtype = f"{split}2014"
        (out / subtype).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, 100 + split_id])
        questions, annotations = [], []
        for i in tqdm(range(n_images), desc=f"synthetic vqa {split}", disable=not progress, leave=False):
            image_id = (split_id + 1) * 1_000_000 + i
            image, objects, _ = make_scene(rng, image_size)
            image.save(out / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", quality=95)
            for question, answer, answer_type in _vqa_questions(rng, objects):
                qid += 1
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                annotations.append({"question_id": qid, "image_id": image_id, "question_type": _question_type(question),
                                    "answer_type": answer_type, "multiple_choice_answer": answer,
                                    "answers": _annotator_answers(rng, answer, answer_type, _distractors(answer))})
        common = {"info": {"description": "maskvlm synthetic scenes, VQA v2 layout"}, "license": {},
                  "data_type": "mscoco", "data_subtype": subtype}
        with open(out / f"v2_OpenEnded_mscoco_{subtype}_questions.json", "w") as f:
            json.dump({**common, "task_type": "Open-Ended", "questions": questions}, f)
        with open(out / f"v2_mscoco_{subtype}_annotations.json", "w") as f:
            json.dump({**common, "annotations": annotations}, f)


# --- NLVR2 ------------------------------------------------------------------------------------
def _nlvr2_templates(rng, left: list[SceneObject], right: list[SceneObject]) -> list[Callable[[], tuple[str, bool]]]:
    both = left + right

    def contains():
        side, objs = (("left", left), ("right", right))[int(rng.integers(2))]
        c, s = (lambda o: (o.color, o.shape))(_pick(rng, both)) if rng.random() < 0.7 else _absent_pair(rng, objs)
        return f"the {side} image contains {_article(c + ' ' + s)}", _has(objs, c, s)

    def both_contain():
        s = _pick(rng, [o.shape for o in both]) if rng.random() < 0.8 else _pick(rng, SHAPES)
        return f"both images contain at least one {s}", _has(left, shape=s) and _has(right, shape=s)

    def exactly_one():
        c = _pick(rng, [o.color for o in both]) if rng.random() < 0.8 else _pick(rng, COLORS)
        return (f"exactly one of the images contains a {c} shape",
                _has(left, color=c) != _has(right, color=c))

    def more():
        return "the left image has more shapes than the right image", len(left) > len(right)

    def total():
        s = _pick(rng, [o.shape for o in both])
        n = _count(both, shape=s) + int(rng.choice([-1, 0, 0, 1]))
        n = max(n, 1)
        return f"there are {NUMBER_WORDS.get(n, _DIGIT_WORDS.get(n, str(n)))} {_plural(s) if n > 1 else s} in total", \
            _count(both, shape=s) == n
    return [contains, contains, both_contain, exactly_one, more, total]


def _nlvr2_statements(rng, left, right) -> list[tuple[str, bool]]:
    """One true and one false statement about the pair, of the same template where possible."""
    templates = _nlvr2_templates(rng, left, right)
    for _ in range(60):
        make = templates[int(rng.integers(len(templates)))]
        found: dict[bool, str] = {}
        for _ in range(12):
            text, label = make()
            found.setdefault(label, text)
            if len(found) == 2:
                return [(found[True], True), (found[False], False)]
    raise RuntimeError("could not draw a balanced NLVR2 statement pair")  # pragma: no cover


def _write_nlvr2(out: Path, sizes: dict, image_size: int, seed: int, progress: bool) -> None:
    from tqdm import tqdm

    for split_id, (split, n_pairs) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, 200 + split_id])
        lines = []
        for i in tqdm(range(n_pairs), desc=f"synthetic nlvr2 {split}", disable=not progress, leave=False):
            directory = str(i % 10) if split == "train" else None
            folder = out / split / directory if directory else out / split
            folder.mkdir(parents=True, exist_ok=True)
            prefix = f"{split}-{i}-0"
            scenes = [make_scene(rng, image_size) for _ in range(2)]
            for k, (image, _, _) in enumerate(scenes):
                image.save(folder / f"{prefix}-img{k}.png")
            statements = _nlvr2_statements(rng, scenes[0][1], scenes[1][1])
            for j in rng.permutation(2):
                text, label = statements[j]
                entry = {"identifier": f"{prefix}-{len(lines) % 2}", "sentence": text, "label": str(label),
                         "synset": "synthetic", "query": "synthetic scenes", "writer": 0}
                if directory:
                    entry["directory"] = directory
                lines.append(entry)
        with open(out / f"{split}.json", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in lines)


# --- SNLI-VE ------------------------------------------------------------------------------------
_UNVERIFIABLE = ("and it was drawn first", "and it was painted by a child", "and it is made of paper",
                 "and it was added last", "and it is slightly heavier than it looks")


def _ve_clauses(rng, objects: list[SceneObject]) -> tuple[str, str]:
    """(true clause, false clause) about the scene, in the same template."""
    obj = _pick(rng, objects)
    c, s = _absent_pair(rng, objects)
    kind = int(rng.integers(3))
    if kind == 0:
        return f"there is {_article(obj.phrase())}", f"there is {_article(c + ' ' + s)}"
    if kind == 1:
        n = _count(objects, shape=obj.shape)
        wrong = n + (1 if n == 1 or rng.random() < 0.5 else -1)
        def say(k):
            return f"the picture shows {_DIGIT_WORDS[k]} {_plural(obj.shape) if k > 1 else obj.shape}"
        return say(n), say(wrong)
    other = _pick(rng, [x for x in COLORS if x != obj.color])
    return f"the {obj.shape} is {obj.color}", f"the {obj.shape} is {other}"


def _write_ve(out: Path, sizes: dict, image_size: int, seed: int, progress: bool) -> None:
    from tqdm import tqdm

    (out / "flickr30k_images").mkdir(parents=True, exist_ok=True)
    for split_id, (split, n_images) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, 300 + split_id])
        lines = []
        for i in tqdm(range(n_images), desc=f"synthetic ve {split}", disable=not progress, leave=False):
            flickr_id = str((split_id + 1) * 1_000_000 + i)
            image, objects, captions = make_scene(rng, image_size)
            image.save(out / "flickr30k_images" / f"{flickr_id}.jpg", quality=95)
            true, false = _ve_clauses(rng, objects)
            hypotheses = [(true, "entailment"),
                          (f"{true}, {_pick(rng, _UNVERIFIABLE)}", "neutral"),
                          (f"{false}, {_pick(rng, _UNVERIFIABLE)}" if rng.random() < 0.5 else false, "contradiction")]
            premise = captions[int(rng.integers(len(captions)))]
            for j in rng.permutation(3):
                text, label = hypotheses[j]
                lines.append({"Flickr30K_ID": flickr_id, "sentence1": premise, "sentence2": text, "gold_label": label,
                              "pairID": f"{flickr_id}.jpg#0r1{label[0]}", "captionID": f"{flickr_id}.jpg#0"})
        with open(out / f"snli_ve_{split}.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in lines)


_WRITERS = {"vqa": _write_vqa, "nlvr2": _write_nlvr2, "ve": _write_ve}


def generate_task(task: str, out_dir: str | Path, sizes: dict | None = None, image_size: int = 64, seed: int = 0,
                  progress: bool = True) -> Path:
    """Write one task's synthetic data under ``out_dir`` (a folder of its own); returns it."""
    if task not in _WRITERS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {', '.join(TASKS)}")
    sizes = dict(DEFAULT_SIZES[task], **(sizes or {}))
    wanted = dict(task=task, version=TASK_FORMAT_VERSION, seed=seed, image_size=image_size, sizes=sizes)
    return made_once(Path(out_dir), wanted, lambda out: _WRITERS[task](out, sizes, image_size, seed, progress),
                     lambda w: f"{w['task']}: " + ", ".join(f"{k} {v}" for k, v in w["sizes"].items()) +
                     f", {w['image_size']} px, seed {w['seed']}")


# --- zero-shot classification: one object per image, a class folder per attribute value -------------
CLASS_ATTRIBUTES = ("shape", "color", "color-shape")


def class_names(attribute: str) -> list[str]:
    """The classes of ``attribute``: the shapes, the colours, or every "colour shape" pair."""
    if attribute == "shape":
        return list(SHAPES)
    if attribute == "color":
        return list(COLORS)
    if attribute == "color-shape":
        return [f"{c} {s}" for c in COLORS for s in SHAPES]
    raise ValueError(f"unknown class attribute {attribute!r}; expected one of {', '.join(CLASS_ATTRIBUTES)}")


def generate_classes(out_dir: str | Path, attribute: str = "color-shape", per_class: int = 20,
                     image_size: int = 64, seed: int = 0, progress: bool = True) -> Path:
    """An image folder for zero-shot classification: ``out_dir/<class>/<i>.png`` (class names with
    ``_`` for spaces), ``per_class`` single-object scenes per class over random textured
    backgrounds; attributes the class leaves open (size, position, and colour or shape) are drawn
    at random. The draws use their own seeds, apart from the pre-training splits'."""
    names = class_names(attribute)
    wanted = dict(task="classes", version=TASK_FORMAT_VERSION, attribute=attribute, per_class=per_class,
                  seed=seed, image_size=image_size)
    return made_once(Path(out_dir), wanted, lambda out: _write_classes(out, names, attribute, per_class, image_size,
                                                                       seed, progress),
                     lambda w: f"{w['attribute']} classes, {w['per_class']} images each, {w['image_size']} px, "
                     f"seed {w['seed']}")


def _write_classes(out: Path, names: list[str], attribute: str, per_class: int, image_size: int, seed: int,
                   progress: bool) -> None:
    from tqdm import tqdm

    from .synthetic import SIZES, _texture, render, SUPERSAMPLE

    for index, name in enumerate(tqdm(names, desc="synthetic classes", disable=not progress, leave=False)):
        rng = np.random.default_rng([seed, 1000 + index])
        folder = out / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background, _ = _texture(rng, image_size * SUPERSAMPLE // 4)
            color = name.split()[0] if attribute != "shape" else _pick(rng, COLORS)
            shape = name.split()[-1] if attribute != "color" else _pick(rng, SHAPES)
            obj = SceneObject(shape, color, _pick(rng, SIZES), 0, 0)
            r = SIZES[obj.size]
            obj.cx, obj.cy = rng.uniform(r + 0.03, 1 - r - 0.03, size=2)
            render([obj], image_size, background).save(folder / f"{i:04d}.png")
