"""Two CPU processes (gloo): the ITC loss over negatives gathered from every rank, with gradients
averaged as DDP does, equals the single-process loss and gradient on the concatenated batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maskvlm.objectives.itc import itc_loss
from maskvlm.train.distributed import all_gather_no_grad, all_gather_with_grad

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


def _loss(img_proj, txt_proj, temp, x_img, x_txt, ids, gather: bool):
    fi = torch.nn.functional.normalize(img_proj(x_img), dim=-1)
    ft = torch.nn.functional.normalize(txt_proj(x_txt), dim=-1)
    if not gather:
        return itc_loss(fi, ft, ids, temp)[0]
    return itc_loss(fi, ft, ids, temp, all_gather_with_grad(fi), all_gather_with_grad(ft), all_gather_no_grad(ids))[0]


def _params(img_proj, txt_proj, temp):
    return [*img_proj.parameters(), *txt_proj.parameters(), temp]


def _worker(rank: int, init_file: str, out_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x_img, x_txt, ids, img_proj, txt_proj, temp = _setup()
        part = slice(rank * B, (rank + 1) * B)
        loss = _loss(img_proj, txt_proj, temp, x_img[part], x_txt[part], ids[part], gather=True)
        loss.backward()
        grads = []
        for p in _params(img_proj, txt_proj, temp):  # what DDP does: average the gradients over ranks
            dist.all_reduce(p.grad)
            grads.append(p.grad / WORLD)
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"loss": total / WORLD, "grads": grads}, out_file)
    finally:
        dist.destroy_process_group()


def test_gathered_itc_loss_and_gradients_equal_the_single_process_computation(tmp_path):
    out = tmp_path / "result.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    x_img, x_txt, ids, img_proj, txt_proj, temp = _setup()
    loss = _loss(img_proj, txt_proj, temp, x_img, x_txt, ids, gather=False)
    loss.backward()
    got = torch.load(out, weights_only=True)
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
    for mine, theirs in zip(_params(img_proj, txt_proj, temp), got["grads"]):
        assert torch.allclose(mine.grad, theirs, atol=1e-5), (mine.grad - theirs).abs().max()
