"""Image-text retrieval evaluation: encode every image and text once, rank by ITC similarity,
re-rank each query's top-k with the ITM head in batches, and report R@1/5/10 both ways."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import RETRIEVAL_SCORES, Config, untrained_heads, untrained_note
from ..data.formats import RetrievalDataset
from ..data.tokenizer import TextTokenizer
from ..models.model import MaskVLM
from ..runtime import autocast
from ..train.distributed import broadcast_object, broadcast_tensor, gather_shares, rank_share

log = logging.getLogger("maskvlm")



def protocol_k(path: str, k: int, auto: bool = True) -> int:
    """The re-ranking depth for ``path``: with ``auto``, the usual protocol's 256 for COCO and 128
    for Flickr30K (recognised by the file name), otherwise ``k``."""
    name = Path(str(path)).name.lower()
    if auto and "coco" in name:
        return 256
    if auto and ("flickr" in name or "f30k" in name):
        return 128
    return k


def choose_score(config: Config, score: Optional[str] = None) -> str:
    """The ranking to use: ``score`` when given, else ``eval.score``. When no training run of this
    model trained the ITM head, the default falls back to ITC ranking (an explicit ``score`` is kept),
    and an untrained head in use is logged as a warning."""
    chosen = score or config.eval.score
    if chosen != "itc" and score is None and untrained_heads(config, ["itm"]):
        log_once(f"{untrained_note(config, ['itm'])}: ranking by ITC only (`maskvlm evaluate retrieval "
                 "--score itm` re-ranks anyway)")
        chosen = "itc"
    note = untrained_note(config, ["itc", "itm"] if chosen != "itc" else ["itc"])
    if note:
        log_once(f"retrieval: {note}; expect figures near chance")
    return chosen


_logged: set[str] = set()


def log_once(message: str, level: int = logging.WARNING) -> None:
    """A warning (or a message at ``level``) logged once per process (a run builds a val and a test
    evaluation)."""
    if message not in _logged:
        _logged.add(message)
        log.log(level, "%s", message)


_compiled_fuse: dict[str, object] = {}  # backend -> the compiled call, shared by every model


def _call_fuse(model: MaskVLM, *args, **kwargs) -> torch.Tensor:
    # the class's method: a compiled bound method would keep its model alive in _compiled_fuse
    return type(model).fuse(model, *args, **kwargs)


def fusion_call(model: MaskVLM, compile_backend: Optional[str] = None):
    """``model.fuse``, or with ``compile_backend`` (``eval.compile``) that call through
    ``torch.compile`` with dynamic shapes, so the re-ranking batches' varying numbers of pairs and
    images do not compile a graph each. Inductor fuses the elementwise work around the matrix
    products (GELU, LayerNorm, autocast casts): on a 2-core CPU re-ranking ran 1.12-1.16x faster at
    COCO's size (N = 5,000, k = 256) and 1.00-1.17x at N = 1,000, after 10-35 s of compilation, with
    bf16 scores that differ from eager ones by rounding (benchmarks/RESULTS.md). The compiled call
    runs even inside the trainer's eager evaluation of ``train.compile`` stacks."""
    if not compile_backend:
        return model.fuse
    if compile_backend not in _compiled_fuse:  # the model is an argument: no reference kept to it
        _compiled_fuse[compile_backend] = torch.compile(_call_fuse, dynamic=True, backend=compile_backend)
    compiled = _compiled_fuse[compile_backend]

    def call(*args, **kwargs) -> torch.Tensor:
        with torch.compiler.set_stance("default"):
            return compiled(model, *args, **kwargs)
    return call


