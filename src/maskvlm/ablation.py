"""The ablation study: every recipe and the MaskVLM loss ablations, pre-trained on nested
fractions of the synthetic training images with the same number of steps (same compute), a
few seeds each, then zero-shot and fine-tuned retrieval on the test split.

Each finished run appends one JSON line to ``OUT/results.jsonl``; running the study again
skips what is there, so an interrupted study continues where it stopped. ``summarise`` turns
the lines into a markdown table (mean +- standard deviation over seeds) and a PNG plot of
fine-tuned R@1 against the data fraction."""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .data.formats import read_json
from .train.logging import open_jsonl, read_jsonl

log = logging.getLogger("maskvlm")

# name -> (recipe, overrides). "itc" is both a recipe and the first MaskVLM loss ablation.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "itc": ("itc", []),
    "itc+itm": ("maskvlm", ["loss.mlm=0", "loss.mim=0"]),
    "itc+itm+mlm": ("maskvlm", ["loss.mim=0"]),
    "itc+itm+mim": ("maskvlm", ["loss.mlm=0"]),
    "maskvlm": ("maskvlm", []),
    "mlm+mim": ("maskvlm", ["loss.itc=0", "loss.itm=0"]),
    "albef": ("albef", []),
    "mamo": ("mamo", []),
    "semmim": ("semmim", []),
    "mlim": ("mlim", []),
}

# The default (CPU, under an hour on 2 cores): a smaller model on 32 px scenes, short schedules.
SMALL = [
    "model.image_size=32", "model.patch_size=8", "model.vision_width=128", "model.vision_layers=3",
    "model.vision_heads=2", "model.text_width=128", "model.text_layers=1", "model.cross_layers=1",
    "model.text_heads=2", "model.text_intermediate=512", "model.image_cross_layers=1",
    "model.image_cross_heads=2", "model.embed_dim=64", "model.single_layers=4", "data.synthetic.image_size=32",
    "data.synthetic.dir=data/synthetic-32", "momentum.queue_size=4096", "prototypes.num=256",
]


@dataclass
class Study:
    out: Path
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    fractions: list[float] = field(default_factory=lambda: [0.25, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    pretrain_steps: int = 400
    finetune_steps: int = 150
    batch_size: int = 32
    size_overrides: list[str] = field(default_factory=lambda: list(SMALL))
    extra_overrides: list[str] = field(default_factory=list)
    num_train: int = 2000  # synthetic training images (5 captions each)

    def check(self) -> None:
        unknown = [c for c in self.configs if c not in CONFIGS]
        if unknown:
            raise ValueError(f"unknown ablation config(s) {unknown}; available: {', '.join(CONFIGS)}")
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"data fractions must be in (0, 1]; got {bad}")
        if self.pretrain_steps < 1 or self.finetune_steps < 0 or self.batch_size < 2:
            raise ValueError("pretrain_steps >= 1, finetune_steps >= 0 and batch_size >= 2 are required")


def subset_annotations(train_json: Path, fraction: float, seed: int, out: Path) -> Path:
    """Write the entries of ``fraction`` of the images (all their captions). The image order is
    one fixed permutation per seed, so smaller fractions are subsets of larger ones."""
    entries = read_json(train_json)
    images = sorted({str(e.get("image_id", e["image"])) for e in entries})
    random.Random(seed).shuffle(images)
    keep = set(images[:max(1, round(fraction * len(images)))])
    root = Path(train_json).parent
    chosen = [dict(e, image=str((root / e["image"]).resolve())) for e in entries
              if str(e.get("image_id", e["image"])) in keep]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(chosen))
    return out


def _done(results_file: Path) -> dict[tuple, dict]:
    if not results_file.exists():
        return {}
    rows, _ = read_jsonl(results_file)  # a line cut by a killed study is skipped: that run is done again
    return {(r["config"], r["fraction"], r["seed"]): r for r in rows}


