"""train.keep_host_memory: glibc keeps freed blocks for the next allocation instead of returning
them to the kernel, so re-allocating a step's activations costs no page faults."""

import resource
import sys

import pytest
import torch

from maskvlm.runtime import keep_freed_host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reallocating_freed_blocks_makes_no_page_faults():
    if not keep_freed_host_memory():
        pytest.skip("not glibc")
    pages = (16 << 20) // resource.getpagesize()
    for _ in range(5):  # a 16 MiB block, touched, then freed (the first rounds may grow the heap)
        torch.empty(4 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(4 << 20).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # returned to the kernel, each round faults all of its pages in again: about 10 x 4096 (33,000
    # measured with glibc's defaults); kept, a few rounds of heap growth at most (0 measured)
    assert faults < 2 * pages, faults


def test_trainer_turns_it_on_for_cpu_runs(tmp_path, synthetic_dir):
    from maskvlm import pipeline
    from tests.conftest import micro_config

    cfg = micro_config(f"data.train={synthetic_dir}/train.json", "data.val=null", "data.test=null",
                       f"train.output_dir={tmp_path}/run", "train.max_steps=1", "train.save_every=0")
    pipeline.pretrain(cfg)
    assert "host allocator keeps freed memory" in (tmp_path / "run" / "train.log").read_text()