@torch.no_grad()
def encode_split(model: MaskVLM, dataset: RetrievalDataset, tokenizer: TextTokenizer, max_len: int,
                 batch_size: int, device: torch.device, precision: str, progress: bool = False,
                 num_workers: int = 0, split_over_ranks: bool = False) -> dict:
    """Unimodal encodings of every image and text of ``dataset``. With ``split_over_ranks`` each rank
    encodes a 1/world share of each and every rank gets all of them."""
    image_hidden, image_feat, text_hidden, text_mask, text_feat = [], [], [], [], []
    n_images, n_texts = len(dataset), len(dataset.texts)
    images = Subset(dataset, rank_share(n_images).tolist()) if split_over_ranks else dataset
    ids, mask = tokenizer(dataset.texts, max_len)  # one padded length for all texts
    if split_over_ranks:
        share = rank_share(n_texts)
        ids, mask = ids[share], mask[share]
    # a private generator: evaluating during training must not shift the training RNG stream
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    with autocast(device, precision):
        for batch in tqdm(loader, desc="encode images", disable=not progress, leave=False):
            out = model.encode_image(batch.to(device))
            image_hidden.append(out.hidden)
            image_feat.append(model.image_features(out))
        for start in tqdm(range(0, len(ids), batch_size), desc="encode texts", disable=not progress, leave=False):
            out = model.encode_text(ids[start:start + batch_size].to(device), mask[start:start + batch_size].to(device))
            text_hidden.append(out.hidden)
            text_mask.append(out.attention_mask)
            text_feat.append(model.text_features(out))
    enc = dict(image_hidden=torch.cat(image_hidden), image_feat=torch.cat(image_feat),
               text_hidden=torch.cat(text_hidden), text_mask=torch.cat(text_mask), text_feat=torch.cat(text_feat))
    if split_over_ranks:
        enc = {key: gather_shares(value, n_images if key.startswith("image") else n_texts)
               for key, value in enc.items()}
    return enc


@torch.no_grad()
def itm_scores(model: MaskVLM, enc: dict, image_idx: torch.Tensor, text_idx: torch.Tensor, batch_size: int,
               device: torch.device, precision: str, split_over_ranks: bool = False,
               progress: bool = False, desc: str = "ITM re-rank", match_logit: bool = False,
               compile_backend: Optional[str] = None) -> torch.Tensor:
    """ITM match log-odds (``match_logit``: the match logit alone) for each (image_idx[j],
    text_idx[j]) pair, in batches. The pairs are taken
    in image order, and each batch passes each of its images once with an index per pair, so an
    image's fusion keys/values are projected once however many of its pairs share the batch, and
    the last fusion layer computes [CLS] alone. The fusion's first step, which sees the text alone
    (the first layer's self-attention), runs once per distinct text before the pairs, not once per pair.

    With ``split_over_ranks`` (every rank of a torchrun job calls this with the same pairs), each
    rank scores a contiguous share of the pairs in image order and the scores are gathered, so
    re-ranking takes 1/world of the time. ``compile_backend``: the fusion through torch.compile
    (:func:`fusion_call`)."""
    if not len(image_idx):
        return torch.zeros(0)
    order = torch.argsort(image_idx, stable=True)
    image_idx, text_idx = image_idx[order], text_idx[order]
    n = len(image_idx)
    if split_over_ranks:
        share = rank_share(n)
        image_idx, text_idx = image_idx[share], text_idx[share]
    scores, where = [], enc["image_hidden"].device
    fuse = fusion_call(model, compile_backend)
    with autocast(device, precision):
        texts, text_mask, pair_text, self_attended = _text_self_attention(model, enc, text_idx, batch_size)
        for start in tqdm(range(0, len(image_idx), batch_size), desc=desc, disable=not progress, leave=False):
            ii, tt = image_idx[start:start + batch_size], pair_text[start:start + batch_size]
            images, pair_image = torch.unique_consecutive(ii, return_inverse=True)
            cls = torch.zeros(len(tt), 1, dtype=torch.long, device=where)  # the ITM head reads [CLS] alone
            fused = fuse(texts[tt], text_mask[tt], enc["image_hidden"][images],
                         image_index=pair_image.to(where), output_positions=cls, self_attended=self_attended)
            logits = model.itm_logits(fused).float()
            scores.append(logits[:, 1] if match_logit else logits[:, 1] - logits[:, 0])
    scores = torch.cat(scores)
    if split_over_ranks:
        scores = gather_shares(scores, n)
    return scores.new_empty(scores.shape).index_copy_(0, order.to(scores.device), scores)


