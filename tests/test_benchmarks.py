"""Every benchmark script still runs against the library as it is now, at the smallest sizes.

The benchmarks reach into internals (the re-ranking helpers, the objectives' switches, the
worker protocols), so a change there can break a script that no other test runs. Each case runs
the script as a user would, in a subprocess from the project root, and checks that it exits
cleanly and prints its report; no figure is checked (speed is measured, not asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, timeout: int = 180) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd[1:])} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def test_retrieval_eval_with_every_comparison(tmp_path):
    out = _run("retrieval_eval.py", "--sizes", "12", "--ks", "4", "--full-rerank", "--compare-per-pair",
               "--compare-text-per-pair", "--compare-gathered-kv", "--compare-directions-apart", "--profile", "3",
               "--compare-compiled", "--compile-backend", "aot_eager", "--work", str(tmp_path))
    assert "measured, each distinct pair once" in out and "(each direction apart)" in out
    assert "re-ranking through torch.compile is" in out and "(compiled, eval.compile)" in out
    assert "Profile of one re-ranking, N = 12, k = 4" in out
    assert out.count("re-ranking is") == 4, out


def test_retrieval_eval_with_a_trained_checkpoint_multiplied_out(tmp_path, tokenizer):
    from tests.conftest import save_micro_model

    folder = save_micro_model(tmp_path / "model", tokenizer)
    out = _run("retrieval_eval.py", "--checkpoint", str(folder), "--sizes", "12", "--ks", "4", "--queries", "3",
               "--work", str(tmp_path / "work"))
    assert f"weights of {folder}" in out and "re-rank from 3 + 3 queries, multiplied out" in out


def test_step_throughput_against_flava():
    out = _run("step_throughput.py", "--preset", "tiny", "--dtypes", "bf16", "--batch-size", "2", "--warmup", "1",
               "--repeats", "1", "--peak-size", "256")
    assert "| maskvlm | bf16 |" in out and "| flava | bf16 |" in out and "maskvlm / FLAVA samples/s" in out


def test_host_overhead_against_flava():
    out = _run("host_overhead.py", "--preset", "tiny", "--rounds", "1", "--warmup", "1", "--repeats", "1")
    assert "ATen operators per step" in out and "| flava |" in out


def test_gpu_step_variants_that_patch_the_library_on_cpu():
    variants = ["default", "- shared image keys (per pair)", "- last layer at read tokens only",
                "- head-layout key/value gather"]
    out = _run("gpu_step.py", "--preset", "tiny", "--device", "cpu", "--image-size", "32", "--batch-size", "2",
               "--warmup", "1", "--repeats", "1", "--only", *variants)
    for name in variants:
        assert f"| {name} | 2 | bf16 |" in out, name


def test_gpu_profile_on_cpu():
    out = _run("gpu_profile.py", "--preset", "tiny", "--device", "cpu", "--image-size", "32", "--batch-size", "2",
               "--steps", "1")
    assert "by host time" in out


def _row(report: str, first_cell: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {first_cell} |"))


def test_data_checkpoint_index_and_distributed_benchmarks(tmp_path):
    assert "samples/s" in _run("data_throughput.py", "--presets", "tiny", "--sources", "96", "--workers", "0",
                               "--samples", "16", "--work", str(tmp_path / "data"))
    assert _row(_run("checkpoint_io.py", "--presets", "tiny", "--repeats", "1", "--work", str(tmp_path / "ckpt")),
                "tiny")
    # these two also check their own results: the same index with a decoding worker, the same figures
    # with the evaluation split over two ranks
    index = _run("index_build.py", "--images", "16", "--side", "64", "--workers", "0", "1",
                 "--work", str(tmp_path / "index"))
    assert _row(index, "1").endswith("| the same |"), index
    split = _run("distributed_eval.py", "--images", "12", "--k", "4", "--world", "2", "--work", str(tmp_path / "dist"))
    assert _row(split, "2 (split)").endswith("| the same |"), split


def test_search_benchmark(tmp_path, tokenizer, synthetic_dir):
    from tests.conftest import save_micro_model

    folder = save_micro_model(tmp_path / "model", tokenizer)
    out = _run("search.py", "--checkpoint", str(folder), "--annotations", str(synthetic_dir / "test.json"),
               "--work", str(tmp_path / "work"))
    assert "ITC search" in out and "ITM re-ranked search" in out and "own image in the top 5" in out


def test_small_kernel_benchmarks():
    assert _row(_run("matmul_shapes.py", "--rows", "64", "--square", "128", "--repeats", "1"), "64")
    assert _row(_run("text_merge.py", "--shapes", "base-narrow", "--warmup", "1", "--rounds", "1", "--repeats", "1"),
                "base-narrow")
