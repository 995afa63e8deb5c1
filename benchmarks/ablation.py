"""The ablation study at its default setting (under an hour on 2 CPU cores): every recipe and
the MaskVLM loss ablations, pre-trained on 25% and 100% of the synthetic training images with
the same number of steps, two seeds, then zero-shot and fine-tuned retrieval R@1. Writes
runs/ablation/ (runs, results.jsonl), the tables into benchmarks/RESULTS.md and the plot to
benchmarks/ablation.png. Any `maskvlm ablate` option can be added, e.g. bigger settings:

    python benchmarks/ablation.py --fractions 0.1 0.25 0.5 1 --seeds 0 1 2 --pretrain-steps 1000
"""

import sys
from pathlib import Path

from maskvlm.cli import main

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.exit(main(["ablate", "--out", "runs/ablation", "--report", str(here / "RESULTS.md"), "--no-progress",
                   *sys.argv[1:]]))
