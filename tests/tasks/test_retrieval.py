import torch

from maskvlm.tasks.retrieval import _rerank, format_table, recall_metrics


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
    scores = _rerank(sim, 2, lambda rows, cols: torch.tensor([0.0, 5.0]), add_itc=False)
    assert scores.argsort(dim=1, descending=True).tolist() == [[1, 0, 2, 3]]


def test_format_table_prints_both_directions():
    m = {f"{p}{d}_r{k}": 1.0 for p in ("", "itc_") for d in ("txt", "img") for k in (1, 5, 10)}
    m.update(r1_mean=1.0, r_mean=1.0, k=16.0, chance_r1=0.5)
    text = format_table(m)
    assert "R@1" in text and "image->text" in text and "text->image" in text and "k=16" in text
