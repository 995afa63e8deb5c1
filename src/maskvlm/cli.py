"""Command-line interface: ``maskvlm pretrain | finetune | evaluate | export | index | search | data | recipes |
ablate | reconstruct | fill-mask | ground | plot``."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
from pathlib import Path

import yaml

from .config import PRECISIONS, RETRIEVAL_SCORES, expand_home

def _number(kind, low, high=None, open_ends=False, what=""):
    """An argparse type: ``kind`` (int or float) in [low, high], or (low, high) with ``open_ends``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {'an integer' if kind is int else 'a number'}")
        if value < low or (high is not None and value > high) or (open_ends and value in (low, high)):
            raise argparse.ArgumentTypeError(f"{text}: expected {what}")
        return value
    return parse


POSITIVE = _number(int, 1, what="an integer of 1 or more")
NON_NEGATIVE = _number(int, 0, what="an integer of 0 or more")
SHARE = _number(float, 0.0, 1.0, what="a value in [0, 1]")
SCENE_SIZE = _number(int, 16, what="at least 16 pixels")  # the bound of data.synthetic.image_size


# options naming files or folders: a leading ~ is the home folder (the shell leaves `--out=~/x` as it is)
PATH_OPTIONS = ("recipe", "config", "data", "shards", "val_data", "test_data", "image_root", "output_dir", "resume",
                "checkpoint", "against", "out", "predictions", "report", "classnames", "train", "test", "source",
                "images", "index", "image", "mismatched_image", "log")


def _expand_home(args: argparse.Namespace) -> None:
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, expand_home(value))
        elif isinstance(value, list):
            setattr(args, name, [expand_home(v) if isinstance(v, str) else v for v in value])


def output_file(text: str) -> str:
    """--out of a command that writes a file after its work: checked before the work."""
    text = expand_home(text)
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; it names the file to write")
    return text


def write_json(path: str | Path, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))


