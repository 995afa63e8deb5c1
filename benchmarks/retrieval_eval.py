"""Wall time of zero-shot retrieval evaluation (encode, ITC ranking, ITM re-ranking of each query's
top-k in both directions) as the number of images N and k grow.

    python benchmarks/retrieval_eval.py                          # N = 1000, 5000; k = 16, 128, 256
    python benchmarks/retrieval_eval.py --sizes 1000 --ks 16 --full-rerank

Synthetic test splits of N images x 5 captions are generated once under --work. The model is the
preset's architecture with random weights, or a trained model (``--checkpoint``, e.g. the main
job's ``runs/pre/best``). Re-ranking time depends on the weights through the candidate lists. At
N = 1,000 and k = 16 a random model's caption queries crowd onto 89 images (all captions' top 16
together), and its two directions propose 0.5% of their pairs twice; the main job's model spreads
them over the images and proposes 16.5% twice, nearly every image query's pair being a caption
query's too. Only a trained model shows what scoring each distinct pair once saves. Encoding and
ITC ranking are timed over the whole split. ITM re-ranking costs (N + 5N) x k pair forwards, which
is hours on a small CPU at N = 5,000 and k = 256. So by default it is timed on the first --queries
queries of each direction, and the per-query time is multiplied out; each row says which.
``--full-rerank`` times every query. ``--compare-per-pair`` also times, in the same run, the
re-ranking path from before its optimisation (each pair projects its image to fusion keys/values
anew, and the last fusion layer computes every token, not only [CLS]) and prints the ratio.
``--compare-text-per-pair`` times re-ranking with the fusion's first, text-only step (the first
layer's self-attention) run for every pair instead of once per text. ``--compare-gathered-kv``
times it with each pair's image keys/values gathered in the (tokens, 2 x width) layout of the
projection, as before the head-layout gather, so the attention products copied them once more
per pair.

With ``--full-rerank`` the evaluation's own path is timed: both directions' candidate lists are
merged and each distinct (image, text) pair is scored once (with 5 captions per image the image
queries' pairs are nearly all among the caption queries'). ``--compare-directions-apart`` (needs
``--full-rerank``) also times each direction scored apart, as before that merge. Rows multiplied
out from some queries score each direction apart (a few queries share no pairs), so they
overstate the evaluation's re-ranking time by up to a sixth. The pairs/s column counts the
candidate pairs of both lists, (N + 5N) x k, whichever way they are scored.

``--compare-compiled`` also times re-ranking through torch.compile (``eval.compile``, inductor,
dynamic shapes); its compilation happens in the untimed warm-up, whose time is reported, and the
inductor cache under /tmp makes a second run's compilation shorter.

With ``--repeats R`` the variants take turns R times (the order swapped every round) and
each row reports its median round, so a slow spell of a shared machine does not land on one variant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

APART = " (each direction apart)"  # the variant label of --compare-directions-apart
COMPILED = " (compiled, eval.compile)"  # the variant label of --compare-compiled
# each comparison's row label -> what the ratio line says the default is faster than
AGAINST = {" (per pair)": "per pair (image keys per pair, every token in the last layer)",
           " (text self-attention per pair)": "with the text self-attention per pair",
           " (keys/values gathered before the head split)": "with the image keys/values gathered before the head split",
           APART: "with each direction re-ranked apart"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoint", help="a trained model (checkpoint or exported folder) instead of the preset's "
                   "random weights; its preset, image size and tokenizer are used")
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 5000], help="images (5 captions each)")
    p.add_argument("--ks", nargs="+", type=int, default=[16, 128, 256])
    p.add_argument("--queries", type=int, default=100, help="queries per direction timed for re-ranking")
    p.add_argument("--full-rerank", action="store_true", help="time re-ranking of every query")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="runs/retrieval-bench")
    p.add_argument("--compare-per-pair", action="store_true",
                   help="also time re-ranking with each pair's image projected anew, and print the ratio")
    p.add_argument("--repeats", type=int, default=1,
                   help="time each re-ranking this many times, the variants taking turns; report the median")
    p.add_argument("--compare-gathered-kv", action="store_true",
                   help="also time re-ranking with image keys/values gathered per pair before the head split")
    p.add_argument("--compare-text-per-pair", action="store_true",
                   help="also time re-ranking with the first fusion layer's text self-attention run per pair")
    p.add_argument("--compare-directions-apart", action="store_true",
                   help="with --full-rerank: also time each direction re-ranked apart (no pair scored once for both)")
    p.add_argument("--compare-compiled", action="store_true",
                   help="also time re-ranking through torch.compile (eval.compile) and print its ratio")
    p.add_argument("--compile-backend", default="inductor", help="its torch.compile backend (aot_eager: no code "
                   "generation, for a quick check that the script runs)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after the timings, profile one more re-ranking (the default path, each k) with "
                        "torch.profiler and print its ROWS most expensive operators, by name and by shape")
    args = p.parse_args()
    if args.compare_directions_apart and not args.full_rerank:
        p.error("--compare-directions-apart needs --full-rerank (a subset of queries shares almost no pairs)")

    from maskvlm.config import build_config
    from maskvlm.data.formats import RetrievalDataset
    from maskvlm.data.synthetic import ensure_synthetic
    from maskvlm.data.tokenizer import train_wordpiece
    from maskvlm.models.model import build_model, load_pretrained
    from maskvlm.runtime import report_header
    from maskvlm.tasks.pretrain import eval_transform
    from maskvlm.runtime import autocast
    from maskvlm.tasks.retrieval import _rerank, encode_split, itm_scores, recall_metrics, rerank_both_directions
    from step_throughput import gather_kv_before_heads  # this folder is on the path when run as a script

    torch.manual_seed(0)
    device = torch.device(args.device)
    weights = f"weights of {args.checkpoint}" if args.checkpoint else f"preset {args.preset}, random weights"
    lines = [*report_header(args.device, f"{weights}, {args.precision}, batch {args.batch_size}"), "",
             "| images | captions | encode s | ITC rank + recall s | k | ITM re-rank s (both directions) | "
             "re-rank pairs/s | total s | how |", "|---|---|---|---|---|---|---|---|---|"]
    ratios, profiles = [], []
    if args.checkpoint:
        model, cfg, tokenizer = load_pretrained(args.checkpoint, device)
    for n in args.sizes:
        if not args.checkpoint:
            cfg = build_config("maskvlm", args.preset)
        root = ensure_synthetic(Path(args.work) / f"n{n}", 1, 1, n, cfg.model.image_size, 11, progress=True)
        dataset = RetrievalDataset(root / "test.json", None, eval_transform(cfg))
        if not args.checkpoint:
            tokenizer = train_wordpiece(dataset.texts, cfg.data.vocab_size)
            cfg.model.vocab_size = tokenizer.vocab_size
            model = build_model(cfg).to(device).eval()
        with torch.no_grad():
            t = time.perf_counter()
            enc = encode_split(model, dataset, tokenizer, cfg.data.max_text_len, args.batch_size, device,
                               args.precision)
            t_enc = time.perf_counter() - t
            t = time.perf_counter()
            sim = (enc["image_feat"] @ enc["text_feat"].t()).float().cpu()
            recall_metrics(sim, sim.t(), dataset.img2txt, dataset.txt2img)
            t_itc = time.perf_counter() - t

            def shared(a, b):
                return itm_scores(model, enc, a, b, args.batch_size, device, args.precision).cpu()

            def per_pair(a, b):  # every pair projects its own image rows; every token in the last layer
                out = []
                with autocast(device, args.precision):
                    for s in range(0, len(a), args.batch_size):
                        ii, tt = a[s:s + args.batch_size], b[s:s + args.batch_size]
                        fused = model.fuse(enc["text_hidden"][tt], enc["text_mask"][tt], enc["image_hidden"][ii])
                        logits = model.itm_logits(fused).float().cpu()
                        out.append(logits[:, 1] - logits[:, 0])
                return torch.cat(out)

            def compiled(a, b):  # as shared, through torch.compile
                return itm_scores(model, enc, a, b, args.batch_size, device, args.precision,
                                  compile_backend=args.compile_backend).cpu()

            def text_per_pair(a, b):  # as shared, but the text-only first step runs for every pair
                model.text_self_attention = lambda hidden, mask: None
                try:
                    return shared(a, b)
                finally:
                    del model.text_self_attention

            def gathered_kv(a, b):  # as shared, but each pair's keys/values gathered before the head split
                undo = gather_kv_before_heads()
                try:
                    return shared(a, b)
                finally:
                    undo()

            variants = [("", shared)] + ([(" (per pair)", per_pair)] if args.compare_per_pair else []) + (
                [(" (text self-attention per pair)", text_per_pair)] if args.compare_text_per_pair else []) + (
                [(" (keys/values gathered before the head split)", gathered_kv)] if args.compare_gathered_kv else []
            ) + ([(APART, shared)] if args.compare_directions_apart else []) + (
                [(COMPILED, compiled)] if args.compare_compiled else [])

            def directions_apart(sim_part_i, sim_part_t, k, pairs):
                """Seconds for each direction re-ranked on its own, image queries then caption queries."""
                t = time.perf_counter()
                _rerank(sim_part_i, k, pairs)
                t_i = time.perf_counter() - t
                t = time.perf_counter()
                _rerank(sim_part_t, k, lambda txt, img: pairs(img, txt))
                return t_i, time.perf_counter() - t

            def both_directions(k, pairs):
                t = time.perf_counter()
                rerank_both_directions(sim, k, pairs)
                return time.perf_counter() - t, 0.0

            for k in args.ks:
                q_i = len(dataset) if args.full_rerank else min(args.queries, len(dataset))
                q_t = len(dataset.texts) if args.full_rerank else min(args.queries, len(dataset.texts))

                def timed(label, pairs, part_i, part_t):
                    if args.full_rerank and label != APART:
                        return both_directions(k, pairs)
                    return directions_apart(part_i, part_t, k, pairs)

                for label, pairs in variants:  # untimed warm-up: first calls at new shapes are slower
                    t = time.perf_counter()
                    directions_apart(sim[:8], sim.t().contiguous()[:8], k, pairs)
                    if label == COMPILED:
                        ratios.append(f"- N = {len(dataset)}, k = {k}: the compiled variant's warm-up (8 queries "
                                      f"each way, compilation included) took {time.perf_counter() - t:.1f} s")
                timings = {label: [] for label, _ in variants}
                for rep in range(args.repeats):  # the variants take turns, the order swapped each round
                    for label, pairs in (variants if rep % 2 == 0 else variants[::-1]):
                        timings[label].append(timed(label, pairs, sim[:q_i], sim.t().contiguous()[:q_t]))
                times = {}
                for label, _ in variants:
                    t_i, t_t = sorted(timings[label], key=sum)[(len(timings[label]) - 1) // 2]  # the median round
                    total_rerank = t_i / q_i * len(dataset) + t_t / q_t * len(dataset.texts)
                    times[label] = total_rerank
                    rate = (q_i + q_t) * min(k, sim.shape[1]) / (t_i + t_t)
                    how = ("measured, each distinct pair once" if args.full_rerank and label != APART
                           else "measured" if args.full_rerank
                           else f"re-rank from {q_i} + {q_t} queries, multiplied out") + label
                    if args.repeats > 1:
                        how += f", median of {args.repeats}"
                    lines.append(f"| {len(dataset)} | {len(dataset.texts)} | {t_enc:.1f} | {t_itc:.2f} | {k} | "
                                 f"{total_rerank:.0f} | {rate:.0f} | {t_enc + t_itc + total_rerank:.0f} | {how} |")
                    print(lines[-1], file=sys.stderr, flush=True)
                if args.profile:
                    profiles.append(profile_rerank(lambda: timed("", shared, sim[:q_i], sim.t().contiguous()[:q_t]),
                                                   args.profile, f"N = {len(dataset)}, k = {k}"))
                for label in times:
                    if label == COMPILED:
                        ratios.append(f"- N = {len(dataset)}, k = {k}: re-ranking through torch.compile is "
                                      f"{times[''] / times[label]:.2f}x faster than eager (compilation not counted)")
                    elif label:
                        ratios.append(f"- N = {len(dataset)}, k = {k}: re-ranking is {times[label] / times['']:.2f}x "
                                      f"faster than {AGAINST[label]}")
    print("\n".join(lines + ([""] + ratios if ratios else []) + profiles))
    return 0


def profile_rerank(run, rows: int, title: str) -> str:
    """torch.profiler over one call of ``run``: the ``rows`` operators with the most self CPU time,
    by name and by input shapes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    by_name = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"\nProfile of one re-ranking, {title}, by operator:\n{by_name}\nby operator and input shapes:\n{by_shape}"


if __name__ == "__main__":
    sys.exit(main())