def _text_self_attention(model: MaskVLM, enc: dict, text_idx: torch.Tensor, batch_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(texts, their masks, the row of each pair's text, whether the texts are self-attended):
    ``model.text_self_attention`` of each distinct text of ``text_idx``, computed once for all of
    its pairs, or, for a model without that step, ``enc``'s encoded texts and ``text_idx`` itself."""
    hidden, mask = enc["text_hidden"], enc["text_mask"]
    distinct, pair_text = torch.unique(text_idx, return_inverse=True)
    rows = []
    for part in distinct.split(batch_size):
        rows.append(model.text_self_attention(hidden[part], mask[part]))
        if rows[-1] is None:
            return hidden, mask, text_idx, False
    return torch.cat(rows), mask[distinct], pair_text, True


def itc_weight_of(score: str, model: MaskVLM) -> float:
    """What a re-ranking ``score`` adds of each pair's ITC similarity to its ITM score. ``itm+itc``
    sums two log-scale scores, the match log-odds and the ITC logit (similarity / temperature);
    ``itm-logit+itc`` adds the plain cosine to the match logit, as BLIP's evaluation code does."""
    if score == "itm+itc":
        return 1.0 / float(model.itc_head.temperature().detach())
    return 1.0 if score == "itm-logit+itc" else 0.0


def _top_k(sim: torch.Tensor, k: int, same_on_all_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices) of each row's top-k candidates. With ``same_on_all_ranks`` rank 0's
    top-k is used everywhere: the ranks hold the same gathered features, but ranks on different
    kinds of GPU could still round the similarities differently, and then they would score
    different pairs."""
    top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
    if same_on_all_ranks:
        top_idx = broadcast_tensor(top_idx)
        top_sim = sim.gather(1, top_idx)
    return top_sim, top_idx


def _place(sim: torch.Tensor, top_sim: torch.Tensor, top_idx: torch.Tensor, itm: torch.Tensor,
           itc_weight: float) -> torch.Tensor:
    """Score matrix where each row's ``top_idx`` candidates get ``itm`` (plus ``itc_weight`` times
    their similarity) and the rest keep ITC order below them."""
    reranked = (itm.view(top_idx.shape) + itc_weight * top_sim).float()
    # candidates outside the top-k keep their ITC order, below every re-ranked one. The shift is
    # the size of the scores, not a large constant: at 1e4 float32 steps are 1e-3 apart, and close
    # similarities (an early model's) became ties, which count against the query at R@5/R@10 (k < 10)
    scores = sim.float()
    scores = scores - (scores.max() - reranked.min() + 1)
    scores.scatter_(1, top_idx, reranked)
    return scores


def _rerank(sim: torch.Tensor, k: int, pair_scores_fn, itc_weight: float = 0.0,
            same_on_all_ranks: bool = False) -> torch.Tensor:
    """One direction: the top-k of each row of ``sim`` re-scored by ``pair_scores_fn(rows, cols)``
    (see :func:`_place`)."""
    top_sim, top_idx = _top_k(sim, k, same_on_all_ranks)
    rows = torch.arange(sim.shape[0]).repeat_interleave(top_idx.shape[1])
    return _place(sim, top_sim, top_idx, pair_scores_fn(rows, top_idx.reshape(-1)), itc_weight)


def rerank_both_directions(sim_i2t: torch.Tensor, k: int, pair_scores_fn, itc_weight: float = 0.0,
                           same_on_all_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions' re-ranked score matrices (image -> text, text -> image) from one call of
    ``pair_scores_fn(image_idx, text_idx)`` on the distinct pairs of the two top-k lists.

    A pair's score does not depend on the direction it was proposed from, and most image -> text
    candidates are also text -> image candidates: with a trained model and 5 captions per image,
    over 99% of them, so the image queries' N x k pairs (a sixth of all) are nearly all scored
    already. Each distinct pair is scored once."""
    n_img, n_txt = sim_i2t.shape
    sim_t2i = sim_i2t.t().contiguous()
    i2t_sim, i2t_idx = _top_k(sim_i2t, k, same_on_all_ranks)
    t2i_sim, t2i_idx = _top_k(sim_t2i, k, same_on_all_ranks)
    image = torch.cat([torch.arange(n_img).repeat_interleave(i2t_idx.shape[1]), t2i_idx.reshape(-1)])
    text = torch.cat([i2t_idx.reshape(-1), torch.arange(n_txt).repeat_interleave(t2i_idx.shape[1])])
    pairs, which = torch.unique(image * n_txt + text, return_inverse=True)
    scores = pair_scores_fn(pairs // n_txt, pairs % n_txt)[which]
    return (_place(sim_i2t, i2t_sim, i2t_idx, scores[:i2t_idx.numel()], itc_weight),
            _place(sim_t2i, t2i_sim, t2i_idx, scores[i2t_idx.numel():], itc_weight))


def _ranks_of_positives(scores: torch.Tensor, positives: list[list[int]], chunk: int = 1024) -> torch.Tensor:
    """For each row, the 0-based rank of its best positive column: the number of non-positive
    columns scoring at least as high. Ties count against the query, so a model that scores
    everything alike gets R@1 = 0, not 100."""
    return _rank_and_rival(scores, positives, chunk)[0]


def _rank_and_rival(scores: torch.Tensor, positives: list[list[int]], chunk: int = 1024
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`_ranks_of_positives`, each row's best-scoring non-positive column: what a missed
    query took for its answer)."""
    ranks, rivals = [], []
    for start in range(0, scores.shape[0], chunk):
        block = scores[start:start + chunk].float()
        is_pos = torch.zeros_like(block, dtype=torch.bool)
        for r, pos in enumerate(positives[start:start + chunk]):
            is_pos[r, pos] = True
        best = block.masked_fill(~is_pos, float("-inf")).max(dim=1).values
        ranks.append(((block >= best[:, None]) & ~is_pos).sum(dim=1))
        rivals.append(block.masked_fill(is_pos, float("-inf")).argmax(dim=1))
    return torch.cat(ranks), torch.cat(rivals)


def recall_metrics(score_i2t: torch.Tensor, score_t2i: torch.Tensor, img2txt: list[list[int]],
                   txt2img: list[int], prefix: str = "", ranks_out: Optional[dict] = None) -> dict[str, float]:
    """R@1/5/10 (in %) for text retrieval (image query) and image retrieval (text query); ``ranks_out``
    (a dict) receives each query's rank ("tr": per image, "ir": per caption) for paired comparisons,
    and each query's best-scoring wrong answer ("tr_rival": a caption per image, "ir_rival": an image
    per caption)."""
    tr, tr_rival = _rank_and_rival(score_i2t.cpu(), img2txt)
    ir, ir_rival = _rank_and_rival(score_t2i.cpu(), [[i] for i in txt2img])
    if ranks_out is not None:
        ranks_out.update(tr=tr, ir=ir, tr_rival=tr_rival, ir_rival=ir_rival)
    m = {}
    for k in (1, 5, 10):
        m[f"{prefix}txt_r{k}"] = 100.0 * float((tr < k).double().mean())  # float32 means are off by 1e-7
        m[f"{prefix}img_r{k}"] = 100.0 * float((ir < k).double().mean())
    m[f"{prefix}r1_mean"] = (m[f"{prefix}txt_r1"] + m[f"{prefix}img_r1"]) / 2
    m[f"{prefix}r_mean"] = sum(m[f"{prefix}{d}_r{k}"] for d in ("txt", "img") for k in (1, 5, 10)) / 6
    m[f"{prefix}r1_mean_ci_low"], m[f"{prefix}r1_mean_ci_high"] = bootstrap_r1_mean(tr, ir, txt2img)
    return m


def _resampled_r1_mean(tr_ranks: torch.Tensor, ir_ranks: torch.Tensor, txt2img: list[int],
                       drawn: torch.Tensor) -> torch.Tensor:
    """The mean R@1 (in %) of each resample: row r of ``drawn`` lists the images it draws, each
    with its own caption queries."""
    n = len(tr_ranks)
    image_of_text = torch.as_tensor(txt2img, dtype=torch.long)
    tr_hit = (tr_ranks < 1).double()
    ir_hits = torch.zeros(n, dtype=torch.double).index_add_(0, image_of_text, (ir_ranks < 1).double())
    captions = torch.zeros(n, dtype=torch.double).index_add_(0, image_of_text, torch.ones(len(txt2img),
                                                                                           dtype=torch.double))
    return 50.0 * (tr_hit[drawn].mean(1) + ir_hits[drawn].sum(1) / captions[drawn].sum(1).clamp(min=1))


def _draws(n: int, samples: int, seed: int) -> torch.Tensor:
    return torch.randint(n, (samples, n), generator=torch.Generator().manual_seed(seed))


def _interval(values: torch.Tensor) -> tuple[float, float]:
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.double)).tolist()
    return low, high


def bootstrap_r1_mean(tr_ranks: torch.Tensor, ir_ranks: torch.Tensor, txt2img: list[int], samples: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean R@1 (in %) by the bootstrap over images: each resample draws the
    test images with replacement, each with its own caption queries, so that captions of one image
    are not counted as independent. Seeded: the same ranks give the same interval."""
    return _interval(_resampled_r1_mean(tr_ranks, ir_ranks, txt2img, _draws(len(tr_ranks), samples, seed)))


def paired_r1_difference(a: dict, b: dict, txt2img: list[int], samples: int = 1000, seed: int = 0) -> dict:
    """Mean R@1 of model A minus model B on the same test set (``a`` / ``b``: the ``ranks_out`` of
    their evaluations), with a 95% interval from a paired bootstrap over images (both models scored
    on the same resampled images) and the share of resamples in which A is ahead."""
    drawn = _draws(len(a["tr"]), samples, seed)
    diff = (_resampled_r1_mean(a["tr"], a["ir"], txt2img, drawn)
            - _resampled_r1_mean(b["tr"], b["ir"], txt2img, drawn))
    whole = torch.arange(len(a["tr"]))[None]
    point = float(_resampled_r1_mean(a["tr"], a["ir"], txt2img, whole) - _resampled_r1_mean(b["tr"], b["ir"],
                                                                                             txt2img, whole))
    low, high = _interval(diff)
    return {"r1_mean_difference": point, "ci_low": low, "ci_high": high,
            "a_ahead_share": float((diff > 0).double().mean()), "images": len(a["tr"])}


@torch.no_grad()
def evaluate_retrieval(model: MaskVLM, tokenizer: TextTokenizer, dataset: RetrievalDataset, max_len: int,
                       k: int = 16, score: str = "itm", batch_size: int = 128,
                       device: Optional[torch.device] = None, precision: str = "fp32",
                       progress: bool = False, num_workers: int = 0,
                       ranks_out: Optional[dict] = None, split_over_ranks: bool = False,
                       compile_backend: Optional[str] = None) -> dict[str, float]:
    """Zero-shot (or fine-tuned) retrieval metrics: ``itc_*`` from ITC ranking alone, and the
    main figures after ITM re-ranking of the top-``k`` (``k=0`` or ``score="itc"``: ITC only).
    ``score``: one of ``config.RETRIEVAL_SCORES``. ``ranks_out`` receives the ranks behind the main
    figures (see :func:`recall_metrics`).

    ``split_over_ranks``: every rank of a torchrun job calls this at the same time; each encodes a
    1/world share of the images and texts and re-ranks a 1/world share of the pairs, and every rank
    returns rank 0's figures. ``compile_backend``: re-rank through torch.compile (``eval.compile``,
    :func:`fusion_call`)."""
    if score not in RETRIEVAL_SCORES:
        raise ValueError(f"unknown retrieval score {score!r}; expected one of {', '.join(RETRIEVAL_SCORES)}")
    if score == "itc":
        k = 0
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        enc = encode_split(model, dataset, tokenizer, max_len, batch_size, device, precision, progress, num_workers,
                           split_over_ranks)
        sim_i2t = (enc["image_feat"] @ enc["text_feat"].t()).float().cpu()
        metrics = recall_metrics(sim_i2t, sim_i2t.t(), dataset.img2txt, dataset.txt2img, prefix="itc_",
                                 ranks_out=ranks_out)
        if k > 0:
            match_logit, itc_weight = score.startswith("itm-logit"), itc_weight_of(score, model)

            def pair_scores(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
                return itm_scores(model, enc, img, txt, batch_size, device, precision, split_over_ranks,
                                  progress, match_logit=match_logit, compile_backend=compile_backend).cpu()
            i2t, t2i = rerank_both_directions(sim_i2t, k, pair_scores, itc_weight, split_over_ranks)
            metrics.update(recall_metrics(i2t, t2i, dataset.img2txt, dataset.txt2img, ranks_out=ranks_out))
        else:
            metrics.update({key[4:]: v for key, v in metrics.items()})
        n_text, n_image = len(dataset.texts), len(dataset)
        metrics["k"] = float(k)  # as asked; each direction re-ranks at most all of its candidates
        metrics["k_txt"], metrics["k_img"] = float(min(k, n_text)), float(min(k, n_image))
        chance_tr = 100.0 * sum(len(t) for t in dataset.img2txt) / n_text / n_image
        metrics["chance_r1"] = (chance_tr + 100.0 / n_image) / 2
        if split_over_ranks:  # one set of figures for the whole job
            metrics, ranks = broadcast_object((metrics, ranks_out))
            if ranks_out is not None:
                ranks_out.update(ranks)
        return metrics
    finally:
        model.train(was_training)


def near_misses(dataset: RetrievalDataset, ranks: dict, n: int) -> dict[str, list[dict]]:
    """Up to ``n`` queries of each direction that missed at R@1, the nearest misses first (the right
    answer ranked 2nd, then 3rd, ...; ties in data order), with the wrong answer that scored highest
    (a tie with the right one counts as a miss). With captions that differ only in how attributes
    bind to objects, these show what the model confuses. ``ranks``: the ``ranks_out`` of
    :func:`evaluate_retrieval`."""
    def first(scores: torch.Tensor) -> list[int]:
        missed = (scores > 0).nonzero().flatten().tolist()
        return sorted(missed, key=lambda q: (int(scores[q]), q))[:n]

    texts, images = dataset.texts, dataset.images
    return {
        "text_to_image": [{"caption": texts[t], "image": images[dataset.txt2img[t]], "rank": int(ranks["ir"][t]) + 1,
                           "retrieved": images[int(ranks["ir_rival"][t])],
                           "retrieved_caption": texts[dataset.img2txt[int(ranks["ir_rival"][t])][0]]}
                          for t in first(ranks["ir"])],
        "image_to_text": [{"image": images[i], "caption": texts[dataset.img2txt[i][0]], "rank": int(ranks["tr"][i]) + 1,
                           "retrieved": texts[int(ranks["tr_rival"][i])],
                           "retrieved_image": images[dataset.txt2img[int(ranks["tr_rival"][i])]]}
                          for i in first(ranks["tr"])]}


def format_misses(misses: dict[str, list[dict]]) -> str:
    lines = ["text -> image, nearest misses at R@1 (the caption; the image it names, at its rank; the wrong "
             "image that scored highest, with one of its captions):"]
    for m in misses["text_to_image"]:
        lines += [f'  "{m["caption"]}"', f'      wanted {m["image"]} (rank {m["rank"]}), got {m["retrieved"]}: '
                                         f'"{m["retrieved_caption"]}"']
    lines.append("image -> text, nearest misses at R@1 (the image and one of its captions, at the rank of its "
                 "best caption; the wrong caption that scored highest and the image it belongs to):")
    for m in misses["image_to_text"]:
        lines += [f'  {m["image"]}: "{m["caption"]}" (rank {m["rank"]})',
                  f'      got "{m["retrieved"]}" ({m["retrieved_image"]})']
    return "\n".join(lines)


def format_table(metrics: dict[str, float], title: str = "zero-shot retrieval", score: str = "itm") -> str:
    """Plain-text table of R@1/5/10 in both directions (ITC ranking and after ITM re-ranking).
    ``score``: the re-ranking score, named on the re-ranked rows unless it is the default."""
    lines = [title, f"{'':22s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}"]
    k = int(metrics.get("k", 0))
    for prefix in ("itc_", "") if k > 0 else ("itc_",):
        for direction, label in (("txt", "text (image->text)"), ("img", "image (text->image)")):
            name = "ITC rank"
            if prefix == "":
                depth = int(metrics.get(f"k_{direction}", k))
                name = f"ITM re-rank k={k}" if depth == k else f"ITM re-rank of all {depth}"
                name += f", {score}" if score != "itm" else ""
            vals = [metrics[f"{prefix}{direction}_r{n}"] for n in (1, 5, 10)]
            lines.append(f"{label:22s}" + "".join(f"{v:8.1f}" for v in vals) + f"   [{name}]")
    interval = (f" (95% CI {metrics['r1_mean_ci_low']:.1f}-{metrics['r1_mean_ci_high']:.1f}, bootstrap over images)"
                if "r1_mean_ci_low" in metrics else "")
    lines.append(f"mean R@1 (TR, IR){' after re-rank' if k > 0 else ''}: {metrics['r1_mean']:.1f}{interval}   "
                 f"mean of all six: {metrics['r_mean']:.1f}")
    if "chance_r1" in metrics:
        lines.append(f"chance level R@1 (TR, IR mean): {metrics['chance_r1']:.2f}")
    return "\n".join(lines)