OVERRIDES_HELP = ("configuration overrides as key.sub=value (YAML values), e.g. train.max_steps=200 "
                  "masking.image_ratio=0.5 loss.mim=0; --print-config lists every key")


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train a model (default: MaskVLM, tiny preset, built-in synthetic scenes)",
        description="Pre-train a masked vision-language model, then report zero-shot retrieval on the test split. "
                    "With no --data, the built-in synthetic scenes are generated (once) and used.",
        epilog="examples:\n"
               "  maskvlm pretrain                                   # tiny MaskVLM on synthetic scenes, CPU\n"
               "  maskvlm pretrain --steps 200 loss.mim=0 masking.text_ratio=0.15\n"
               "  maskvlm pretrain --preset base --data cc3m.json --image-root images/ --test-data coco_test.json\n"
               "  maskvlm pretrain --output-dir runs/a --resume auto train.max_steps=900\n"
               "  maskvlm pretrain --checkpoint runs/a --data my_domain.json --steps 2000   # continued pre-training\n"
               "On --resume the checkpoint's own configuration is used; key=value overrides still apply.\n"
               "--checkpoint starts a new run from a model's weights (architecture, tokenizer and image\n"
               "normalisation come with them) with a fresh optimizer, schedule and data order; the recipe\n"
               "and the rest of the settings are this command's.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="maskvlm", help="recipe name (see `maskvlm recipes`) or a recipe YAML path "
                                                       "(default: maskvlm)")
    p.add_argument("--preset", default=None,
                   help="model size preset (tiny, small, base) or YAML path; default: the recipe's")
    p.add_argument("--config", default=None, help="a YAML file of settings applied over the recipe")
    p.add_argument("--data", default=None, help="training annotation JSON (ALBEF layout), or several joined by "
                                                "'::' (concatenated); sets data.train")
    p.add_argument("--shards", default=None, help="train from webdataset tar shards instead: a path, glob or "
                                                  "brace pattern; sources separated by '::'; sets data.shards")
    p.add_argument("--val-data", default=None, help="validation retrieval JSON for periodic evaluation (none: no "
                   "validation); data.val")
    p.add_argument("--test-data", default=None, help="test retrieval JSON evaluated at the end (none: no test); "
                   "sets data.test")
    p.add_argument("--image-root", default=None, help="folder the JSON image paths are relative to (default: "
                                                      "the JSON file's folder); sets data.image_root")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/<recipe>-<preset>-<time>)")
    p.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint folder, a run folder, or 'auto' (newest in --output-dir)")
    p.add_argument("--checkpoint", default=None,
                   help="start from this model's weights (a run folder, checkpoint or exported model) with a "
                        "fresh optimizer and schedule: continued pre-training; sets task.init")
    p.add_argument("--steps", type=POSITIVE, default=None, help="optimizer steps; sets train.max_steps")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto; sets train.device")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a pre-trained model on retrieval, VQA, NLVR2 or SNLI-VE",
        description="Fine-tune a pre-trained checkpoint on a downstream task, then evaluate on the val and test "
                    "files. With no --data, the task's built-in synthetic data is generated (once) and used. "
                    "Settings come from the pre-trained model (architecture) and recipes/finetune/TASK.yaml; "
                    "key=value overrides apply on top (--print-config lists them).",
        epilog="examples:\n"
               "  maskvlm finetune vqa --checkpoint runs/pre                      # synthetic VQA, CPU\n"
               "  maskvlm finetune retrieval --checkpoint runs/pre --data coco_train.json \\\n"
               "      --val-data coco_val.json --test-data coco_test.json --image-root coco/ eval.k=256\n"
               "  maskvlm finetune vqa --checkpoint runs/pre --data v2_OpenEnded_mscoco_train2014_questions.json \\\n"
               "      --val-data v2_OpenEnded_mscoco_val2014_questions.json --image-root coco/\n"
               "  maskvlm finetune nlvr2 --checkpoint runs/pre --data nlvr2/train.json --val-data nlvr2/dev.json \\\n"
               "      --test-data nlvr2/test1.json --image-root nlvr2/images\n"
               "  maskvlm finetune ve --output-dir runs/ve --resume auto train.max_steps=1000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=("retrieval", "vqa", "nlvr2", "ve"), help="the downstream task")
    p.add_argument("--checkpoint", default=None, help="pre-trained checkpoint, run folder (its newest checkpoint) or "
                                                      "model folder to start from (task.init)")
    p.add_argument("--config", default=None, help="a YAML file of settings applied over the task's recipe")
    p.add_argument("--data", default=None, help="training file in the task's format; sets data.train")
    p.add_argument("--val-data", default=None, help="validation file (periodic and final evaluation; none: no "
                   "validation); data.val")
    p.add_argument("--test-data", default=None, help="test file evaluated at the end (none: no test); sets "
                   "data.test")
    p.add_argument("--image-root", default=None, help="image folder (default: the data file's folder); "
                                                      "sets data.image_root")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/<task>-<recipe>-<preset>-<time>)")
    p.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint folder, a run folder, or 'auto' (newest in --output-dir)")
    p.add_argument("--steps", type=POSITIVE, default=None, help="optimizer steps; sets train.max_steps")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto; sets train.device")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a task",
                       description="Evaluate a checkpoint or pretrained-model folder.")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    r = tasks.add_parser(
        "retrieval", help="image-text retrieval (ITC ranking + ITM re-ranking of the top-k)",
        description="Zero-shot (or fine-tuned) image-text retrieval: encode every image and caption, rank by ITC "
                    "similarity, re-rank each query's top-k with the ITM head; prints R@1/5/10 both directions.")
    r.add_argument("--checkpoint", required=True, help="checkpoint folder (runs/.../checkpoints/step-N) or a "
                                                       "run folder (its newest checkpoint) or a pretrained folder")
    r.add_argument("--data", default=None, help="retrieval JSON: one entry per image with a caption list "
                                                "(default: the checkpoint's data.test)")
    r.add_argument("--image-root", default=None, help="folder the JSON image paths are relative to "
                   "(default: the JSON file's folder, or the checkpoint's data.image_root with its data.test)")
    r.add_argument("--k", type=NON_NEGATIVE, default=None, help="top-k re-ranked by ITM (0: ITC only); default eval.k")
    r.add_argument("--score", choices=RETRIEVAL_SCORES, default=None,
                   help="re-ranking score: itm, the ITM match log-odds; itm+itc, plus the ITC logit (similarity / "
                        "temperature); itm-logit, the match logit alone (ALBEF's evaluation code); itm-logit+itc, "
                        "plus the cosine (BLIP's); itc: no re-ranking. Default eval.score")
    r.add_argument("--batch-size", type=POSITIVE, default=None,
                   help="encoding / ITM batch size; default eval.batch_size")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (default: auto = cuda when available)")
    r.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16 autocast or fp32 (default: the checkpoint's train.precision)")
    r.add_argument("--compile", action="store_true",
                   help="re-rank through torch.compile (the checkpoint's train.compile_backend, inductor by default): "
                        "on a 2-core CPU 1.12-1.16x faster ITM re-ranking at COCO's size after 10-35 s of "
                        "compilation, so for large test sets; bf16 scores differ from eager ones by rounding")
    r.add_argument("--against", default=None, metavar="CHECKPOINT",
                   help="also evaluate this second model on the same file and report the difference in mean R@1 "
                        "with a paired bootstrap interval over images")
    r.add_argument("--misses", type=NON_NEGATIVE, default=0, metavar="N",
                   help="also show N queries of each direction that missed at R@1, the nearest misses first, with "
                        "what they retrieved instead (in --out too)")
    r.add_argument("--out", default=None, type=output_file, help="also write the metrics as JSON to this file")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name, title, fmt in (("vqa", "VQA v2 accuracy (official metric) and the eval-server result file",
                              "official questions JSON (answers read from the annotations file next to it) or "
                              "an ALBEF-style list"),
                             ("nlvr2", "NLVR2 accuracy and consistency", "NLVR2 JSON lines (dev.json, test1.json)"),
                             ("ve", "SNLI-VE accuracy (overall and per class)", "snli_ve_*.jsonl")):
        t = tasks.add_parser(name, help=title, description=f"{title} of a fine-tuned checkpoint.")
        t.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder or run folder")
        t.add_argument("--data", default=None, help=f"{fmt} (default: the checkpoint's data.test)")
        t.add_argument("--image-root", default=None, help="image folder (default: the data file's folder)")
        t.add_argument("--predictions", default=None, type=output_file, help="write the predictions here"
                       + {"vqa": " ([{question_id, answer}], the eval-server format)",
                          "nlvr2": " (JSON; a .csv name gives the official evaluation's identifier,label lines)"
                          }.get(name, ""))
        t.add_argument("--batch-size", type=POSITIVE, default=None, help="default eval.batch_size")
        t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto")
        t.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the checkpoint's")
        t.add_argument("--out", default=None, type=output_file, help="also write the metrics as JSON to this file")
        t.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "vqa":
            t.add_argument("--by-question-type", action="store_true",
                           help="also the accuracy per question type ('what color is the', 'how many', ...; from "
                                "the annotations' question_type), as the official evaluation reports it")
    z = tasks.add_parser(
        "classification", help="zero-shot image classification from class-name prompts (ITC, optional ITM re-rank)",
        description="Zero-shot classification of an image folder (ROOT/<class>/<images>): each class name is put into "
                    "prompt templates, the ITC features of its prompts are averaged into a class embedding, and each "
                    "image takes the most similar class; --rerank K re-scores each image's top K classes with the "
                    "ITM head. With no --data, synthetic colour-shape classes are generated (once) under the "
                    "checkpoint's data.synthetic.dir.")
    z.add_argument("--data", default=None, help="image folder with one sub-folder per class (folder names, '_' as "
                                                "space, are the class names), or a JSON list of "
                                                "{\"image\": path, \"label\": class name}")
    z.add_argument("--image-root", default=None, help="folder the JSON list's image paths are relative to "
                                                      "(default: the JSON file's folder)")
    z.add_argument("--classnames", default=None, help="class names in sorted-folder order: a JSON list or a text "
                                                      "file with one name per line")
    z.add_argument("--template", action="append", default=None, metavar="TEXT",
                   help="a prompt template with {} for the class name, e.g. 'a photo of a {}.' (repeat for several; "
                        "default: four general ones)")
    z.add_argument("--rerank", type=NON_NEGATIVE, default=0, metavar="K",
                   help="re-score the top K classes with ITM (0: off)")
    _image_folder_options(z, "also write the metrics and every prediction as JSON to this file")
    lp = tasks.add_parser(
        "linear-probe", help="linear-probe accuracy of the frozen image features on an image folder",
        description="Fit a multinomial logistic regression on frozen image features of a training image folder "
                    "(ROOT/<class>/<images>; the L2 strength is chosen on a held-out share of it, then refitted on "
                    "all of it) and report accuracy on a test folder with the same classes. With no --train / "
                    "--test, synthetic colour-shape classes are generated (once) under the checkpoint's "
                    "data.synthetic.dir (classes-train with seed + 1, classes).")
    lp.add_argument("--train", default=None, help="training image folder, one sub-folder per class (or a JSON list "
                                                  "of {\"image\", \"label\"}, paths relative to its folder)")
    lp.add_argument("--test", default=None, help="test image folder (or JSON list) with the same classes")
    lp.add_argument("--features", choices=("cls", "mean", "itc"), default="cls",
                    help="image encoder [CLS] output (default), mean of its patch tokens, or the ITC embedding")
    lp.add_argument("--val-fraction", type=_number(float, 0.0, 1.0, open_ends=True, what="a value in (0, 1)"),
                    default=0.2,
                    help="share of each training class held out to choose the L2 strength")
    _image_folder_options(lp, "also write the metrics as JSON to this file")
    from .cli_insight import add_evaluate_parsers
    add_evaluate_parsers(tasks)


def _image_folder_options(p, out_help: str) -> None:
    """The options zero-shot classification and the linear probe share."""
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder or pretrained folder")
    p.add_argument("--batch-size", type=POSITIVE, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default, exact numbers) or bf16 autocast")
    p.add_argument("--out", default=None, type=output_file, help=out_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="dataset tools")
    tools = p.add_subparsers(dest="tool", required=True, metavar="TOOL")
    s = tools.add_parser("synthetic", help="generate the built-in synthetic scenes dataset",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", default="data/synthetic", help="output folder")
    s.add_argument("--num-train", type=POSITIVE, default=4000, help="training images (5 captions each)")
    s.add_argument("--num-val", type=NON_NEGATIVE, default=100, help="validation images")
    s.add_argument("--num-test", type=NON_NEGATIVE, default=200, help="test images")
    s.add_argument("--image-size", type=SCENE_SIZE, default=64, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    c = tools.add_parser("corrupt", help="a copy of a dataset with a share of broken samples (for testing)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         description="Write a copy of an annotation JSON in which --rate of the entries are broken "
                                     "(missing, empty, truncated, non-image and oversized image files; empty, blank "
                                     "and non-string captions) and as many have unusual but valid images (grey, "
                                     "RGBA, palette, CMYK, 16-bit, EXIF-rotated, tiny). Unchanged entries point at "
                                     "the original images.")
    c.add_argument("--data", default="data/synthetic/train.json", help="annotation JSON to copy")
    c.add_argument("--image-root", default=None, help="its image root (default: its folder)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--rate", type=SHARE, default=0.005, help="share of entries broken")
    c.add_argument("--seed", type=int, default=0)
    w = tools.add_parser("shard", help="write an annotation JSON as webdataset tar shards",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         description="Write {key}.jpg|png|webp, {key}.txt and {key}.json per caption into tar "
                                     "shards of --shard-size samples (the img2dataset layout).")
    w.add_argument("--data", default="data/synthetic/train.json", help="annotation JSON")
    w.add_argument("--image-root", default=None, help="its image root (default: its folder)")
    w.add_argument("--out", required=True, help="output folder")
    w.add_argument("--shard-size", type=POSITIVE, default=1000, help="samples per shard")
    k = tools.add_parser("synthetic-classes", help="an image folder of synthetic one-object scenes per class "
                                                   "(for zero-shot classification)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("--out", default="data/synthetic/classes", help="output folder (OUT/<class>/<i>.png)")
    k.add_argument("--attribute", default="color-shape", choices=("shape", "color", "color-shape"),
                   help="what the classes name: 5 shapes, 7 colours or their 35 pairs")
    k.add_argument("--per-class", type=POSITIVE, default=20, help="images per class")
    k.add_argument("--image-size", type=SCENE_SIZE, default=64, help="image side in pixels")
    k.add_argument("--seed", type=int, default=0, help="random seed")
    v = tools.add_parser("convert", help="convert a Karpathy split, COCO captions file or CSV/TSV table into the "
                                         "ALBEF layout",
                         description="A Karpathy split file (dataset_coco.json, dataset_flickr30k.json) becomes "
                                     "OUT/NAME_karpathy_train.json (train + restval, one entry per caption), "
                                     "OUT/NAME_karpathy_val.json and OUT/NAME_karpathy_test.json (one entry per "
                                     "image with its captions), NAME being coco, flickr30k, ... A COCO captions "
                                     "file (captions_val2014.json) becomes OUT/<its name>.json, one entry per image. "
                                     "So does a .csv or .tsv table with a header row (image path and caption "
                                     "columns), one entry per row; rows of one image share its image_id.")
    v.add_argument("source", help="the JSON file or table to convert")
    v.add_argument("--image-column", default="filepath", help="a table's image-path column")
    v.add_argument("--caption-column", default="title", help="a table's caption column")
    v.add_argument("--separator", default=None,
                   help="a table's column separator (default: from the suffix, ',' for .csv and tab for .tsv)")
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--image-prefix", default=None,
                   help="a folder prepended to every image path, e.g. flickr30k-images or val2014")
    n = tools.add_parser("inspect", help="count the samples of tar shards and show a few",
                         description="SHARDS: a path, a glob or a brace pattern such as 'shards/{00000..00009}.tar'.")
    n.add_argument("shards")
    n.add_argument("--show", type=NON_NEGATIVE, default=3, help="samples to show")


class _VersionAction(argparse.Action):
    """`--version`, with torch imported only when asked (the parser is built for every command)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_line())
        parser.exit()


def _version_line() -> str:
    """What a bug report needs in one line: our version, Python's, torch's and its build's accelerator."""
    import platform

    import torch

    from maskvlm import __version__
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else (
        f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else "CPU build")
    return f"maskvlm {__version__} (Python {platform.python_version()}, torch {torch.__version__}, {build})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskvlm", description="Masked vision-language pre-training.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of maskvlm, Python and torch (and torch's build) and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_pretrain(sub)
    _add_finetune(sub)
    _add_evaluate(sub)
    _add_data(sub)
    sub.add_parser("recipes", help="list the available recipes")
    _add_ablate(sub)
    e = sub.add_parser("export", help="write a checkpoint's model as a standalone folder",
                       description="Write config.yaml, model.safetensors (the model's weights only: no optimizer, "
                                   "EMA teacher or queues) and tokenizer.json (and a fine-tuned task's head and "
                                   "classes.json) into --out, loadable with VLM.from_pretrained / "
                                   "MaskVLM.from_pretrained and usable as --checkpoint.")
    e.add_argument("--checkpoint", required=True, help="a run folder (newest checkpoint) or a checkpoint folder")
    e.add_argument("--out", required=True, help="folder to write (created; must not hold a model already)")
    _add_search(sub)
    from .cli_insight import add_parsers
    add_parsers(sub)
    return parser


def _add_search(sub) -> None:
    i = sub.add_parser("index", help="build or extend an on-disk image embedding index",
                       description="Encode every image under --images (recursively) with the model's ITC image "
                                   "encoder into --out (float16 memory map + paths). Run again to add new images "
                                   "only. Unreadable images are skipped and counted.")
    i.add_argument("--checkpoint", required=True, help="model folder, checkpoint or run folder")
    i.add_argument("--images", required=True, help="folder of images")
    i.add_argument("--out", required=True, help="index folder")
    i.add_argument("--batch-size", type=POSITIVE, default=256)
    i.add_argument("--device", default="auto")
    i.add_argument("--workers", type=NON_NEGATIVE, default=None,
                   help="DataLoader processes decoding the images (default: 0 on a CPU, where they compete with "
                        "the model for the cores; up to 8 with a GPU, where decoding is the bottleneck)")
    i.add_argument("--rebuild", action="store_true", help="discard the index and encode everything again")
    i.add_argument("--no-progress", action="store_true")
    q = sub.add_parser("search", help="search an image index with a text or an image",
                       description="Rank the indexed images by ITC similarity to a text (--query) or an image "
                                   "(--image); --rerank re-scores the top candidates with the ITM head.")
    q.add_argument("--index", required=True, help="index folder written by `maskvlm index`")
    group = q.add_mutually_exclusive_group(required=True)
    group.add_argument("--query", help="text query")
    group.add_argument("--image", help="image query (a file)")
    q.add_argument("--top-k", type=POSITIVE, default=10)
    q.add_argument("--rerank", action="store_true", help="ITM re-ranking of the top candidates (text queries)")
    q.add_argument("--candidates", type=NON_NEGATIVE, default=0, help="candidates re-ranked (default 4 x top-k)")
    q.add_argument("--checkpoint", default=None, help="model (default: the one the index was built with)")
    q.add_argument("--device", default="auto")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_ablate(sub) -> None:
    from .ablation import CONFIGS, Study
    d = Study(out=Path("."))
    p = sub.add_parser(
        "ablate", help="pre-train every recipe and loss ablation on data fractions, then retrieval",
        description="The ablation study on the synthetic scenes: each config is pre-trained on nested fractions "
                    "of the training images with the same number of steps, for each seed, then evaluated "
                    "zero-shot and after retrieval fine-tuning. Finished runs are kept in OUT/results.jsonl "
                    "and skipped when the command is run again; a run stopped part-way (Ctrl-C, SIGTERM) is "
                    "continued from its checkpoint. The defaults take under an hour on 2 CPU cores.")
    p.add_argument("--out", default="runs/ablation", help="folder for runs, results.jsonl, ablation.md/.png")
    p.add_argument("--configs", nargs="+", default=d.configs, choices=list(CONFIGS), metavar="NAME",
                   help=f"configs to run (default all: {', '.join(CONFIGS)})")
    p.add_argument("--fractions", nargs="+", type=float, default=d.fractions, help="pre-training data fractions")
    p.add_argument("--seeds", nargs="+", type=int, default=d.seeds, help="seeds (each a full set of runs)")
    p.add_argument("--pretrain-steps", type=POSITIVE, default=d.pretrain_steps, help="steps per pre-training run")
    p.add_argument("--finetune-steps", type=NON_NEGATIVE, default=d.finetune_steps,
                   help="retrieval fine-tuning steps (0: none)")
    p.add_argument("--batch-size", type=POSITIVE, default=d.batch_size)
    p.add_argument("--num-train", type=POSITIVE, default=d.num_train,
                   help="synthetic training images (5 captions each)")
    p.add_argument("--size", choices=("small", "recipe"), default="small",
                   help="small: a 32 px model sized for CPUs (default); recipe: each recipe's own preset")
    p.add_argument("--report", default=None, type=output_file, metavar="FILE.md",
                   help="also write the tables into this markdown file (between ablation markers) "
                        "and copy the plot next to it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")


def _pretrain(args) -> int:
    from .config import build_config
    from .pipeline import pretrain

    overrides = _flag_overrides(args, _RUN_FLAGS + (("shards", "data.shards"), ("checkpoint", "task.init"))) + \
        list(args.overrides)
    config = build_config(args.recipe, args.preset, args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    pretrain(config, resume=args.resume, overrides=overrides)
    return 0


_RUN_FLAGS = (("data", "data.train"), ("val_data", "data.val"), ("test_data", "data.test"),
              ("image_root", "data.image_root"), ("output_dir", "train.output_dir"), ("steps", "train.max_steps"),
              ("device", "train.device"))


def _flag_overrides(args, flags) -> list[str]:
    out = []
    for flag, key in flags:
        value = getattr(args, flag)
        if flag in ("val_data", "test_data") and isinstance(value, str) and value.lower() in ("none", "null"):
            out.append(f"{key}=null")  # no such evaluation (a file named "none" is ./none)
        elif value is not None:
            out.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if args.no_progress:
        out.append("train.progress=false")
    return out


def _finetune(args) -> int:
    from .finetune import build_finetune_config, finetune

    overrides = _flag_overrides(args, _RUN_FLAGS) + list(args.overrides)
    config = build_finetune_config(args.task, args.checkpoint, args.config, overrides)
    if not config.task.init and args.resume is None:
        raise FileNotFoundError("fine-tuning starts from a pre-trained model: pass --checkpoint PATH, or task.init "
                                "in --config or as an override (or --resume to continue a fine-tuning run)")
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    finetune(config, resume=args.resume, overrides=overrides)
    return 0


def _join_torchrun() -> bool:
    """Under torchrun, join the job's process group (evaluations split their work over the ranks)
    and leave the reporting to rank 0; returns whether this process reports."""
    import logging

    from .train.distributed import init_from_env, is_main

    if init_from_env() and not is_main():
        logging.getLogger("maskvlm").setLevel(logging.WARNING)
        return False
    return True


def _evaluate(args) -> int:
    if args.task in ("grounding", "cross-modal", "binding"):
        from . import cli_insight
        return cli_insight.evaluate(args)
    if args.task in ("classification", "linear-probe"):
        return _evaluate_image_folders(args)
    reports = _join_torchrun()
    if args.task == "retrieval":
        return _evaluate_retrieval(args, reports)
    from .finetune import evaluate_task

    metrics = evaluate_task(args.task, args.checkpoint, args.data, args.image_root, args.device, args.precision,
                            args.batch_size, args.predictions if reports else None,
                            progress=not args.no_progress and reports, report=reports,
                            by_question_type=getattr(args, "by_question_type", False))
    if args.out and reports:
        write_json(args.out, metrics)
    return 0


def _evaluate_image_folders(args) -> int:
    """Zero-shot classification or a linear probe, on image folders (synthetic ones by default)."""
    from .data.synthetic_tasks import generate_classes
    from .inference import VLM
    from .tasks.zeroshot import DEFAULT_TEMPLATES, evaluate_zero_shot, format_report, load_image_folder, read_classnames

    vlm = VLM.from_pretrained(args.checkpoint, device=args.device, precision=args.precision)
    syn, progress = vlm.config.data.synthetic, not args.no_progress

    def folder(path, name: str, seed: int):
        if path is not None:
            return path
        return generate_classes(Path(syn.dir) / name, image_size=syn.image_size, seed=seed, progress=progress)

    if args.task == "linear-probe":
        from .tasks.probe import evaluate_probe
        train, test = folder(args.train, "classes-train", syn.seed + 1), folder(args.test, "classes", syn.seed)
        metrics = evaluate_probe(vlm, load_image_folder(train), load_image_folder(test), args.features,
                                 args.val_fraction, args.batch_size, progress)
        m = metrics
        print(format_report(m, f"linear probe on {args.features} features: trained on {train} ({m['train_images']} "
                               f"images), tested on {test} ({m['images']} images, {m['classes']} classes); "
                               f"weight decay {m['weight_decay']:g}"))
    else:
        data = folder(args.data, "classes", syn.seed)
        names = read_classnames(Path(args.classnames)) if args.classnames else None
        templates = args.template or list(DEFAULT_TEMPLATES)
        metrics = evaluate_zero_shot(vlm, load_image_folder(data, names, args.image_root), templates, args.rerank,
                                     args.batch_size, progress)
        how = f"ITM re-rank of the top {args.rerank}" if args.rerank else "ITC"
        print(format_report(metrics, f"zero-shot classification of {data} ({metrics['images']} images, "
                                     f"{metrics['classes']} classes, {len(templates)} templates, {how})"))
    if args.out:
        write_json(args.out, metrics)
    return 0


def _evaluate_retrieval(args, reports: bool = True) -> int:
    from .data.formats import RetrievalDataset
    from .models.model import load_pretrained
    from .runtime import resolve_device
    from .tasks.pretrain import eval_transform
    from .tasks.retrieval import choose_score, evaluate_retrieval, format_table, protocol_k
    from .train.checkpoint import model_folder

    device = resolve_device(args.device or "auto")
    data, image_root = args.data, args.image_root

    def evaluate(checkpoint: str, ranks: dict):
        nonlocal data, image_root
        folder = model_folder(checkpoint)
        model, config, tokenizer = load_pretrained(folder, device)
        if tokenizer is None:
            raise FileNotFoundError(f"{folder}: no tokenizer.json next to the weights")
        if data is None:  # the first model's test file (and its image root) serve both
            data, image_root = config.data.test, image_root or config.data.image_root
            if not data:
                raise ValueError("no --data given and the checkpoint's config has no data.test")
        dataset = RetrievalDataset(data, image_root, eval_transform(config))
        e = config.eval
        k = protocol_k(data, e.k, e.k_auto) if args.k is None else args.k
        score = choose_score(config, args.score)
        metrics = evaluate_retrieval(model, tokenizer, dataset, config.data.max_text_len, k,
                                     score, args.batch_size or e.batch_size, device,
                                     args.precision or config.train.precision,
                                     progress=not args.no_progress and reports, ranks_out=ranks, split_over_ranks=True,
                                     compile_backend=config.train.compile_backend if args.compile else None)
        if reports:
            print(format_table(metrics, f"retrieval on {data} ({len(dataset)} images, {len(dataset.texts)} "
                                        f"captions){': ' + checkpoint if args.against else ''}", score))
        return metrics, dataset

    ranks_a, ranks_b = {}, {}
    metrics, dataset = evaluate(args.checkpoint, ranks_a)
    if args.misses:
        from .tasks.retrieval import format_misses, near_misses
        misses = near_misses(dataset, ranks_a, args.misses)
        if reports:
            print(format_misses(misses))
        metrics = {**metrics, "misses": misses}
    if args.against:
        from .tasks.retrieval import paired_r1_difference
        metrics = {"model": metrics, "against": evaluate(args.against, ranks_b)[0]}
        d = metrics["difference"] = paired_r1_difference(ranks_a, ranks_b, dataset.txt2img)
        if reports:
            print(f"mean R@1, {args.checkpoint} minus {args.against}: {d['r1_mean_difference']:+.1f} (95% CI "
              f"{d['ci_low']:+.1f} to {d['ci_high']:+.1f}, paired bootstrap over the {d['images']} images); the first "
                  f"is ahead in {100 * d['a_ahead_share']:.0f}% of the resamples")
    if args.out and reports:
        write_json(args.out, metrics)
    return 0


def _data(args) -> int:
    if args.tool == "shard":
        from .data.shards import write_shards
        summary = write_shards(Path(args.data), args.image_root, Path(args.out), args.shard_size)
        print(f"wrote {summary['samples']} samples in {summary['shards']} shards: {summary['pattern']}")
        return 0
    if args.tool == "synthetic-classes":
        from .data.synthetic_tasks import class_names, generate_classes
        out = generate_classes(args.out, args.attribute, args.per_class, args.image_size, args.seed)
        print(f"{out}: {len(class_names(args.attribute))} classes x {args.per_class} images")
        return 0
    if args.tool == "convert":
        from .data.convert import convert
        separator = args.separator.encode().decode("unicode_escape") if args.separator else None  # "\t" typed
        summary = convert(args.source, args.out, args.image_prefix, args.image_column, args.caption_column, separator)
        for path, counts in summary["files"].items():
            print(f"wrote {path}: {counts['images']} images, {counts['captions']} captions")
        if summary["skipped"]:
            print("skipped: " + ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()))
        print("image paths are relative to the folder to pass as --image-root")
        return 0
    if args.tool == "inspect":
        from .data.shards import inspect_shards
        from .data.stream import expand_shards
        print(inspect_shards(expand_shards(args.shards), args.show))
        return 0
    if args.tool == "corrupt":
        from .data.corrupt import corrupt_dataset
        summary = corrupt_dataset(Path(args.data), Path(args.out), args.rate, args.seed,
                                  Path(args.image_root) if args.image_root else None)
        print(f"wrote {Path(args.out) / Path(args.data).name}: {summary['broken']} of {summary['entries']} entries "
              f"broken, {summary['converted']} with unusual images; kinds: {summary['kinds']}")
        return 0
    from .data.synthetic import generate
    out = generate(args.out, args.num_train, args.num_val, args.num_test, args.image_size, args.seed)
    print(f"wrote {out}/train.json, val.json, test.json and images/")
    return 0


def _recipes(args) -> int:
    from .config import recipe_path, list_recipes
    for name in list_recipes():
        with open(recipe_path("", name)) as f:
            first = f.readline().lstrip("# ").strip()
        print(f"{name:12s} {first}")
    return 0


def _index(args) -> int:
    from .train.checkpoint import model_folder
    from .inference import VLM
    from .search import build_index

    folder = model_folder(args.checkpoint)
    vlm = VLM.from_pretrained(folder, device=args.device)
    workers = args.workers
    if workers is None:  # benchmarks/index_build.py: no gain on a 2-core CPU; a GPU waits on decoding
        workers = 0 if vlm.device.type == "cpu" else min(8, os.cpu_count() or 1)
    stats = build_index(vlm, folder, Path(args.images), Path(args.out), args.batch_size,
                        progress=not args.no_progress, rebuild=args.rebuild, workers=workers)
    print(f"index {args.out}: {stats.total} images ({stats.added} added, {stats.skipped_existing} already there, "
          f"{stats.unreadable} unreadable skipped) in {stats.seconds:.1f} s")
    return 0


def _search(args) -> int:
    from .inference import VLM
    from .search import ImageIndex, search
    from .train.checkpoint import model_folder

    index = ImageIndex(Path(args.index))
    source = args.checkpoint or index.meta["model"]
    if not args.checkpoint and not Path(source).exists():
        raise FileNotFoundError(f"{args.index} was built with {source}, which is gone; pass --checkpoint with those "
                                "weights (a copy, or the model exported from them), or re-index with another model")
    vlm = VLM.from_pretrained(source, device=args.device)
    results = search(vlm, index, text=args.query, image=Path(args.image) if args.image else None,
                     top_k=args.top_k, rerank=args.rerank, candidates=args.candidates, model_dir=model_folder(source))
    if args.json:
        print(json.dumps([{"path": p, "score": s} for p, s in results], indent=1))
        return 0
    kind = "ITM log-odds + ITC logit" if args.rerank else "cosine"
    for rank, (path, score) in enumerate(results, 1):  # the name's own bytes, also where they are not UTF-8
        sys.stdout.flush()
        sys.stdout.buffer.write(f"{rank:3d}  {score:8.4f}  ".encode() + os.fsencode(path) + b"\n")
    print(f"({len(index)} images indexed; score: {kind})", file=sys.stderr)
    return 0


def _export(args) -> int:
    import shutil

    from safetensors.torch import save_file

    from .models.io import (CHECKSUM_FILE, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, read_config, read_weights,
                            write_checksums)
    from .tasks.downstream import CLASSES_FILE
    from .train.checkpoint import model_folder, model_only

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; --out names a folder to write the model into")
    if (out / MODEL_FILE).exists():
        raise FileExistsError(f"{out} already holds {MODEL_FILE}; choose another --out")
    source = model_folder(args.checkpoint)
    config = read_config(source)
    state = read_weights(source / MODEL_FILE)
    # an exported folder (no model. prefix) is copied as it is
    weights = model_only(state, config.task.name) if any(k.startswith("model.") for k in state) else state
    out.mkdir(parents=True, exist_ok=True)
    written = [MODEL_FILE] + [name for name in (CONFIG_FILE, TOKENIZER_FILE, CLASSES_FILE) if (source / name).exists()]
    try:
        save_file(weights, str(out / MODEL_FILE), metadata={"format": "pt"})
        for name in written[1:]:
            shutil.copy(source / name, out / name)
        write_checksums(out)
    except BaseException:  # e.g. a full disk: no half-written model is left to refuse the next try
        for name in (*written, CHECKSUM_FILE):
            (out / name).unlink(missing_ok=True)
        raise
    size = (out / MODEL_FILE).stat().st_size / 2 ** 20
    print(f"exported {source} -> {out} ({len(weights)} tensors, {size:.1f} MiB)")
    return 0


def _ablate(args) -> int:
    from .ablation import SMALL, Study, StudyStopped, report, run_study
    from .train.logging import setup_logging

    setup_logging()
    out = Path(args.out)
    study = Study(out=out, configs=args.configs, fractions=args.fractions, seeds=args.seeds,
                  pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps, batch_size=args.batch_size,
                  size_overrides=list(SMALL) if args.size == "small" else [], extra_overrides=list(args.overrides),
                  num_train=args.num_train)
    try:
        rows = run_study(study, progress=not args.no_progress)
    except StudyStopped as e:  # like a stopped pretrain: exit 0, with how to continue
        logging.getLogger("maskvlm").warning("ablation %s", e)
        return 0
    from .runtime import invocation, machine_description
    text = report(rows, out, command=invocation(), machine=machine_description())
    (out / "ablation.md").write_text(text)
    print(text)
    if args.report:
        write_between_markers(Path(args.report), text, "ablation")
        png = out / "ablation.png"
        if png.exists() and Path(args.report).parent.resolve() != out.resolve():
            import shutil
            shutil.copy(png, Path(args.report).parent / png.name)  # the markdown links it by name
    return 0


def write_between_markers(path: Path, text: str, name: str) -> None:
    """Replace the block between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else ""
    block = f"{start}\n{text}{end}"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


OVERRIDE_RE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")
OVERRIDE_COMMANDS = ("pretrain", "finetune", "ablate")


def main(argv=None) -> int:
    from .config import ConfigError
    from .data.formats import DataError
    from .folder_lock import FolderInUse
    from .train.logging import setup_logging
    from .train.distributed import shutdown
    from .train.loop import NonFiniteTraining

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `key.sub=value` overrides are taken out first, so they may follow options that take several
    # values (`--seeds 0 1 train.clip_grad=0` would otherwise hand the override to --seeds)
    overrides = [x for x in argv if OVERRIDE_RE.match(x)] if argv and argv[0] in OVERRIDE_COMMANDS else []
    args, extra = parser.parse_known_args([x for x in argv if x not in overrides] if overrides else argv)
    if overrides:
        args.overrides = list(args.overrides) + overrides
    # key=value overrides may come after options (argparse only takes positionals in one run)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    _expand_home(args)
    setup_logging()
    handlers = {"pretrain": _pretrain, "finetune": _finetune, "evaluate": _evaluate, "data": _data, "recipes": _recipes,
                "ablate": _ablate, "export": _export, "index": _index, "search": _search}
    from . import cli_insight
    handlers.update({"reconstruct": cli_insight.reconstruct, "fill-mask": cli_insight.fill_mask,
                     "ground": cli_insight.ground, "plot": cli_insight.plot})
    clean = False
    try:
        code = handlers[args.command](args)
        clean = True
        return code
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, FolderInUse, ValueError,
            NonFiniteTraining) as e:
        print(f"maskvlm {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output left (`maskvlm recipes | head -3`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 128 + 13  # as a process killed by SIGPIPE
    except Exception as e:
        return _storage_error(args.command, e)
    finally:
        shutdown(clean)  # under torchrun: leave the process group before the interpreter exits


def _storage_error(command: str, e: Exception) -> int:
    """A path that cannot be written (read-only disk, no permission: exit 2) or a full disk or exceeded
    quota, in whatever form it was raised (exit 1), as one line; any other error is raised on."""
    from .models.io import out_of_space
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and e.filename:
        print(f"maskvlm {command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    if not out_of_space(e):
        raise e
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    if not text.startswith("no space left"):
        text = f"no space left on the device ({text})"
    print(f"maskvlm {command}: error: {text}", file=sys.stderr)
    return 1


def _message(error: BaseException) -> str:
    """The error's own message. One raised in a DataLoader worker reaches this process re-raised by
    torch with the worker's whole traceback as its message; its last line is the message."""
    text = str(error)
    name = f"{type(error).__module__}.{type(error).__qualname__}: "
    if text.startswith("Caught ") and "Original Traceback" in text and name in text:
        return text.rsplit(name, 1)[1].strip()
    return text


if __name__ == "__main__":
    sys.exit(main())
