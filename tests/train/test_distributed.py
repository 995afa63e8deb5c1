"""Two CPU processes (gloo): the ITC loss over negatives gathered from every rank, with gradients
averaged as DDP does, equals the single-process loss and gradient on the concatenated batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maskvlm.objectives.itc import itc_loss, sigmoid_itc_loss
from maskvlm.train.distributed import all_gather_no_grad, all_gather_with_grad, shutdown
from tests.conftest import free_ports, torchrun_env

B, D, E, WORLD = 4, 12, 8, 2


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_img = torch.randn(WORLD * B, D, generator=g)
    x_txt = torch.randn(WORLD * B, D, generator=g)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5])  # captions sharing an image are positives, across ranks too
    torch.manual_seed(seed)
    img_proj, txt_proj = torch.nn.Linear(D, E), torch.nn.Linear(D, E)
    temp = torch.nn.Parameter(torch.tensor(0.07))
    return x_img, x_txt, ids, img_proj, txt_proj, temp


def _loss(img_proj, txt_proj, temp, x_img, x_txt, ids, gather: bool, kind: str = "softmax"):
    fi = torch.nn.functional.normalize(img_proj(x_img), dim=-1)
    ft = torch.nn.functional.normalize(txt_proj(x_txt), dim=-1)
    if kind == "sigmoid":  # the bias is the temperature's stand-in here: any learnable scalar
        pool = (all_gather_with_grad(ft), all_gather_no_grad(ids)) if gather else (None, None)
        return sigmoid_itc_loss(fi, ft, ids, temp, -10 * temp, *pool)[0]
    if not gather:
        return itc_loss(fi, ft, ids, temp)[0]
    return itc_loss(fi, ft, ids, temp, all_gather_with_grad(fi), all_gather_with_grad(ft), all_gather_no_grad(ids))[0]


def _params(img_proj, txt_proj, temp):
    return [*img_proj.parameters(), *txt_proj.parameters(), temp]


def _worker(rank: int, init_file: str, out_file: str, kind: str = "softmax"):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    ok = False
    try:
        x_img, x_txt, ids, img_proj, txt_proj, temp = _setup()
        part = slice(rank * B, (rank + 1) * B)
        loss = _loss(img_proj, txt_proj, temp, x_img[part], x_txt[part], ids[part], gather=True, kind=kind)
        loss.backward()
        grads = []
        for p in _params(img_proj, txt_proj, temp):  # what DDP does: average the gradients over ranks
            dist.all_reduce(p.grad)
            grads.append(p.grad / WORLD)
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"loss": total / WORLD, "grads": grads}, out_file)
        ok = True
    finally:
        shutdown(ok)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_gathered_itc_loss_and_gradients_equal_the_single_process_computation(tmp_path, kind):
    out = tmp_path / "result.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out), kind), nprocs=WORLD, join=True)
    x_img, x_txt, ids, img_proj, txt_proj, temp = _setup()
    loss = _loss(img_proj, txt_proj, temp, x_img, x_txt, ids, gather=False, kind=kind)
    loss.backward()
    got = torch.load(out, weights_only=True)
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
    for mine, theirs in zip(_params(img_proj, txt_proj, temp), got["grads"]):
        assert torch.allclose(mine.grad, theirs, atol=1e-5), (mine.grad - theirs).abs().max()


@pytest.mark.parametrize("extra", [(), ("train.grad_accum=2",)], ids=["plain", "grad_accum"])
def test_two_process_pretraining_gives_the_same_weights_on_both_ranks(synthetic_dir, tmp_path, extra):
    # with accumulation the gradients are reduced only on the last micro-batch (no_sync before it)
    from safetensors.torch import load_file

    port, = free_ports()
    mp.spawn(_spawned_pretrain, args=(port, str(synthetic_dir), str(tmp_path), extra), nprocs=WORLD, join=True)
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000004"]  # written once, by rank 0
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    saved = load_file(str(ckpts[0] / "model.safetensors"))
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved if k in ranks[0])


def _last_weights(out) -> dict:
    """The weights of the last checkpoint a pre-training run under ``out`` wrote."""
    from safetensors.torch import load_file

    return load_file(str(sorted((out / "run" / "checkpoints").iterdir())[-1] / "model.safetensors"))


def _spawned_pretrain_runs(rank: int, synthetic_dir: str, runs: list, recipe: str = "maskvlm"):
    """Several pre-training jobs one after the other in the same two processes, each with its own
    process group: ``runs`` holds (port, out, extra, resume). Starting two Python processes that
    import torch costs about 2.5 s, more than one of these 4-step jobs."""
    for port, out, extra, resume in runs:
        _spawned_pretrain(rank, port, synthetic_dir, out, extra, resume, recipe)


def _spawned_pretrain(rank: int, port: int, synthetic_dir: str, out: str, extra: tuple = (), resume=None,
                      recipe: str = "maskvlm"):
    """Each rank trains, then writes its own final weights so the test can compare them."""
    from safetensors.torch import save_file

    torchrun_env(rank, WORLD, port)
    import maskvlm.pipeline as pipeline
    from maskvlm.models.io import unique_state_dict
    from tests.conftest import micro_config

    captured = {}
    real_trainer = pipeline.Trainer

    class Recording(real_trainer):
        def fit(self):
            out = super().fit()
            if self.fsdp is None:  # sharded tensors: the test reads the gathered checkpoint instead
                captured["state"] = {k: v.detach().clone().contiguous()
                                     for k, v in unique_state_dict(self.task).items()}
            return out
    pipeline.Trainer = Recording
    cfg = micro_config(f"data.train={synthetic_dir}/train.json", "data.val=null", "data.test=null",
                       f"train.output_dir={out}/run", "train.precision=fp32", "train.max_steps=4",
                       "train.save_every=0", "data.vocab_size=200", *extra, recipe=recipe)
    ok = False
    try:
        pipeline.pretrain(cfg, resume=resume)
        if "state" in captured:
            save_file(captured["state"], f"{out}/rank{rank}.safetensors")
        ok = True
    finally:
        pipeline.Trainer = real_trainer
        shutdown(ok)  # as the CLI ends a job


def test_epoch_sampler_splits_an_epoch_across_ranks_exactly_once():
    from maskvlm.data.formats import EpochSampler

    for size, world in ((10, 2), (11, 2), (12, 3)):
        parts = [list(EpochSampler(size, seed=5, epoch=1, rank=r, world=world)) for r in range(world)]
        seen = [i for part in parts for _, i in part]
        assert len(seen) == len(set(seen)) == size // world * world  # no duplicates, at most world - 1 left out
        assert all(len(p) == size // world for p in parts)
        resumed = list(EpochSampler(size, seed=5, epoch=1, rank=1, world=world, start=2))
        assert resumed == parts[1][2:]


def _itm_loss_and_grads(model, batch, neg, global_negatives):
    """ITM with the hard negatives fixed to ``neg`` (indices into the candidates) instead of sampled."""
    import maskvlm.objectives.itm as itm_module
    from maskvlm.objectives.base import StepState

    real = itm_module.sample_hard_negatives
    itm_module.sample_hard_negatives = lambda sim, ids, *a: (neg, neg, torch.ones(len(ids), dtype=torch.bool))
    try:
        loss = itm_module.ITM(global_negatives)(StepState(model, batch)).loss
    finally:
        itm_module.sample_hard_negatives = real
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _itm_worker(rank: int, init_file: str, data_file: str, out_file: str):
    from maskvlm.data.formats import Batch
    from maskvlm.models.model import build_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    ok = False
    try:
        data = torch.load(data_file, weights_only=False)
        torch.manual_seed(0)
        model = build_model(data["config"])
        half = len(data["image_ids"]) // WORLD
        part = slice(rank * half, (rank + 1) * half)
        mask = data["attention_mask"][part]
        length = int(mask.sum(1).max())  # each rank pads its captions to its own longest, as the collator does
        batch = Batch(images=data["images"][part], input_ids=data["input_ids"][part, :length],
                      attention_mask=mask[:, :length], image_ids=data["image_ids"][part])
        neg = (torch.arange(half) + rank * half + half) % (2 * half)  # always a pair from the other rank
        loss, grads = _itm_loss_and_grads(model, batch, neg, global_negatives=True)
        for g in grads.values():  # what DDP does
            dist.all_reduce(g)
            g /= WORLD
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / WORLD, "grads": grads}, out_file)
        ok = True
    finally:
        shutdown(ok)


def test_itm_negatives_from_the_gathered_batch_match_the_single_process_computation(config, batch, tmp_path):
    from maskvlm.models.model import build_model

    config.model.hidden_dropout = 0.0
    b = len(batch)
    batch.image_ids = torch.arange(b)  # every pair its own image: all negatives valid
    torch.save({"config": config, "images": batch.images, "input_ids": batch.input_ids,
                "attention_mask": batch.attention_mask, "image_ids": batch.image_ids}, tmp_path / "data.pt")
    mp.spawn(_itm_worker, args=(str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path / "out.pt")),
             nprocs=WORLD, join=True)
    torch.manual_seed(0)
    model = build_model(config)
    loss, grads = _itm_loss_and_grads(model, batch, (torch.arange(b) + b // 2) % b, global_negatives=False)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.allclose(got["loss"], loss, atol=1e-5), (got["loss"], loss)
    assert got["grads"].keys() == grads.keys()
    for name, g in grads.items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5), (name, (got["grads"][name] - g).abs().max())


@pytest.mark.parametrize("recipe", ["maskvlm", "albef", "mamo", "semmim", "mlim"])
def test_fsdp_trains_like_ddp_and_resumes(synthetic_dir, tmp_path, recipe):
    """train.fsdp: the same weights as DDP after 4 steps (fp32, to rounding), checkpoints in the
    unsharded format, and a resume from step 2 that ends where the uninterrupted run ended."""
    fsdp_run = tmp_path / "fsdp"
    ports = free_ports(3)
    runs = [(ports[0], str(tmp_path / "ddp"), (), None),
            (ports[1], str(fsdp_run), ("train.fsdp=true", "train.save_every=2", "train.keep_last=3"), None),
            (ports[2], str(tmp_path / "resumed"), ("train.fsdp=true", "train.save_every=2"),
             str(fsdp_run / "run" / "checkpoints" / "step-00000002"))]
    mp.spawn(_spawned_pretrain_runs, args=(str(synthetic_dir), runs, recipe), nprocs=WORLD, join=True)
    ddp, fsdp, resumed = (_last_weights(out) for out in (tmp_path / "ddp", fsdp_run, tmp_path / "resumed"))
    assert fsdp.keys() == ddp.keys()
    # reduce-scatter and all-reduce sum in another order; AdamW turns rounding-level gradient differences
    # on near-zero gradients into up to lr-sized steps, so: tiny typical difference, small worst case
    diffs = sorted((fsdp[k] - ddp[k]).abs().max().item() for k in ddp)
    assert diffs[len(diffs) // 2] < 1e-7 and diffs[-1] < 1e-4, (diffs[len(diffs) // 2], diffs[-1])
    assert "FSDP: parameters" in (tmp_path / "fsdp" / "run" / "train.log").read_text()
    for k in fsdp:
        assert torch.allclose(resumed[k], fsdp[k], atol=1e-6), (k, (resumed[k] - fsdp[k]).abs().max())


@pytest.mark.parametrize("switch", ["train.grad_accum=2", "train.activation_checkpointing=true"])
def test_fsdp_with_a_switch_trains_like_ddp_with_it(synthetic_dir, tmp_path, switch):
    """FSDP gives DDP's weights with gradient accumulation (gradient sync only on the last
    micro-batch) and with activation checkpointing (recomputed blocks that are also shard units)."""
    ports = free_ports(2)
    runs = [(ports[0], str(tmp_path / "ddp"), (switch,), None),
            (ports[1], str(tmp_path / "fsdp"), (switch, "train.fsdp=true"), None)]
    mp.spawn(_spawned_pretrain_runs, args=(str(synthetic_dir), runs), nprocs=WORLD, join=True)
    ddp, fsdp = _last_weights(tmp_path / "ddp"), _last_weights(tmp_path / "fsdp")
    diffs = sorted((fsdp[k] - ddp[k]).abs().max().item() for k in ddp)
    assert diffs[len(diffs) // 2] < 1e-7 and diffs[-1] < 1e-4, (diffs[len(diffs) // 2], diffs[-1])


def test_shutdown_leaves_the_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        dist.all_reduce(torch.ones(3))
        shutdown()
        assert not dist.is_initialized()
        shutdown()  # a second call (or one without a group) does nothing
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _leave_worker(rank: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    dist.all_reduce(torch.ones(2))
    shutdown(clean=rank == 0)  # rank 1 ended with an error: it leaves without meeting the others
    assert not dist.is_initialized()


def test_shutdown_does_not_wait_for_a_rank_that_left_after_an_error(tmp_path):
    mp.spawn(_leave_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)  # no hang, no raise


def _spawned_finetune(rank: int, port: int, init: str, data: str, out: str, world: int, batch: int):
    """VQA fine-tuning from ``init`` under a process group of ``world`` ranks (world 1: no group)."""
    if world > 1:
        torchrun_env(rank, world, port)
    from maskvlm.finetune import build_finetune_config, finetune

    cfg = build_finetune_config("vqa", init, overrides=[
        f"data.train={data}/v2_OpenEnded_mscoco_train2014_questions.json", "data.val=null",
        f"data.test={data}/v2_OpenEnded_mscoco_test2014_questions.json", f"train.output_dir={out}",
        "train.precision=fp32", "train.max_steps=3", "train.save_every=0", f"train.batch_size={batch}",
        "train.progress=false", "train.tensorboard=false", "data.num_workers=0", "data.max_text_len=24",
        "train.warmup_steps=1"])
    ok = False
    try:
        finetune(cfg)
        ok = True
    finally:
        shutdown(ok)


def test_two_process_fine_tuning_equals_one_process_with_the_whole_batch(tokenizer, tmp_path):
    """torchrun -m maskvlm finetune: the ranks split each batch (DDP) and each evaluation, rank 0
    alone writes the checkpoint and the results. Two ranks of 4 give the weights one process gets from batches of 8
    (the fine-tuning used to ignore torchrun: each rank trained alone and they raced on the files)."""
    from safetensors.torch import load_file

    from maskvlm.data.synthetic_tasks import generate_task
    from tests.conftest import save_micro_model

    init = save_micro_model(tmp_path / "init", tokenizer, "train.precision=fp32")
    data = generate_task("vqa", tmp_path / "vqa", {"train": 12, "val": 2, "test": 4}, image_size=32, seed=0,
                         progress=False)
    port, = free_ports()
    mp.spawn(_spawned_finetune, args=(port, str(init), str(data), str(tmp_path / "two"), WORLD, 4), nprocs=WORLD,
             join=True)
    _spawned_finetune(0, 0, str(init), str(data), str(tmp_path / "one"), 1, 8)
    assert [c.name for c in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-00000003"]
    assert (tmp_path / "two" / "results.json").is_file() and (tmp_path / "two" / "predictions_test.json").is_file()
    two = load_file(str(tmp_path / "two/checkpoints/step-00000003/model.safetensors"))
    one = load_file(str(tmp_path / "one/checkpoints/step-00000003/model.safetensors"))
    assert two.keys() == one.keys()
    # 5e-5: attention key biases have a zero true gradient, and Adam scales its rounding noise up to ~1e-5
    bad = {k: float((two[k] - one[k]).abs().max()) for k in one if not torch.allclose(two[k], one[k], atol=5e-5)}
    assert not bad, bad


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_process_pretraining_evaluates_on_every_rank(synthetic_dir, tmp_path, sharding):
    """Val evaluations during and after training and the test evaluation run on both ranks (each
    re-ranks half of the pairs); rank 0 records them, keeps the best weights and, with
    eval.test_on=best, every rank loads them before the test."""
    import json
    port, = free_ports()
    extra = (f"data.val={synthetic_dir}/val.json", f"data.test={synthetic_dir}/test.json", "eval.every_steps=2",
             *(("train.fsdp=true",) if sharding == "fsdp" else ("eval.test_on=best",)))
    mp.spawn(_spawned_pretrain, args=(port, str(synthetic_dir), str(tmp_path), extra), nprocs=WORLD, join=True)
    run = tmp_path / "run"
    vals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("split") == "val"]
    assert [v["step"] for v in vals] == [2, 4]  # the periodic one and the final weights', each once
    results = json.loads((run / "results.json").read_text())
    assert "txt_r1" in results["test"] and results["best"]["step"] in (2, 4)
    assert (run / "best" / "best.json").is_file()


def test_ddp_without_unused_parameter_search_names_the_setting_for_a_recipe_that_needs_it(synthetic_dir, tmp_path):
    """ALBEF keeps an image cross-modality encoder no objective trains: DDP's own error named its constructor
    argument, not train.ddp_find_unused; step 1's checkpoint is kept, as for any failed step."""
    port, = free_ports()
    with pytest.raises(mp.ProcessRaisedException, match=r"step 2: DDP found parameters no objective of this run "
                       r"trains \(recipe albef .* --resume auto train.ddp_find_unused=true"):
        mp.spawn(_spawned_pretrain, args=(port, str(synthetic_dir), str(tmp_path), ("train.ddp_find_unused=false",),
                                          None, "albef"), nprocs=WORLD, join=True)
    assert [c.name for c in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000001"]
