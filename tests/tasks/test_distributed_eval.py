"""Evaluation split over torchrun's ranks: each rank scores a share of the ITM re-ranking pairs (or
of the classification examples) and every rank gets the whole result, equal to one process's."""

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import maskvlm.train.distributed as distributed
from tests.conftest import free_ports, torchrun_env

WORLD = 2


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 8, 9])
def test_rank_shares_cover_every_item_once_with_equal_lengths(monkeypatch, n, world):
    shares = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        shares.append(distributed.rank_share(n))
    assert len({len(indices) for indices in shares}) == 1  # the same number of batches on every rank
    size = len(shares[0])  # each rank owns a contiguous run of this length, the last ones shorter
    own = [i for r, indices in enumerate(shares) for i in indices[:min(n, (r + 1) * size) - min(n, r * size)].tolist()]
    assert own == list(range(n))  # in item order: gather_shares keeps the first n rows
    assert all(0 <= i < max(n, 1) for indices in shares for i in indices.tolist())
    padded = torch.cat(shares) if n else torch.zeros(0, dtype=torch.long)
    assert padded[:n].tolist() == list(range(n))


def _join(rank: int, port: int) -> None:
    torchrun_env(rank, WORLD, port)


def _count_rows(counts: dict, patch=setattr):
    """Count the pairs each ITM head call scores and the images each image-encoder call encodes
    (``patch``: e.g. pytest's monkeypatch.setattr)."""
    from maskvlm.models.model import MaskVLM

    for name in ("itm_logits", "encode_image"):
        real = getattr(MaskVLM, name)

        def counting(self, x, *rest, real=real, name=name, **kw):
            counts[name] = counts.get(name, 0) + len(x)
            return real(self, x, *rest, **kw)
        patch(MaskVLM, name, counting)


def _retrieval_ranks(folder: str, data: str, score: str, split: bool) -> dict:
    """Each query's rank of its positive (re-ranked unless ``score`` is "itc")."""
    from maskvlm.data.formats import RetrievalDataset
    from maskvlm.models.model import load_pretrained
    from maskvlm.tasks.pretrain import eval_transform
    from maskvlm.tasks.retrieval import evaluate_retrieval

    model, config, tokenizer = load_pretrained(folder)
    ranks: dict = {}
    evaluate_retrieval(model, tokenizer, RetrievalDataset(data, None, eval_transform(config)),
                       config.data.max_text_len, k=4, score=score, batch_size=5, ranks_out=ranks,
                       split_over_ranks=split)
    return ranks


def _spawned_cli_retrieval(rank: int, port: int, folder: str, data: str, out: str):
    """``torchrun -m maskvlm evaluate retrieval`` on rank ``rank`` (after the same evaluation called
    directly, for its ranks)."""
    _join(rank, port)
    from maskvlm.cli import main

    distributed.init_from_env()
    torch.save(_retrieval_ranks(folder, data, "itm", split=True), f"{out}.ranks.{rank}")
    counts: dict = {}
    _count_rows(counts)
    assert main(["evaluate", "retrieval", "--checkpoint", folder, "--data", data, "--k", "4", "--score", "itm",
                 "--precision", "fp32", "--batch-size", "5", "--no-progress", "--out", out]) == 0
    with open(f"{out}.counts.{rank}", "w") as f:
        json.dump(counts, f)


