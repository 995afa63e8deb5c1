import pytest
import torch

from maskvlm.tasks.retrieval import (_rerank, bootstrap_r1_mean, format_table, paired_r1_difference, recall_metrics,
                                     rerank_both_directions)


def test_recall_metrics_on_hand_made_scores():
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    perfect = torch.tensor([[1.0 if t // 2 == i else 0.0 for t in range(6)] for i in range(3)])
    m = recall_metrics(perfect, perfect.t(), img2txt, txt2img)
    assert m["txt_r1"] == m["img_r1"] == 100.0
    # image 0 ranks its texts below two wrong ones -> rank 2: a miss at R@1, a hit at R@5
    scores = perfect.clone()
    scores[0] = torch.tensor([0.1, 0.2, 0.9, 0.8, 0.0, 0.0])
    m = recall_metrics(scores, perfect.t(), img2txt, txt2img)
    assert abs(m["txt_r1"] - 200 / 3) < 1e-4 and m["txt_r5"] == 100.0
    assert m["r1_mean"] == (m["txt_r1"] + m["img_r1"]) / 2


def test_rerank_changes_only_the_top_k_and_keeps_itc_order_below():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    # ITM prefers candidate 1 over 0; candidate 2 is outside k=2 and keeps its ITC place
    scores = _rerank(sim, 2, lambda rows, cols: torch.tensor([0.0, 5.0]), itc_weight=0.0)
    assert scores.argsort(dim=1, descending=True).tolist() == [[1, 0, 2, 3]]



def test_both_directions_score_each_distinct_pair_once_and_equal_each_direction_apart():
    torch.manual_seed(0)
    sim = torch.rand(6, 30)
    table = torch.randn(6, 30)  # the "ITM score" of each (image, text) pair
    calls = []

    def score(img, txt):
        calls.append(img * 30 + txt)
        return table[img, txt]
    i2t, t2i = rerank_both_directions(sim, 4, score, itc_weight=0.5)
    assert len(calls) == 1 and len(calls[0].unique()) == len(calls[0])  # one call, no pair twice
    asked = set(calls[0].tolist())
    i2t_pairs = {i * 30 + t for i in range(6) for t in sim[i].topk(4).indices.tolist()}
    t2i_pairs = {i * 30 + t for t in range(30) for i in sim[:, t].topk(4).indices.tolist()}
    assert asked == i2t_pairs | t2i_pairs and len(asked) < len(i2t_pairs) + len(t2i_pairs)
    assert torch.equal(i2t, _rerank(sim, 4, lambda img, txt: table[img, txt], itc_weight=0.5))
    assert torch.equal(t2i, _rerank(sim.t().contiguous(), 4, lambda txt, img: table[img, txt], itc_weight=0.5))


def test_rerank_keeps_close_similarities_apart_below_the_top_k():
    # an early model's similarities differ by 1e-4: shifted by a constant 1e4 they were rounded into ties
    # (float32 steps 1e-3 apart there), which count against the query, so with k < 10 the re-ranked R@5 /
    # R@10 read lower than ITC's even where ITM kept the ITC order
    torch.manual_seed(0)
    sim = torch.rand(50, 200) * 0.01 + 0.3
    positives, image_of_text = [[4 * i + j for j in range(4)] for i in range(50)], [t // 4 for t in range(200)]
    itc = recall_metrics(sim, sim.t(), positives, image_of_text)
    kept = recall_metrics(_rerank(sim, 1, lambda rows, cols: torch.zeros(len(rows)), itc_weight=1.0),
                          _rerank(sim.t().contiguous(), 1, lambda rows, cols: torch.zeros(len(rows)), itc_weight=1.0),
                          positives, image_of_text)
    assert kept == itc


def test_format_table_prints_both_directions():
    m = {f"{p}{d}_r{k}": 1.0 for p in ("", "itc_") for d in ("txt", "img") for k in (1, 5, 10)}
    m.update(r1_mean=1.0, r_mean=1.0, k=16.0, chance_r1=0.5)
    text = format_table(m)
    assert "R@1" in text and "image->text" in text and "text->image" in text and "k=16" in text
    # 8 images: the text -> image rows re-rank all 8, not 16
    m.update(k_txt=16.0, k_img=8.0)
    rows = {line.split("  ")[0]: line for line in format_table(m).splitlines() if "re-rank" in line}
    assert "[ITM re-rank k=16]" in rows["text (image->text)"]
    assert "[ITM re-rank of all 8]" in rows["image (text->image)"]
    assert "[ITM re-rank k=16, itm-logit+itc]" in format_table(m, score="itm-logit+itc")  # not the default


def test_recall_ties_count_against_the_query_and_any_positive_counts():
    img2txt = [[0, 1], [2, 3]]
    txt2img = [0, 0, 1, 1]
    # a constant score matrix must not look perfect: every positive ties with a negative
    flat = torch.zeros(2, 4)
    m = recall_metrics(flat, flat.t(), img2txt, txt2img)
    assert m["txt_r1"] == 0.0 and m["img_r1"] == 0.0
    # image 0: its second caption (col 1) wins outright although col 0 ranks last -> hit at R@1;
    # image 1: its best caption ties with a caption of image 0 -> rank 1 (miss at R@1, hit at R@5)
    sim = torch.tensor([[0.0, 0.9, 0.5, 0.1],
                        [0.7, 0.2, 0.7, 0.1]])
    m = recall_metrics(sim, sim.t(), img2txt, txt2img)
    assert m["txt_r1"] == 50.0 and m["txt_r5"] == 100.0
    # text->image: text 0 (image 0) scores 0.0 vs 0.7 -> miss; text 1: 0.9 > 0.2 hit; text 2: 0.5 < 0.7 hit;
    # text 3: 0.1 vs 0.1 tie -> miss
    assert m["img_r1"] == 50.0


def test_protocol_k_follows_the_dataset():
    from maskvlm.tasks.retrieval import protocol_k
    assert protocol_k("ann/coco_test.json", 16) == 256
    assert protocol_k("ann/flickr30k_test.json", 16) == 128
    assert protocol_k("data/synthetic/test.json", 16) == 16
    assert protocol_k("ann/coco_test.json", 16, auto=False) == 16


def test_itm_scores_share_images_and_keep_the_pair_order(model):
    """Pairs are scored in image order with each image projected once per batch; the scores come
    back in the callers' order and equal fusing each pair on its own."""
    from maskvlm.tasks.retrieval import itm_scores

    torch.manual_seed(0)
    model.eval()
    n_img, n_txt, length = 5, 7, 9
    width = model.config.vision_width
    enc = dict(image_hidden=torch.randn(n_img, 1 + (model.config.image_size // model.config.patch_size) ** 2, width),
               text_hidden=torch.randn(n_txt, length, model.config.text_width),
               text_mask=torch.ones(n_txt, length, dtype=torch.bool))
    enc["text_mask"][:, 6:] = False
    image_idx = torch.randint(0, n_img, (23,))
    text_idx = torch.randint(0, n_txt, (23,))
    rows = []  # rows through each fusion layer's self-attention
    hooks = [layer.attention.attn.qkv.register_forward_hook(lambda m, args, out, i=i: rows.append((i, len(out))))
             for i, layer in enumerate(model.text_cross_encoder.layer)]
    try:
        got = itm_scores(model, enc, image_idx, text_idx, batch_size=6, device=torch.device("cpu"),
                         precision="fp32")
    finally:
        for h in hooks:
            h.remove()
    # the first layer's self-attention sees each distinct text once, not each of the 23 pairs
    assert sum(n for i, n in rows if i == 0) == len(text_idx.unique())
    with torch.no_grad():
        fused = model.fuse(enc["text_hidden"][text_idx], enc["text_mask"][text_idx], enc["image_hidden"][image_idx])
        logits = model.itm_logits(fused).float()
        want = logits[:, 1] - logits[:, 0]  # the match log-odds
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    alone = itm_scores(model, enc, image_idx, text_idx, 6, torch.device("cpu"), "fp32", match_logit=True)
    torch.testing.assert_close(alone, logits[:, 1], rtol=1e-5, atol=1e-5)  # ALBEF's evaluation score
    assert itm_scores(model, enc, image_idx[:0], text_idx[:0], 6, torch.device("cpu"), "fp32").numel() == 0


def test_the_bootstrap_interval_holds_the_estimate_narrows_with_more_images_and_is_seeded():
    def ranks(n, hit_rate, captions=5):
        g = torch.Generator().manual_seed(1)
        tr = (torch.rand(n, generator=g) > hit_rate).long() * 3  # rank 0 (a hit) or 3
        ir = (torch.rand(n * captions, generator=g) > hit_rate).long() * 3
        return tr, ir, [i // captions for i in range(n * captions)]

    small, large = ranks(100, 0.4), ranks(2000, 0.4)
    low, high = bootstrap_r1_mean(*small)
    estimate = 50 * (float((small[0] < 1).double().mean()) + float((small[1] < 1).double().mean()))
    assert low < estimate < high and high - low > 5
    big_low, big_high = bootstrap_r1_mean(*large)
    assert big_high - big_low < (high - low) / 3  # about 1 / sqrt(20) as wide
    assert bootstrap_r1_mean(*small) == (low, high)
    perfect = bootstrap_r1_mean(torch.zeros(50, dtype=torch.long), torch.zeros(250, dtype=torch.long),
                                [i // 5 for i in range(250)])
    assert perfect == (100.0, 100.0)
    # captions of one image move together: a resample draws images, not captions, so an interval over
    # images whose captions all hit or all miss is wider than one over independent captions
    tr = torch.tensor([0, 3] * 50)
    together = bootstrap_r1_mean(tr, tr.repeat_interleave(5), [i // 5 for i in range(500)])
    apart = bootstrap_r1_mean(tr, torch.tensor([0, 3] * 250), [i // 5 for i in range(500)])
    assert together[1] - together[0] > apart[1] - apart[0]


def test_the_paired_difference_of_two_models_on_the_same_images():
    captions = [i // 5 for i in range(500)]
    g = torch.Generator().manual_seed(2)
    a = {"tr": (torch.rand(100, generator=g) > 0.5).long() * 2, "ir": (torch.rand(500, generator=g) > 0.5).long() * 2}
    same = paired_r1_difference(a, a, captions)
    assert (same["r1_mean_difference"], same["ci_low"], same["ci_high"], same["a_ahead_share"]) == (0, 0, 0, 0)
    # B misses every query A gets right on the first 20 images, and matches A elsewhere
    b = {"tr": a["tr"].clone(), "ir": a["ir"].clone()}
    b["tr"][:20], b["ir"][:100] = 2, 2
    d = paired_r1_difference(a, b, captions)
    lost = 50 * (float((a["tr"][:20] < 1).sum()) / 100 + float((a["ir"][:100] < 1).sum()) / 500)
    assert abs(d["r1_mean_difference"] - lost) < 1e-9 and 0 < d["ci_low"] < lost < d["ci_high"]
    assert d["a_ahead_share"] > 0.97 and d["images"] == 100


def test_cli_compares_two_checkpoints(synthetic_dir, tokenizer, tmp_path, capsys):
    import json

    from maskvlm.cli import main
    from tests.conftest import save_micro_model

    first = save_micro_model(tmp_path / "a", tokenizer)
    second = save_micro_model(tmp_path / "b", tokenizer, "model.embed_dim=8")
    out = tmp_path / "compare.json"
    assert main(["evaluate", "retrieval", "--checkpoint", str(first), "--against", str(second), "--data",
                 str(synthetic_dir / "test.json"), "--k", "2", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"mean R@1, {first} minus {second}:" in printed and "paired bootstrap over the 8 images" in printed
    result = json.loads(out.read_text())
    assert set(result) == {"model", "against", "difference"}
    difference = result["model"]["r1_mean"] - result["against"]["r1_mean"]
    assert abs(result["difference"]["r1_mean_difference"] - difference) < 1e-9


def test_near_misses_name_the_wrong_answer_that_scored_highest():
    from types import SimpleNamespace

    from maskvlm.tasks.retrieval import format_misses, near_misses

    img2txt, txt2img = [[0, 1], [2], [3]], [0, 0, 1, 2]
    data = SimpleNamespace(texts=["a0", "a1", "b", "c"], images=["A", "B", "C"], img2txt=img2txt, txt2img=txt2img)
    i2t = torch.tensor([[0.9, 0.1, 0.5, 0.2],    # A: its caption a0 first -> hit
                        [0.3, 0.2, 0.6, 0.7],    # B: c beats b -> rank 2, rival c (image C)
                        [0.8, 0.1, 0.9, 0.1]])   # C: b, a0 and a1 (a tie) beat c -> rank 4, rival b
    t2i = torch.tensor([[0.9, 0.1, 0.0],         # a0 -> A hit
                        [0.5, 0.5, 0.1],         # a1: tie with B counts against it -> rank 2, rival B
                        [0.2, 0.1, 0.3],         # b: C then A beat B -> rank 3, rival C
                        [0.0, 0.0, 1.0]])        # c -> C hit
    ranks: dict = {}
    recall_metrics(i2t, t2i, img2txt, txt2img, ranks_out=ranks)
    m = near_misses(data, ranks, 5)
    assert [(x["caption"], x["rank"], x["retrieved"], x["retrieved_caption"]) for x in m["text_to_image"]] == [
        ("a1", 2, "B", "b"), ("b", 3, "C", "c")]  # the nearest miss first
    assert [(x["image"], x["rank"], x["retrieved"], x["retrieved_image"]) for x in m["image_to_text"]] == [
        ("B", 2, "c", "C"), ("C", 4, "b", "B")]
    assert len(near_misses(data, ranks, 1)["text_to_image"]) == 1
    assert 'wanted A (rank 2), got B: "b"' in format_misses(m)


def test_cli_misses_are_printed_and_written(synthetic_dir, tokenizer, tmp_path, capsys):
    import json

    from maskvlm.cli import main
    from tests.conftest import save_micro_model

    folder = save_micro_model(tmp_path / "model", tokenizer)
    assert main(["evaluate", "retrieval", "--checkpoint", str(folder), "--data", str(synthetic_dir / "test.json"),
                 "--misses", "3", "--no-progress", "--out", str(tmp_path / "m.json")]) == 0
    assert "nearest misses at R@1" in capsys.readouterr().out
    misses = json.loads((tmp_path / "m.json").read_text())["misses"]
    assert 0 < len(misses["text_to_image"]) <= 3 and 0 < len(misses["image_to_text"]) <= 3
    assert all(m["rank"] >= 2 and m["retrieved"] != m["image"] for m in misses["text_to_image"])


def test_the_itc_part_of_each_score(model):
    from maskvlm.tasks.retrieval import itc_weight_of

    with torch.no_grad():
        model.itc_head.temp.fill_(0.05)
    assert itc_weight_of("itm+itc", model) == pytest.approx(20.0)  # the ITC logit: similarity / temperature
    assert itc_weight_of("itm-logit+itc", model) == 1.0  # BLIP's: the cosine itself
    assert itc_weight_of("itm", model) == itc_weight_of("itm-logit", model) == 0.0


def test_every_score_ranks_by_what_it_names(synthetic_dir, tokenizer, model, config):
    """The re-ranked figures of each score equal R@K of a score matrix built by hand from the ITM
    logits: log-odds for "itm", the match logit alone for "itm-logit"; "itm+itc" adds the ITC logit
    (similarity / temperature), "itm-logit+itc" the similarity (BLIP's); "itc" is the ITC ranking.
    An unknown score is refused."""
    from maskvlm.data.formats import RetrievalDataset
    from maskvlm.tasks.pretrain import eval_transform
    from maskvlm.tasks.retrieval import encode_split, evaluate_retrieval

    model.eval()
    with torch.no_grad():  # a low temperature: the ITC logit outweighs the ITM log-odds in "itm+itc"
        model.itc_head.temp.fill_(0.001)
    dataset = RetrievalDataset(synthetic_dir / "test.json", None, eval_transform(config))
    n_img, n_txt = len(dataset), len(dataset.texts)
    with torch.no_grad():
        enc = encode_split(model, dataset, tokenizer, config.data.max_text_len, 64, torch.device("cpu"), "fp32")
        sim = (enc["image_feat"] @ enc["text_feat"].t()).float()
        img = torch.arange(n_img).repeat_interleave(n_txt)
        txt = torch.arange(n_txt).repeat(n_img)
        fused = model.fuse(enc["text_hidden"][txt], enc["text_mask"][txt], enc["image_hidden"][img])
        logits = model.itm_logits(fused).float().view(n_img, n_txt, 2)
    forms = {"itm": logits[..., 1] - logits[..., 0], "itm-logit": logits[..., 1]}
    for score in ("itm", "itm+itc", "itm-logit", "itm-logit+itc"):
        # k = every candidate: the whole matrix is re-scored, so the hand-made matrix is the ranking
        got = evaluate_retrieval(model, tokenizer, dataset, config.data.max_text_len, k=n_txt, score=score,
                                 batch_size=16)
        itc = {"itm+itc": sim / model.itc_head.temperature().detach(), "itm-logit+itc": sim}.get(score, 0)
        by_hand = forms[score.removesuffix("+itc")] + itc
        want = recall_metrics(by_hand, by_hand.t().contiguous(), dataset.img2txt, dataset.txt2img)
        assert {key: got[key] for key in want} == pytest.approx(want, abs=1e-6), score
        if score == "itm+itc":  # ... so its ranking is the ITC ranking
            assert {key: got[key] for key in want} == {key: got[f"itc_{key}"] for key in want}
    itc = evaluate_retrieval(model, tokenizer, dataset, config.data.max_text_len, k=4, score="itc")
    assert itc["txt_r1"] == itc["itc_txt_r1"] and itc["k"] == 0
    with pytest.raises(ValueError, match="unknown retrieval score 'logit'"):
        evaluate_retrieval(model, tokenizer, dataset, config.data.max_text_len, k=4, score="logit")


def test_compiled_reranking_compiles_the_fusion_and_gives_the_same_scores(synthetic_dir, tokenizer, model, config,
                                                                          maskvlm_log):
    """``eval.compile``: the re-ranking fusion runs through torch.compile (here the aot_eager backend,
    which generates no code, so fp32 scores match eager closely). It compiles even inside the
    trainer's eager evaluation of ``train.compile`` stacks (``force_eager`` stance), and
    ``make_retrieval_eval`` passes the key on."""
    from torch._dynamo.utils import counters

    from maskvlm.data.formats import RetrievalDataset
    from maskvlm.tasks.pretrain import eval_transform, make_retrieval_eval
    from maskvlm.tasks.retrieval import evaluate_retrieval
    from maskvlm.train.loop import eager_evaluation

    torch._dynamo.reset()
    model.eval()
    dataset = RetrievalDataset(synthetic_dir / "test.json", None, eval_transform(config))
    eager = evaluate_retrieval(model, tokenizer, dataset, config.data.max_text_len, k=6, batch_size=16,
                               precision="fp32", ranks_out=(eager_ranks := {}))
    frames = counters["frames"]["ok"]
    with eager_evaluation(True):
        compiled = evaluate_retrieval(model, tokenizer, dataset, config.data.max_text_len, k=6, batch_size=16,
                                      precision="fp32", ranks_out=(compiled_ranks := {}), compile_backend="aot_eager")
    assert counters["frames"]["ok"] > frames  # the fusion really ran compiled (the check can fail)
    assert compiled == pytest.approx(eager, abs=1e-6)
    for key in eager_ranks:
        torch.testing.assert_close(compiled_ranks[key], eager_ranks[key], rtol=1e-5, atol=1e-5)
    config.eval.compile, config.train.compile_backend, config.eval.k_auto, config.eval.k = True, "aot_eager", False, 6
    config.train.precision, config.eval.batch_size = "fp32", 16
    frames = counters["frames"]["ok"]
    torch._dynamo.reset()
    assert make_retrieval_eval(model, tokenizer, config, str(synthetic_dir / "test.json"))() == pytest.approx(eager)
    assert counters["frames"]["ok"] > frames
    assert "retrieval re-ranking through torch.compile (aot_eager, eval.compile)" in maskvlm_log.text  # in train.log