class StudyStopped(Exception):
    """A run of the study was stopped part-way (SIGINT / SIGTERM): it is not recorded, and the same
    command continues it from its checkpoint."""


def _resume(cfg) -> Optional[str]:
    """A run stopped part-way by an earlier invocation continues from its checkpoint."""
    from .train.checkpoint import list_checkpoints
    return "auto" if list_checkpoints(Path(cfg.train.output_dir)) else None


def _check_finished(result: dict, tag: str, stage: str) -> None:
    if result.get("interrupted"):
        raise StudyStopped(f"stopped during {tag} ({stage} at step {result['step']}); it is not recorded. Run the "
                           "same command again to continue it from its checkpoint and go on with the study")


def run_study(study: Study, progress: bool = False) -> list[dict]:
    """Run every (config, fraction, seed) not yet in ``results.jsonl``; returns all rows."""
    from .config import build_config
    from .data.synthetic import ensure_synthetic
    from .finetune import build_finetune_config, finetune
    from .pipeline import pretrain

    study.check()
    study.out.mkdir(parents=True, exist_ok=True)
    results_file = study.out / "results.jsonl"
    done = _done(results_file)
    other = [k for k, r in done.items() if (r["pretrain_steps"], r["finetune_steps"]) !=
             (study.pretrain_steps, study.finetune_steps)]
    if other:
        raise ValueError(f"{results_file} holds runs with other step counts (e.g. {other[0]}); "
                         "choose another --out or the same --pretrain-steps / --finetune-steps")
    base = build_config("maskvlm", overrides=study.size_overrides + study.extra_overrides)
    s = base.data.synthetic
    root = ensure_synthetic(s.dir, study.num_train, s.num_val, s.num_test, s.image_size, s.seed, progress=progress)
    # eval.keep_best=false: the study reports the last weights, so no run needs a best copy or a final val pass
    common = [f"data.val={root / 'val.json'}", f"data.test={root / 'test.json'}", "eval.every_steps=0",
              "eval.keep_best=false",
              f"train.batch_size={study.batch_size}", "train.save_every=0", "train.keep_last=1",
              f"train.progress={str(progress).lower()}", "data.num_workers=0"]
    runs = [(c, f, sd) for sd in study.seeds for f in study.fractions for c in study.configs]
    for i, (name, fraction, seed) in enumerate(runs):
        if (name, fraction, seed) in done:
            continue
        recipe, overrides = CONFIGS[name]
        tag = f"{name.replace('+', '_')}-f{fraction:g}-s{seed}"
        subset = subset_annotations(root / "train.json", fraction, seed, study.out / "data" / f"train-f{fraction:g}"
                                    f"-s{seed}.json")
        log.info("ablation run %d/%d: %s, %.0f%% of the images, seed %d", i + 1, len(runs), name, 100 * fraction, seed)
        start = time.perf_counter()
        warmup = max(1, study.pretrain_steps // 10)
        cfg = build_config(recipe, overrides=study.size_overrides + overrides + common + study.extra_overrides + [
            f"data.train={subset}", f"train.seed={seed}", f"train.max_steps={study.pretrain_steps}",
            f"train.warmup_steps={warmup}", f"train.output_dir={study.out / 'runs' / tag / 'pre'}"])
        pre = pretrain(cfg, resume=_resume(cfg))
        _check_finished(pre, tag, "pre-training")
        row = {"config": name, "recipe": recipe, "fraction": fraction, "seed": seed,
               "train_pairs": sum(1 for _ in json.loads(subset.read_text())),
               "pretrain_steps": study.pretrain_steps, "finetune_steps": study.finetune_steps}
        if "test" in pre:
            row["zero_shot_r1"] = pre["test"]["r1_mean"]
            row["zero_shot_itc_r1"] = pre["test"]["itc_r1_mean"]
        if study.finetune_steps > 0:
            ft_cfg = build_finetune_config("retrieval", pre["checkpoint"], overrides=common + study.extra_overrides + [
                f"data.train={subset}", f"train.seed={seed}", f"train.max_steps={study.finetune_steps}",
                f"train.warmup_steps={max(1, study.finetune_steps // 10)}",
                f"train.output_dir={study.out / 'runs' / tag / 'retrieval'}"])
            ft = finetune(ft_cfg, resume=_resume(ft_cfg))
            _check_finished(ft, tag, "retrieval fine-tuning")
            row["finetuned_r1"] = ft["test"]["r1_mean"]
            row["finetuned_itc_r1"] = ft["test"]["itc_r1_mean"]
        row["seconds"] = round(time.perf_counter() - start, 1)
        with open_jsonl(results_file) as f:
            f.write(json.dumps(row) + "\n")
        done[(name, fraction, seed)] = row
    return list(done.values())


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def summarise(rows: list[dict], metric: str) -> tuple[list[str], list[float], dict[str, dict[float, list[float]]]]:
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows})
    table: dict[str, dict[float, list[float]]] = {c: {f: [] for f in fractions} for c in configs}
    for r in rows:
        if metric in r:
            table[r["config"]][r["fraction"]].append(r[metric])
    return configs, fractions, table


