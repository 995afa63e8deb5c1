"""CLI for looking at a model: ``maskvlm reconstruct``, ``fill-mask``, ``ground``, ``plot`` and
``maskvlm evaluate grounding | cross-modal`` (the functions live in :mod:`maskvlm.insight`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import POSITIVE, SHARE, output_file, write_json
from .config import PRECISIONS, expand_home


def picture_file(text: str) -> str:
    """--out of a command that writes an image: checked before the work, not when saving after it."""
    from PIL import Image

    text = expand_home(text)
    suffix = Path(text).suffix.lower()
    if Image.registered_extensions().get(suffix) not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"{text}: expected an image file name ending in .png, .jpg or another "
                                         "suffix of a format PIL writes")
    return text


CHECKPOINT_HELP = "a run folder (newest checkpoint), a checkpoint folder or an exported model folder"


def _common(p, precision: bool = True) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    if precision:
        p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="fp32 (default, exact numbers) or bf16 autocast")


def add_parsers(sub) -> None:
    r = sub.add_parser(
        "reconstruct", help="masked-image reconstructions with a matching and a mismatched caption",
        description="Mask an image (the recipe's block masking, seeded), let the text-conditioned MIM decoder fill "
                    "it in with the matching caption and with a mismatched one, and write a PNG grid: original, "
                    "masked input, reconstruction with the matching caption, with the mismatched caption. Prints "
                    "the masked-patch L1 error of both. Either one --image with --text, or --data: the first --num "
                    "images of a retrieval JSON (each mismatched with the caption of the image half the split away).")
    _common(r)
    r.add_argument("--image", help="an image file")
    r.add_argument("--text", help="its caption")
    r.add_argument("--mismatched-text", default=None, help="a caption of something else (default: an empty caption)")
    r.add_argument("--data", help="batch mode: a retrieval JSON (one entry per image with captions), e.g. test.json")
    r.add_argument("--image-root", default=None, help="folder the JSON image paths are relative to")
    r.add_argument("--num", type=POSITIVE, default=8, help="batch mode: images in the grid")
    r.add_argument("--mask-ratio", type=SHARE, default=None, help="share of patches masked (default: the recipe's)")
    r.add_argument("--seed", type=int, default=0, help="mask seed")
    r.add_argument("--out", required=True, type=picture_file, help="PNG file to write")

    f = sub.add_parser(
        "fill-mask", help="top-k tokens for each [MASK] given the image, a masked image and a mismatched image",
        description="Fill in each [MASK] of --text with the image-conditioned MLM head, three times side by side: "
                    "with the image, with every patch of the image masked, and with a mismatched image.")
    _common(f)
    f.add_argument("--image", required=True)
    f.add_argument("--text", required=True, help='text with [MASK] tokens, e.g. "a small [MASK] circle"')
    f.add_argument("--mismatched-image", default=None,
                   help="another image (default: the next image file in --image's folder)")
    f.add_argument("--top-k", type=POSITIVE, default=5)
    f.add_argument("--out", default=None, type=output_file, help="also write the tables as markdown to this file")

    g = sub.add_parser(
        "ground", help="Grad-CAM heat map of a phrase over an image",
        description="Where in the image does a phrase attend: Grad-CAM of the ITM match score on the cross-"
                    "attention of the text cross-modality encoder (single-stream models: the text-to-image part of "
                    "the joint self-attention), overlaid on the image (written as PNG: the image, then one "
                    "overlay per phrase).")
    _common(g, precision=False)
    g.add_argument("--image", required=True)
    g.add_argument("--text", required=True, nargs="+",
                   help='one or more phrases, e.g. "the red circle" "the blue square" (one overlay each)')
    g.add_argument("--layer", type=int, default=None,
                   help="cross-attention layer of the text cross-modality encoder (single-stream "
                        "models: layer of the joint transformer; default: the middle one, rounded down)")
    g.add_argument("--out", required=True, type=picture_file, help="PNG file to write")

    p = sub.add_parser("plot", help="training curves of one or more runs",
                       description="Loss terms, learning rate, throughput and evaluation metrics over steps, "
                                   "from each run's metrics.jsonl (needs matplotlib).")
    p.add_argument("--log", nargs="+", required=True, help="run folders (or metrics.jsonl files)")
    p.add_argument("--out", required=True, help="PNG file to write")


def add_evaluate_parsers(tasks) -> None:
    for name, title in (("grounding", "pointing-game accuracy of Grad-CAM heat maps for referring phrases "
                                      "(needs object boxes: the synthetic scenes have them)"),
                        ("cross-modal", "MLM accuracy with matching / mismatched / masked image and MIM error "
                                        "with matching / mismatched / empty text"),
                        ("binding", "how often a two-object scene's caption beats the same caption with the colours, "
                                    "the shapes or left and right exchanged, by ITC and by ITM (needs the objects "
                                    "of each scene: the synthetic scenes list them)")):
        t = tasks.add_parser(name, help=title, description=title[0].upper() + title[1:] + ".")
        _common(t, precision=name != "grounding")
        t.add_argument("--data", default=None, help="retrieval JSON (default: the checkpoint's data.test)")
        t.add_argument("--image-root", default=None, help="image folder (default: the JSON file's folder)")
        t.add_argument("--batch-size", type=POSITIVE, default=32)
        if name == "grounding":
            t.add_argument("--layer", type=int, default=None,
                           help="cross-attention layer (single-stream models: joint-transformer layer; "
                                "default: the middle one, rounded down)")
        elif name == "cross-modal":
            t.add_argument("--seed", type=int, default=0, help="mask seed")
            t.add_argument("--text-ratio", type=SHARE, default=None, help="caption tokens masked (default: recipe's)")
            t.add_argument("--image-ratio", type=SHARE, default=None, help="patches masked (default: recipe's)")
        t.add_argument("--out", default=None, type=output_file, help="also write the metrics as JSON to this file")
        t.add_argument("--no-progress", action="store_true")


def _vlm(args):
    from .inference import VLM
    return VLM.from_pretrained(args.checkpoint, device=args.device, precision=getattr(args, "precision", "fp32"))


def _write(picture, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(f"wrote {out} ({picture.width}x{picture.height})")


def reconstruct(args) -> int:
    from .insight import reconstruction_grid

    if bool(args.data) == bool(args.image):
        raise ValueError("reconstruct: give either --image with --text, or --data (batch mode)")
    vlm = _vlm(args)
    ratio = vlm.config.masking.image_ratio if args.mask_ratio is None else args.mask_ratio
    if not 0 < ratio < 1:
        raise ValueError(f"--mask-ratio {ratio}: expected a value in (0, 1)")
    if args.image:
        if not args.text:
            raise ValueError("reconstruct: --image needs --text (its caption)")
        images, texts = [args.image], [args.text]
        mismatched = [args.mismatched_text if args.mismatched_text is not None else ""]
    else:
        from .data.formats import load_annotations, valid_captions

        entries = load_annotations(args.data)  # checked: a clear error names a bad entry
        if len(entries) < 2:
            raise ValueError(f"{args.data}: batch mode needs at least 2 images")
        root = Path(args.image_root) if args.image_root else Path(args.data).parent
        shift = len(entries) // 2
        chosen = list(range(min(args.num, len(entries))))
        images = [root / entries[i]["image"] for i in chosen]
        texts = [valid_captions(entries[i]["caption"])[0] for i in chosen]
        mismatched = [valid_captions(entries[(i + shift) % len(entries)]["caption"])[0] for i in chosen]
    result = reconstruction_grid(vlm, images, texts, mismatched, ratio, args.seed)
    for i, (a, b) in enumerate(zip(result.error_matching, result.error_mismatched)):
        print(f"{Path(images[i]).name}: masked-patch L1 {a:.4f} with the matching caption, {b:.4f} with "
              f"{'the mismatched' if mismatched[i] else 'an empty'} caption")
        print(f"    matching:   {texts[i]!r}\n    mismatched: {mismatched[i]!r}")
    n = len(images)
    print(f"mean masked-patch L1 over {n} image{'s' * (n > 1)} ({ratio:.0%} masked): matching "
          f"{sum(result.error_matching) / n:.4f}, mismatched {sum(result.error_mismatched) / n:.4f}")
    _write(result.picture, args.out)
    return 0


def _next_image(path: Path) -> Path:
    from .search import list_images

    names = list_images(path.parent)
    others = [n for n in names if n != path.name]
    if not others:
        raise ValueError(f"--mismatched-image not given and {path.parent} has no other image to use")
    later = [n for n in others if n > path.name]
    return path.parent / (later[0] if later else others[0])


def fill_mask(args) -> int:
    from .insight import FILL_CONDITIONS, fill_mask_compare, fill_mask_markdown

    vlm = _vlm(args)
    other = Path(args.mismatched_image) if args.mismatched_image else _next_image(Path(args.image))
    rows = fill_mask_compare(vlm, args.image, other, args.text, args.top_k)
    print(f"text: {args.text}\nimage: {args.image}\nmismatched image: {other}")
    width = 22
    for j, row in enumerate(rows):
        print(f"\n[MASK] {j + 1}")
        print("rank  " + "".join(f"{c:<{width}}" for c in FILL_CONDITIONS))
        for r in range(args.top_k):
            cells = [f"{row[c][r][0]} ({row[c][r][1]:.2f})" if r < len(row[c]) else "" for c in FILL_CONDITIONS]
            print(f"{r + 1:<6}" + "".join(f"{c:<{width}}" for c in cells))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"image: `{args.image}`, mismatched image: `{other}`\n\n"
                                  + fill_mask_markdown(args.text, rows))
        print(f"\nwrote {args.out}")
    return 0


def ground(args) -> int:
    from PIL import Image, ImageDraw

    from .insight import _to_pil, grounding_maps, overlay

    vlm = _vlm(args)
    maps = grounding_maps(vlm, [args.image] * len(args.text), args.text, args.layer)
    size, pad = 256, 2
    picture = Image.new("RGB", ((1 + len(maps)) * (size + pad) + pad, size + 18), "white")
    draw = ImageDraw.Draw(picture)
    picture.paste(_to_pil(vlm, vlm._image_tensor([args.image])[0], size), (pad, 16))
    draw.text((pad + 2, 2), Path(args.image).name, fill="black")
    for i, (phrase, heat) in enumerate(zip(args.text, maps), 1):
        picture.paste(overlay(vlm, args.image, heat, size), (pad + i * (size + pad), 16))
        draw.text((pad + i * (size + pad) + 2, 2), f'"{phrase}"', fill="black")
        gh, gw = heat.shape
        y, x = divmod(int(heat.argmax()), gw)
        print(f"{phrase!r}: heat-map maximum at patch row {y}, column {x} of {gh}x{gw}")
    _write(picture, args.out)
    return 0


def plot(args) -> int:
    from .insight import plot_curves

    out = plot_curves([Path(p) for p in args.log], Path(args.out))
    print(f"wrote {out}")
    return 0


def _data_path(args, vlm) -> Path:
    data = args.data or vlm.config.data.test
    if not data:
        raise ValueError("no --data given and the checkpoint's config has no data.test")
    if not Path(data).is_file():
        raise FileNotFoundError(f"{data}: no such file (give --data)")
    return Path(data)


def evaluate(args) -> int:
    from .insight import binding_test, cross_modal_dependence, pointing_game

    vlm = _vlm(args)
    data = _data_path(args, vlm)
    root = Path(args.image_root) if args.image_root else None
    if args.task == "grounding":
        m = pointing_game(vlm, data, root, args.layer, args.batch_size, progress=not args.no_progress)
        print(f"pointing game on {data}: {m['phrases']} referring phrases over {m['images']} images "
              f"({m['attention']})")
        print(f"  Grad-CAM maximum inside the named object's box: {m['pointing_accuracy']:.1f}%")
        print(f"  a uniform random point:                         {m['uniform_random_point']:.1f}%")
        print(f"  the image centre:                               {m['image_centre']:.1f}%")
        if m["multi_object_phrases"]:
            print(f"  in the {m['multi_object_phrases']} scenes with several objects: maximum on the named object "
                  f"{m['multi_object_accuracy']:.1f}%, on another object {m['multi_object_other_object']:.1f}%")
    elif args.task == "binding":
        m = binding_test(vlm, data, root, args.batch_size, progress=not args.no_progress)
        print(f"attribute binding on {data}: each two-object scene's caption against the same words with two "
              f"attributes exchanged; the share of pairs where the caption wins (chance 50%), with the scene's own "
              f"image and, as a control, with another scene's")
        print(f"  {'exchanged':12s}{'pairs':>7s}{'ITC':>9s}{'ITM':>9s}{'ITC other':>12s}{'ITM other':>12s}")
        for probe, r in m["probes"].items():
            print(f"  {probe:12s}{r['pairs']:7d}{r['itc_accuracy']:8.1f}%{r['itm_accuracy']:8.1f}%"
                  f"{r['itc_accuracy_other_image']:11.1f}%{r['itm_accuracy_other_image']:11.1f}%")
        for probe, ex in m["examples"].items():
            print(f'  e.g. {probe}: "{ex["caption"]}" vs "{ex["swapped"]}"')
    else:
        m = cross_modal_dependence(vlm, data, root, args.text_ratio, args.image_ratio, args.batch_size, args.seed,
                                   progress=not args.no_progress)
        print(f"cross-modal dependence on {data} ({m['images']} images, first caption each; "
              f"{m['text_ratio']:.0%} of caption tokens / {m['image_ratio']:.0%} of patches masked)")
        print("  MLM accuracy on masked tokens:  " + ", ".join(f"{k} {v:.1f}%" for k, v in m["mlm_accuracy"].items()))
        print("  MIM L1 error on masked patches: " + ", ".join(f"{k} {v:.4f}" for k, v in m["mim_l1"].items()))
        print(f"  mismatched minus matching MIM error, paired over images: {m['mim_gain_mean']:+.4f} "
              f"(standard error {m['mim_gain_stderr']:.4f}); matching lower on {m['mim_matching_lower_share']:.0f}% "
              "of the images")
    if args.out:
        write_json(args.out, m)
    sys.stdout.flush()
    return 0
