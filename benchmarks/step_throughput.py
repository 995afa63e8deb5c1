"""Pre-training step throughput, side by side in one run: maskvlm's default recipe against
Hugging Face ``transformers`` ``FlavaForPreTraining`` (MLM + MIM + MMM + ITM + ITC) at matched
sizes, plus the machine's matrix-product peak in the same dtype.

    python benchmarks/step_throughput.py --preset tiny                 # CPU: fp32 and bf16
    python benchmarks/step_throughput.py --preset small --dtypes bf16
    python benchmarks/step_throughput.py --preset base --device cuda  # on a GPU
    python benchmarks/step_throughput.py --preset tiny --dtypes bf16 --compile  # both libraries compiled
    python benchmarks/step_throughput.py --preset tiny --dtypes bf16 --interleave 6 --repeats 4  # taking turns

Each (library, dtype) runs in its own subprocess, so peak memory is its own: RSS on CPU, the
allocator peak on GPU. A step is forward + backward + AdamW on one batch of random images and
captions of the preset's sizes. Warm-up steps are excluded. The median and the spread (min-max)
of the timed repeats are reported, with samples/s, the ratio maskvlm / FLAVA, model FLOPs per
sample (``torch.utils.flop_counter.FlopCounterMode``, forward + backward), achieved FLOP/s and
model FLOP utilisation = achieved / peak.

Size matching: FLAVA's image encoder gets the preset's ViT (width, depth, heads, MLP width,
image and patch size), its text encoder the text layers, and its multimodal encoder the
cross-modality text layers. FLAVA has no counterpart of maskvlm's image cross-modality encoder
(the MIM decoder), so maskvlm carries those extra layers. FLAVA's MIM predicts codebook tokens,
8,192 classes. Its labels are given directly (random), so the DALL-E codebook's own forward is
not timed, which is in FLAVA's favour. The FLOP counts say how much work each step does. Each
library steps with the AdamW its users get by default: maskvlm's trainer builds the fused one;
FLAVA gets ``torch.optim.AdamW()`` (on a CPU a loop over the parameters, on a GPU ``foreach``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

VOCAB = 1000
TEXT_LEN = 32


def _sizes(preset: str, overrides=()):
    from maskvlm.config import build_config
    return build_config("maskvlm", preset, overrides=[f"model.vocab_size={VOCAB}", *overrides])


def _autocast(device: torch.device, dtype: str):
    import contextlib
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _maskvlm_step(cfg, device, batch_size):
    from maskvlm.data.formats import Batch
    from maskvlm.masking import bert_mask, block_mask
    from maskvlm.models.model import build_model
    from maskvlm.tasks.pretrain import PretrainTask

    m = cfg.model
    g = torch.Generator().manual_seed(0)
    from maskvlm.models.layers import set_activation_checkpointing
    from maskvlm.train.optim import build_optimizer, freeze_parameters

    t = cfg.train
    if t.keep_host_memory and device.type == "cpu":  # as the trainer does
        from maskvlm.runtime import keep_freed_host_memory
        keep_freed_host_memory()
    task = PretrainTask(build_model(cfg), cfg).to(device)
    set_activation_checkpointing(task, t.activation_checkpointing)  # train.compile: see worker()
    if t.freeze:
        freeze_parameters(task.model, t.freeze)
    opt = build_optimizer(task, 1e-4, t.weight_decay, t.betas, fused=t.fused_adamw)  # as the trainer builds it
    grid = (m.image_size // m.patch_size,) * 2
    ids = torch.randint(5, VOCAB, (batch_size, TEXT_LEN), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    attn = torch.ones_like(ids)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False
    mlm_ids, labels = bert_mask(ids, maskable, cfg.masking.text_ratio, 4, torch.arange(5, VOCAB), g)
    batch = Batch(images=torch.randn(batch_size, 3, m.image_size, m.image_size, generator=g), input_ids=ids,
                  attention_mask=attn, image_ids=torch.arange(batch_size), mlm_input_ids=mlm_ids, mlm_labels=labels,
                  image_mask=block_mask(batch_size, grid, cfg.masking.image_ratio, cfg.masking.image_block, g))
    batch = batch.to(device)

    graphs = t.compile and "reduce-overhead" in (t.compile_mode or "") and device.type == "cuda"

    def step(dtype):
        if graphs:  # as the trainer does: a new iteration for the CUDA graphs of the compiled stacks
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss, _ = task(batch)
        loss.backward()
        opt.step()
    return task, step


def _flava_step(cfg, device, batch_size, foreach=None):
    """``foreach``: passed to AdamW (None: torch's default, a per-parameter loop on a CPU)."""
    from transformers import FlavaConfig, FlavaForPreTraining

    m = cfg.model
    image = dict(hidden_size=m.vision_width, num_hidden_layers=m.vision_layers, num_attention_heads=m.vision_heads,
                 intermediate_size=int(m.vision_width * m.vision_mlp_ratio), image_size=m.image_size,
                 patch_size=m.patch_size)
    text = dict(hidden_size=m.text_width, num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
                intermediate_size=m.text_intermediate, vocab_size=VOCAB, max_position_embeddings=max(64, TEXT_LEN))
    multimodal = dict(hidden_size=m.text_width, num_hidden_layers=m.cross_layers, num_attention_heads=m.text_heads,
                      intermediate_size=m.text_intermediate)
    config = FlavaConfig(image_config=image, text_config=text, multimodal_config=multimodal,
                         hidden_size=m.text_width, projection_dim=m.embed_dim, init_codebook=False)
    model = FlavaForPreTraining(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=foreach)
    g = torch.Generator().manual_seed(0)
    n_patches = (m.image_size // m.patch_size) ** 2
    ids = torch.randint(5, VOCAB, (batch_size, TEXT_LEN), generator=g)
    pick = torch.rand(batch_size, TEXT_LEN, generator=g) < cfg.masking.text_ratio
    masked_pos = torch.rand(batch_size, n_patches, generator=g) < cfg.masking.image_ratio
    vocab_mim = config.image_codebook_config.vocab_size
    inputs = dict(input_ids=ids, input_ids_masked=ids.masked_fill(pick, 4), attention_mask=torch.ones_like(ids),
                  pixel_values=torch.randn(batch_size, 3, m.image_size, m.image_size, generator=g),
                  bool_masked_pos=masked_pos,
                  mlm_labels=ids.masked_fill(~pick, -100),
                  mim_labels=torch.randint(0, vocab_mim, (batch_size, n_patches), generator=g).masked_fill(
                      ~masked_pos, -100),
                  itm_labels=torch.randint(0, 2, (batch_size,), generator=g), return_loss=True)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def step(dtype):
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            out = model(**inputs)
        out.loss.backward()
        opt.step()
    return model, step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compile_stacks(lib: str, module: torch.nn.Module, cfg) -> int:
    """torch.compile each encoder stack of either library in place: maskvlm's ViT, text and
    cross-modality stacks as ``train.compile`` does (its backend and mode), FLAVA's image, text and
    multimodal ``FlavaEncoder``s (inductor, default mode; ``--compile``). Heads and losses stay eager
    in both. Returns how many stacks were compiled."""
    if lib == "maskvlm":
        from maskvlm.models.layers import compile_encoders
        return compile_encoders(module, cfg.train.compile_backend, cfg.train.compile_mode)
    stacks = [m for m in module.modules() if type(m).__name__ == "FlavaEncoder"]
    for m in stacks:
        m.compile()
    return len(stacks)


def worker(lib: str, preset: str, dtype: str, device_name: str, batch_size: int, warmup: int, repeats: int,
           overrides=(), compile_both: bool = False, serve: bool = False) -> dict:
    """One library's timed steps. ``serve``: after the warm-up, time steps on request from the
    parent (``--interleave``: lines "STEPS n" on stdin, each answered with a "TIMES [...]" line on
    stdout, until "DONE"), so that two libraries' workers can take turns on the machine."""
    import resource

    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    device = torch.device(device_name)
    if "bench.per_pair_image_keys=true" in overrides:  # the fusion path before shared image keys
        _project_images_per_pair()
    if "bench.full_last_layer=true" in overrides:  # the last fusion layers computed at every token
        _full_last_layer()
    if "bench.bf16_layer_norm=true" in overrides:  # a tried change: LayerNorm outputs in bf16 under autocast
        _bf16_layer_norm()
    if "bench.gathered_kv=true" in overrides:  # image keys/values gathered per pair before the head split
        gather_kv_before_heads()
    cfg = _sizes(preset, [o for o in overrides if not o.startswith("bench.")])
    b = batch_size or cfg.train.batch_size
    module, step = (_maskvlm_step if lib == "maskvlm" else _flava_step)(cfg, device, b)
    params = sum(p.numel() for p in module.parameters())
    with FlopCounterMode(display=False) as counter:
        step(dtype)
    flops = counter.get_total_flops()
    # Compiled after the FLOP count: a first call under FlopCounterMode (a dispatch mode) makes
    # torch.compile skip the stacks for good, and the "compiled" run would time eager code.
    if compile_both or (lib == "maskvlm" and cfg.train.compile):
        compile_stacks(lib, module, cfg)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(dtype)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rounds = []
    if serve:
        print("READY", flush=True)
        for line in sys.stdin:
            if line.startswith("STEPS "):
                step(dtype)  # untimed: the first step after a pause runs on cold caches and idle threads
                rounds.append(time_steps(step, dtype, device, int(line.split()[1])))
                print("TIMES " + json.dumps(rounds[-1]), flush=True)
            else:  # DONE, or the parent went away
                break
        times = [t for r in rounds for t in r]
    else:
        times = time_steps(step, dtype, device, repeats)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"lib": lib, "dtype": dtype, "batch": b, "params": params, "flops_per_step": flops, "times": times,
            "peak_bytes": peak, "memory": "allocator peak" if device.type == "cuda" else "peak RSS",
            "warmup_s": warmup_s, "rounds": rounds}


def time_steps(step, dtype: str, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step(dtype)``, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        step(dtype)
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def run_result(cmd: list[str]) -> dict:
    """Run a benchmark worker subprocess and return the JSON of its ``RESULT`` line; RuntimeError
    with the end of its stderr when it fails."""
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        print(out.stderr[-3000:], file=sys.stderr)
        raise RuntimeError((out.stderr.strip().splitlines() or ["no result"])[-1][:160])
    return json.loads(line[0][7:])


def _project_images_per_pair() -> None:
    """Put back, for comparison, the fusion path that projects each (text, image) pair's image anew:
    ITM gathers 3B image rows and MLM its B, each projected to fusion keys/values on its own."""
    from maskvlm.objectives.base import StepState

    def fuse_with_images(self, text_hidden, text_mask, image_index, extra_images=None, output_positions=None):
        images = self.image.hidden if extra_images is None else torch.cat([self.image.hidden, extra_images])
        if image_index is not None:
            images = images.index_select(0, image_index)
        return self.model.fuse(text_hidden, text_mask, images, output_positions=output_positions)
    StepState.fuse_with_images = fuse_with_images


def _full_last_layer() -> None:
    """Put back, for comparison, last fusion layers that compute every token, of which the losses
    then read [CLS] (ITM) or the masked patches (MIM)."""
    from maskvlm.models.layers import take_positions
    from maskvlm.models.model import MaskVLM

    def full_then_take(method):
        def wrapped(self, *args, output_positions=None, **kwargs):
            out = method(self, *args, **kwargs)
            return out if output_positions is None else take_positions(out, output_positions)
        return wrapped
    MaskVLM.fuse = full_then_take(MaskVLM.fuse)
    MaskVLM.fuse_image = full_then_take(MaskVLM.fuse_image)


def gather_kv_before_heads():
    """Put back, for comparison, the indexed cross-attention that gathers each row's image keys/values
    in the projection's (tokens, 2 x width) layout, so the attention products copy them once more
    per row into the head layout. Returns a function that undoes it."""
    from maskvlm.models.layers import Attention

    forward = Attention.forward

    def gather_first(self, x, context=None, key_mask=None, kv=None, context_index=None, query=None):
        if self.is_cross and context_index is not None:
            kv = (self.kv(context) if kv is None else kv).index_select(0, context_index)
        return forward(self, x, context=context, key_mask=key_mask, kv=kv, query=query)
    Attention.forward = gather_first
    return lambda: setattr(Attention, "forward", forward)


def _bf16_layer_norm() -> None:
    """A tried change, not adopted: under autocast every LayerNorm returns bf16 instead of fp32, so
    the linear layer after it needs no cast, and the post-norm (BERT) layers' residual stream is
    bf16 end to end. The normalisation itself still accumulates in fp32 inside the kernel."""
    import torch.nn.functional as F

    full = torch.nn.LayerNorm.forward

    def forward(self, x):
        if not torch.is_autocast_enabled(x.device.type):
            return full(self, x)
        bf16 = torch.bfloat16
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(bf16), self.normalized_shape, self.weight.to(bf16), self.bias.to(bf16),
                                self.eps)
    torch.nn.LayerNorm.forward = forward


def run_worker(lib: str, dtype: str, preset: str, device: str, batch_size: int, warmup: int, repeats: int,
               overrides=(), compile_both: bool = False) -> dict:
    """:func:`worker` in a fresh subprocess (so its peak memory is its own); RuntimeError with the
    end of its stderr when it fails."""
    return run_result(_worker_cmd(lib, dtype, preset, device, batch_size, warmup, overrides, compile_both,
                                  "--repeats", str(repeats)))


def _worker_cmd(lib: str, dtype: str, preset: str, device: str, batch_size: int, warmup: int, overrides,
                compile_both: bool, *extra: str) -> list[str]:
    """The command line of a :func:`worker` subprocess."""
    return [sys.executable, os.path.abspath(__file__), "--worker", lib, dtype, "--preset", preset, "--device", device,
            "--batch-size", str(batch_size), "--warmup", str(warmup), *[f"--override={o}" for o in overrides],
            *(["--compile"] if compile_both else []), *extra]


def run_interleaved(libs: list[str], dtype: str, preset: str, device: str, batch_size: int, warmup: int,
                    rounds: int, steps: int, overrides=(), compile_both: bool = False) -> list[dict]:
    """The libraries' workers side by side: each is started, builds its model and warms up, then
    they take turns, ``steps`` timed steps each per round for ``rounds`` rounds, the order swapped
    every round (A B, B A, ...), each turn after one untimed step. A slow spell of a shared machine
    then lands on both libraries instead of on whichever ran during it. Each result carries its
    per-round times."""
    import tempfile

    procs = {}
    try:
        for lib in libs:
            cmd = _worker_cmd(lib, dtype, preset, device, batch_size, warmup, overrides, compile_both, "--serve")
            err = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                    env={**os.environ, "PYTHONWARNINGS": "ignore"})
            procs[lib] = (proc, err)
            _expect(lib, procs[lib], "READY")  # one warms up at a time
        for r in range(rounds):
            for lib in (libs if r % 2 == 0 else libs[::-1]):
                proc, _ = procs[lib]
                proc.stdin.write(f"STEPS {steps}\n")
                proc.stdin.flush()
                _expect(lib, procs[lib], "TIMES ")
        results = []
        for lib in libs:
            proc, _ = procs[lib]
            proc.stdin.write("DONE\n")
            proc.stdin.flush()
            results.append(json.loads(_expect(lib, procs[lib], "RESULT ")))
        return results
    finally:
        for proc, err in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            err.close()