def markdown_table(rows: list[dict], metric: str, title: str) -> str:
    configs, fractions, table = summarise(rows, metric)
    seeds = sorted({r["seed"] for r in rows})
    head = f"**{title}** (mean ± std over seeds {', '.join(map(str, seeds))}; mean R@1 of TR and IR, test split)\n\n"
    lines = ["| config | " + " | ".join(f"{100 * f:g}% data" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for c in configs:
        lines.append(f"| {c} | " + " | ".join(_cell(table[c][f]) for f in fractions) + " |")
    return head + "\n".join(lines) + "\n"


METRICS = (  # (results key, title)
    ("zero_shot_r1", "Zero-shot retrieval, ITM re-ranking of the ITC top-k (ITC ranking for itc)"),
    ("zero_shot_itc_r1", "Zero-shot retrieval, ITC ranking"),
    ("finetuned_r1", "Fine-tuned retrieval, ITM re-ranking of the ITC top-k"),
    ("finetuned_itc_r1", "Fine-tuned retrieval, ITC ranking"),
)


def plot(rows: list[dict], path: Path) -> Optional[Path]:
    """Fine-tuned R@1 (re-ranked, and ITC ranking) against the data fraction, one line per config
    (needs matplotlib; None without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (metric, title) in zip(axes, METRICS[2:]):
        configs, fractions, table = summarise(rows, metric)
        for c in configs:
            xs = [f for f in fractions if table[c][f]]
            if not xs:
                continue
            means = [statistics.mean(table[c][f]) for f in xs]
            errs = [statistics.stdev(table[c][f]) if len(table[c][f]) > 1 else 0.0 for f in xs]
            ax.errorbar([100 * x for x in xs], means, yerr=errs, marker="o", capsize=3, label=c)
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("pre-training data (fraction of the synthetic training images)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean R@1 (TR, IR), test split")
    axes[1].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(rows: list[dict], out: Path, command: str = "", machine: str = "") -> str:
    """Markdown with the four tables and the plot written next to it (``out/ablation.png``)."""
    png = plot(rows, out / "ablation.png")
    total = sum(r.get("seconds", 0) for r in rows)
    steps = sorted({(r["pretrain_steps"], r["finetune_steps"]) for r in rows})
    parts = [f"Command: `{command}`" if command else "", f"Machine: {machine}" if machine else "",
             f"{len(rows)} runs, {total / 60:.0f} min of run time in all; (pre-training, fine-tuning) steps per "
             f"run: {', '.join(map(str, steps))}. n/a: the config trains no ITC/ITM head, so it has no "
             "zero-shot retrieval."]
    parts += [markdown_table(rows, metric, title) for metric, title in METRICS]
    if png:
        parts.append(f"![fine-tuned R@1 vs data fraction]({png.name})")
    return "\n\n".join(p for p in parts if p) + "\n"