def test_retrieval_split_over_two_ranks_equals_one_process(synthetic_dir, tokenizer, tmp_path, monkeypatch):
    from maskvlm.cli import main
    from tests.conftest import save_micro_model

    folder = str(save_micro_model(tmp_path / "model", tokenizer, "train.precision=fp32"))
    data = str(synthetic_dir / "test.json")
    mp.spawn(_spawned_cli_retrieval, args=(free_ports()[0], folder, data, str(tmp_path / "two")), nprocs=WORLD,
             join=True)
    single = _retrieval_ranks(folder, data, "itm", split=False)
    assert not torch.equal(single["ir"], _retrieval_ranks(folder, data, "itc", split=False)["ir"])  # re-ranked
    for r in range(WORLD):
        split = torch.load(f"{tmp_path / 'two'}.ranks.{r}", weights_only=True)
        assert torch.equal(split["tr"], single["tr"]) and torch.equal(split["ir"], single["ir"])
    counts: dict = {}
    _count_rows(counts, monkeypatch.setattr)
    assert main(["evaluate", "retrieval", "--checkpoint", folder, "--data", data, "--k", "4", "--score", "itm",
                 "--precision", "fp32", "--batch-size", "5", "--no-progress", "--out", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / n).read_text()) for n in ("one", "two"))
    assert {k: round(v, 4) for k, v in one.items()} == {k: round(v, 4) for k, v in two.items()}
    # one process: the 8 images encoded once; every image's top 4 texts and every text's top 4 images, each
    # distinct pair once (an image's top texts are mostly among those texts' top images already)
    n_caps = len(_captions(synthetic_dir / "test.json"))
    assert counts["encode_image"] == 8 and 4 * n_caps <= counts["itm_logits"] < 4 * (8 + n_caps), counts
    for r in range(WORLD):  # each rank did half of it (the last share padded by at most one item)
        got = json.loads(Path(f"{tmp_path / 'two'}.counts.{r}").read_text())
        assert got["encode_image"] == 4
        assert counts["itm_logits"] // WORLD <= got["itm_logits"] <= counts["itm_logits"] // WORLD + 2, got


def _captions(path) -> list:
    entries = json.loads(path.read_text())
    return [c for e in entries for c in (e["caption"] if isinstance(e["caption"], list) else [e["caption"]])]


def _classifier_logits(folder: str, data: str, split: bool) -> torch.Tensor:
    from maskvlm.data.transforms import ImageTransform
    from maskvlm.models.model import load_pretrained
    from maskvlm.tasks.classify import ExampleCollator, ExampleDataset, FusedClassifier, predict
    from maskvlm.tasks.downstream import CLASSIFICATION_TASKS

    model, config, tokenizer = load_pretrained(folder)
    torch.manual_seed(1)
    module = FusedClassifier(model, 2, num_images=2)
    examples = CLASSIFICATION_TASKS["nlvr2"].load(data)[:13]  # odd: the second rank's share is padded
    dataset = ExampleDataset(examples, ImageTransform(config.model.image_size, config.data.mean, config.data.std,
                                                      train=False))
    return predict(module, dataset, ExampleCollator(tokenizer, config.data.max_text_len), 3, torch.device("cpu"),
                   "bf16", split_over_ranks=split)


def _spawned_predict(rank: int, port: int, folder: str, data: str, out: str):
    _join(rank, port)
    ok = False
    try:
        distributed.init_from_env()
        torch.save(_classifier_logits(folder, data, split=True), f"{out}.{rank}")
        ok = True
    finally:
        distributed.shutdown(ok)


def test_classification_predictions_split_over_two_ranks_equal_one_process(tokenizer, tmp_path):
    from maskvlm.data.synthetic_tasks import generate_task
    from tests.conftest import save_micro_model

    folder = save_micro_model(tmp_path / "model", tokenizer)
    root = generate_task("nlvr2", tmp_path / "nlvr2", {"train": 2, "dev": 2, "test1": 7}, image_size=32, seed=0,
                         progress=False)
    data = str(root / "test1.json")
    mp.spawn(_spawned_predict, args=(free_ports()[0], str(folder), data, str(tmp_path / "logits")), nprocs=WORLD,
             join=True)
    one = _classifier_logits(str(folder), data, split=False)
    assert one.shape[0] == 13
    for r in range(WORLD):  # bf16 logits, gathered whole on every rank
        assert torch.equal(torch.load(f"{tmp_path / 'logits'}.{r}", weights_only=True), one)