def _expect(lib: str, proc_err, prefix: str) -> str:
    """The rest of the worker's next stdout line that starts with ``prefix``; RuntimeError with the
    end of its stderr when it exits first."""
    proc, err = proc_err
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix):]
    proc.wait()
    err.seek(0)
    tail = err.read()[-3000:]
    print(tail, file=sys.stderr)
    raise RuntimeError(f"{lib}: " + ((tail.strip().splitlines() or ["worker exited"])[-1][:160]))


def matmul_peak(dtype: str, device: torch.device, n: int = 0, repeats: int = 8) -> float:
    """FLOP/s of an n x n matrix product in ``dtype`` (the best of ``repeats``). Measured before and
    after each dtype's runs and the higher one kept: on shared or throttling machines one
    measurement can come out low. On a GPU, n = 8192 and each timing covers 10 back-to-back
    products, so the launch and the host clock are a negligible part of it."""
    n = n or (8192 if device.type == "cuda" else 4096)
    per = 10 if device.type == "cuda" else 1
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    best = float("inf")
    for i in range(repeats + 2):
        _sync(device)
        t = time.perf_counter()
        for _ in range(per):
            a @ b
        _sync(device)
        if i >= 2:
            best = min(best, (time.perf_counter() - t) / per)
    return 2 * n ** 3 / best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny, small (CPU) or base (GPU)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=0, help="default: the preset's train.batch_size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--libs", nargs="+", default=["maskvlm", "flava"], choices=["maskvlm", "flava"])
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="maskvlm config override for its runs, e.g. train.activation_checkpointing=true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder stacks of both libraries (after the FLOP count); the "
                        "warm-up steps, which include the compilation, are timed and reported")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="run the libraries' workers side by side and alternate them: ROUNDS rounds of --repeats "
                        "timed steps each, the order swapped every round; adds the ratio per round (median, "
                        "min-max), which a drifting shared machine moves less")
    p.add_argument("--peak-size", type=int, default=0, metavar="N",
                   help="side of the square product that measures the matmul peak (default 4096 on CPU, 8192 on "
                        "GPU; a small N gives a quick, low peak, e.g. for a smoke test)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("LIB", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.preset, args.worker[1], args.device,
                                            args.batch_size, args.warmup, args.repeats, args.override, args.compile,
                                            args.serve)))
        return 0
    from maskvlm.runtime import report_header

    device = torch.device(args.device)
    rows = []
    for dtype in args.dtypes:
        peak = matmul_peak(dtype, device, args.peak_size)
        block = []
        if args.interleave:
            print(f"running {' and '.join(args.libs)} {dtype}, interleaved ...", file=sys.stderr, flush=True)
            try:
                block = run_interleaved(args.libs, dtype, args.preset, args.device, args.batch_size, args.warmup,
                                        args.interleave, args.repeats, args.override, args.compile)
            except RuntimeError as e:
                rows.append({"lib": "both", "dtype": dtype, "error": str(e)[:120]})
        for lib in [] if args.interleave else args.libs:
            print(f"running {lib} {dtype} ...", file=sys.stderr, flush=True)
            try:
                block.append(run_worker(lib, dtype, args.preset, args.device, args.batch_size, args.warmup,
                                        args.repeats, args.override, args.compile))
            except RuntimeError as e:  # e.g. out of memory: reported in the table, the other runs go on
                rows.append({"lib": lib, "dtype": dtype, "error": str(e)[:120]})
        peak = max(peak, matmul_peak(dtype, device, args.peak_size))
        for r in block:
            med = statistics.median(r["times"])
            r.update(peak=peak, median_s=med, samples_per_s=r["batch"] / med,
                     flops_per_sample=r["flops_per_step"] / r["batch"], achieved=r["flops_per_step"] / med)
            r["mfu"] = r["achieved"] / peak
            rows.append(r)
    batch = next((r["batch"] for r in rows if "batch" in r), args.batch_size)
    lines = [*report_header(args.device, f"preset {args.preset}, batch {batch}, {args.warmup} warm-up "
                            + (f"steps, {args.interleave} rounds of {args.repeats} timed steps per library, "
                               "the libraries taking turns (median, min-max over all)" if args.interleave else
                               f"steps, {args.repeats} timed steps (median, min-max)")
                            + ("; encoder stacks of both libraries compiled (torch.compile, inductor)"
                               if args.compile else "")), "",
             "| library | dtype | params | step s (median, min-max) | samples/s | GFLOP/sample (fwd+bwd) | "
             "achieved GFLOP/s | matmul peak GFLOP/s | MFU | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['lib']} | {r['dtype']} | | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['lib']} | {r['dtype']} | {r['params'] / 1e6:.1f}M | {r['median_s']:.3f} "
                     f"({min(r['times']):.3f}-{max(r['times']):.3f}) | {r['samples_per_s']:.1f} | "
                     f"{r['flops_per_sample'] / 1e9:.2f} | {r['achieved'] / 1e9:.1f} | {r['peak'] / 1e9:.0f} | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_bytes'] / 2 ** 20:.0f} MiB ({r['memory']}) |")
    lines.append("")
    for dtype in args.dtypes:
        by = {r["lib"]: r for r in rows if r["dtype"] == dtype and "error" not in r}
        if len(by) == 2:
            a, f = by["maskvlm"], by["flava"]
            lines.append(f"- {dtype}: maskvlm / FLAVA samples/s = {a['samples_per_s'] / f['samples_per_s']:.2f}x; "
                         f"achieved FLOP/s = {a['achieved'] / f['achieved']:.2f}x; FLOPs per sample = "
                         f"{a['flops_per_sample'] / f['flops_per_sample']:.2f}x; peak memory = "
                         f"{a['peak_bytes'] / f['peak_bytes']:.2f}x")
            if a.get("rounds") and f.get("rounds"):
                per_round = sorted(statistics.median(y) / statistics.median(x)
                                   for x, y in zip(a["rounds"], f["rounds"]))
                lines.append(f"- {dtype}: maskvlm / FLAVA samples/s per round ({len(per_round)} rounds of "
                             f"{args.repeats} steps, taking turns): median {statistics.median(per_round):.2f}x "
                             f"({per_round[0]:.2f}-{per_round[-1]:.2f}x)")
            if args.compile:
                lines.append(f"- {dtype}: the {args.warmup} warm-up steps, compilation included, took "
                             f"{a['warmup_s']:.1f} s (maskvlm) and {f['warmup_s']:.1f} s (FLAVA)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
