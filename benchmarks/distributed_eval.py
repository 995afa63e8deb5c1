"""Retrieval evaluation split over ranks: wall time of one process against WORLD processes that
each re-rank a 1/WORLD share of the ITM pairs (what ``torchrun ... -m maskvlm evaluate retrieval``
and the evaluations inside a torchrun training job do), in one run, with the figures checked equal.

    python benchmarks/distributed_eval.py                       # tiny, N = 1000 images x 5 captions, k = 16
    python benchmarks/distributed_eval.py --images 200 --k 8    # a quick check
    python benchmarks/distributed_eval.py --device cuda --world 8 --preset base --images 5000 --k 256

Every process gets ``--threads`` CPU threads (default 1), so on a CPU with WORLD x threads cores
the comparison is what it is on WORLD GPUs: the same device per rank, one rank or WORLD of them.
With ``--device cuda`` rank r runs on GPU r over NCCL (WORLD GPUs needed).
Each rank encodes its share of the images and texts and re-ranks its share of the pairs; what is
not split (loading, gathering, ITC ranking and recall, the same on every rank) keeps the speed-up
below WORLD. The model is the preset's architecture with random weights (the time does not depend
on the weights).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _evaluate(folder: str, data: str, k: int, batch_size: int, precision: str, device: str,
              split: bool) -> tuple[dict, float]:
    from maskvlm.data.formats import RetrievalDataset
    from maskvlm.models.model import load_pretrained
    from maskvlm.tasks.pretrain import eval_transform
    from maskvlm.tasks.retrieval import evaluate_retrieval
    from maskvlm.train.distributed import barrier

    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"  # each rank's own GPU (set when it joined the group)
    model, config, tokenizer = load_pretrained(folder, device)
    dataset = RetrievalDataset(data, None, eval_transform(config))
    barrier()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    metrics = evaluate_retrieval(model, tokenizer, dataset, config.data.max_text_len, k, "itm", batch_size,
                                 torch.device(device), precision, split_over_ranks=split)
    return metrics, time.perf_counter() - start


def _rank(rank: int, world: int, port: int, threads: int, args: tuple, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from maskvlm.train.distributed import init_from_env, shutdown

    init_from_env()
    ok = False
    try:
        metrics, seconds = _evaluate(*args, split=True)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"metrics": metrics, "seconds": seconds}, f)
        ok = True
    finally:
        shutdown(ok)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--images", type=int, default=1000, help="images in the split (5 captions each)")
    p.add_argument("--k", type=int, default=16, help="re-ranking depth")
    p.add_argument("--world", type=int, default=2, help="processes of the split run")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: rank r uses GPU r (NCCL), so --world GPUs are needed")
    p.add_argument("--work", default="runs/distributed-eval-bench")
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        print(f"--device cuda --world {args.world} needs {args.world} GPUs; this machine has "
              f"{torch.cuda.device_count()}", file=sys.stderr)
        return 2

    from maskvlm.config import build_config
    from maskvlm.data.formats import PairDataset
    from maskvlm.data.synthetic import ensure_synthetic
    from maskvlm.data.tokenizer import train_wordpiece
    from maskvlm.models.model import build_model
    from maskvlm.runtime import report_header

    cfg = build_config("maskvlm", args.preset)
    work = Path(args.work)
    root = ensure_synthetic(work / f"n{args.images}", 1, 1, args.images, cfg.model.image_size, 11, progress=True)
    data = str(root / "test.json")
    tokenizer = train_wordpiece(PairDataset(data, None, None).captions(), vocab_size=cfg.data.vocab_size)
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    folder = work / f"model-{args.preset}"
    build_model(cfg).save_pretrained(folder, cfg, tokenizer)
    shared = (str(folder), data, args.k, args.batch_size, args.precision, args.device)

    torch.set_num_threads(args.threads)
    one, one_s = _evaluate(*shared, split=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / "rank"
    mp.spawn(_rank, args=(args.world, port, args.threads, shared, str(out)), nprocs=args.world, join=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(args.world)]
    split_s = max(r["seconds"] for r in ranks)
    same = all(abs(r["metrics"][key] - one[key]) < 1e-6 for r in ranks for key in one)
    pairs = (args.images + 5 * args.images) * min(args.k, args.images)
    lines = [*report_header(args.device, f"preset {args.preset}, {args.precision}, batch {args.batch_size}, "
                                         f"{args.threads} thread(s) per process"), "",
             f"{args.images} images x 5 captions, k = {args.k}: {pairs} ITM pairs re-ranked", "",
             "| processes | wall s | speed-up | figures |", "|---|---|---|---|",
             f"| 1 | {one_s:.1f} | 1.00x | mean R@1 {one['r1_mean']:.2f} |",
             f"| {args.world} (split) | {split_s:.1f} | {one_s / split_s:.2f}x | "
             f"{'the same' if same else 'DIFFERENT'} |"]
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
