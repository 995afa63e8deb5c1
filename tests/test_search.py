"""The image index: incremental building, unreadable files, exact top-k, text/image queries, CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from maskvlm.inference import VLM
from maskvlm.folder_lock import FolderInUse, hold_folder
from maskvlm.search import ImageIndex, build_index, list_images, search


@pytest.fixture
def exported(model, config, tokenizer, tmp_path):
    return model.save_pretrained(tmp_path / "model", config, tokenizer)


@pytest.fixture
def image_folder(synthetic_dir, tmp_path):
    folder = tmp_path / "images"
    entries = json.loads((synthetic_dir / "test.json").read_text())
    for i, e in enumerate(entries[:5]):  # some in a sub-folder: indexing is recursive
        target = (folder / "sub" if i % 2 else folder) / Path(e["image"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic_dir / e["image"], target)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder, entries


def test_index_is_incremental_and_skips_unreadable_images(exported, image_folder, synthetic_dir, tmp_path):
    folder, entries = image_folder
    vlm = VLM.from_pretrained(exported, device="cpu", precision="fp32")
    stats = build_index(vlm, exported, folder, tmp_path / "index", batch_size=2, progress=False)
    assert (stats.added, stats.unreadable, stats.total) == (5, 1, 5)
    shutil.copy(synthetic_dir / entries[6]["image"], folder / "new.png")
    again = build_index(vlm, exported, folder, tmp_path / "index", batch_size=2, progress=False)
    assert (again.added, again.skipped_existing, again.total) == (1, 5, 6)  # only the new image is encoded
    index = ImageIndex(tmp_path / "index")
    assert len(index) == 6 and sorted(index.paths) == sorted(p for p in list_images(folder) if p != "broken.png")
    direct = vlm.encode_images([folder / p for p in index.paths]).numpy()
    assert np.allclose(np.asarray(index.embeddings, dtype=np.float32), direct, atol=2e-3)  # float16 storage
    (tmp_path / "taken").write_text("")
    with pytest.raises(FileExistsError, match="taken is a file; it names the index folder"):  # was "[Errno 17]"
        build_index(vlm, exported, folder, tmp_path / "taken", progress=False)
    with hold_folder(tmp_path / "index", "index build"):  # a second build into the same folder is refused
        with pytest.raises(FolderInUse, match="index is in use by another maskvlm process .index build, pid"):
            build_index(vlm, exported, folder, tmp_path / "index", progress=False)
    assert len(ImageIndex(tmp_path / "index")) == 6


def test_exact_top_k_matches_brute_force(exported, image_folder, tmp_path):
    folder, entries = image_folder
    vlm = VLM.from_pretrained(exported, device="cpu", precision="fp32")
    build_index(vlm, exported, folder, tmp_path / "index", progress=False)
    index = ImageIndex(tmp_path / "index")
    query = vlm.encode_texts([entries[0]["caption"][0]])[0].numpy()
    scores, idx = index.search(query, top_k=3, chunk=2, use_faiss=False)  # chunks smaller than k
    brute = np.asarray(index.embeddings, dtype=np.float32) @ query
    assert list(idx) == list(np.argsort(-brute, kind="stable")[:3])
    assert np.allclose(scores, np.sort(brute)[::-1][:3], atol=1e-6)
    text = entries[0]["caption"][0]
    results = search(vlm, index, text=text, top_k=2, rerank=True)
    # re-ranked by the ITM log-odds plus the ITC logit, over the ITC top 4 x top_k
    cosine, rows = index.search(query, 8)
    pool = [index.paths[i] for i in rows]
    log_odds = vlm.itm_score([folder / p for p in pool], [text] * len(pool), log_odds=True)
    probability = vlm.itm_score([folder / p for p in pool], [text] * len(pool))
    assert torch.allclose(torch.sigmoid(log_odds), probability, atol=1e-6)
    want = log_odds + torch.from_numpy(cosine) / vlm.model.itc_head.temperature().detach()
    order = torch.argsort(want, descending=True, stable=True)[:2].tolist()
    assert [p for p, _ in results] == [pool[i] for i in order]
    assert [s for _, s in results] == pytest.approx([float(want[i]) for i in order], abs=1e-3)
    by_image = search(vlm, index, image=folder / index.paths[0], top_k=1)
    assert by_image[0][0] == index.paths[0]  # an image finds itself
    with pytest.raises(ValueError, match="the text query is empty"):
        search(vlm, index, text="  ")
    with pytest.raises(ValueError, match="top_k=0"):
        search(vlm, index, text="a red circle", top_k=0)


def test_an_index_refuses_another_model(exported, image_folder, tmp_path, model, config, tokenizer):
    import torch
    folder, _ = image_folder
    vlm = VLM.from_pretrained(exported, device="cpu")
    build_index(vlm, exported, folder, tmp_path / "index", progress=False)
    with torch.no_grad():
        model.itc_head.temp.add_(1.0)
        model.visual_encoder.norm.bias.add_(1.0)
    other = model.save_pretrained(tmp_path / "other", config, tokenizer)
    with pytest.raises(ValueError, match="--rebuild"):
        build_index(VLM.from_pretrained(other, device="cpu"), other, folder, tmp_path / "index", progress=False)


def test_cli_index_and_search(exported, image_folder, tmp_path, capsys):
    from maskvlm.cli import main
    folder, entries = image_folder
    assert main(["index", "--checkpoint", str(exported), "--images", str(folder), "--out", str(tmp_path / "ix"),
                 "--no-progress"]) == 0
    assert "5 images (5 added, 0 already there, 1 unreadable skipped)" in capsys.readouterr().out
    assert main(["search", "--index", str(tmp_path / "ix"), "--query", entries[0]["caption"][0], "--top-k", "3",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]


def test_search_refuses_a_model_other_than_the_indexes_and_takes_a_copy_of_it(exported, image_folder, tmp_path,
                                                                             capsys, model, config, tokenizer):
    """Query embeddings of other weights do not compare with the index's: before 2026-11-24 `search
    --checkpoint OTHER` ranked the images by them without a word. A copy of the same weights in
    another file (an export of the checkpoint) is the same model."""
    import torch
    from safetensors.torch import load_file, save_file

    from maskvlm.cli import main
    from maskvlm.models.io import write_checksums
    folder, entries = image_folder
    assert main(["index", "--checkpoint", str(exported), "--images", str(folder), "--out", str(tmp_path / "ix"),
                 "--no-progress"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    save_file(load_file(copy / "model.safetensors"), str(copy / "model.safetensors"), metadata={"copy": "1"})
    write_checksums(copy)
    query = ["search", "--index", str(tmp_path / "ix"), "--query", entries[0]["caption"][0], "--json"]
    assert main([*query, "--checkpoint", str(copy)]) == 0
    with torch.no_grad():
        model.visual_encoder.norm.bias.add_(1.0)
    other = model.save_pretrained(tmp_path / "other", config, tokenizer)
    capsys.readouterr()
    assert main([*query, "--checkpoint", str(other)]) == 2
    assert f"and {other} holds other weights: their embeddings do not compare" in capsys.readouterr().err
    shutil.rmtree(exported)
    assert main(query) == 2
    assert f"was built with {exported}, which is gone; pass --checkpoint" in capsys.readouterr().err


def test_a_build_stopped_part_way_keeps_its_rows_and_continues(exported, image_folder, tmp_path, monkeypatch):
    folder, _ = image_folder
    vlm = VLM.from_pretrained(exported, device="cpu", precision="fp32")
    clean = build_index(vlm, exported, folder, tmp_path / "clean", batch_size=2, progress=False)
    real, calls = VLM.encode_pixels, []

    def stopping(self, *args, **kwargs):  # Ctrl-C while the second batch is encoded
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(VLM, "encode_pixels", stopping)
    with pytest.raises(KeyboardInterrupt):
        build_index(vlm, exported, folder, tmp_path / "index", batch_size=2, progress=False)
    monkeypatch.setattr(VLM, "encode_pixels", real)
    assert len(ImageIndex(tmp_path / "index")) == 2  # searchable as it stands: the first batch
    # a kill between the two writes, or in the middle of one: a row ahead, a cut row, a cut line
    with open(tmp_path / "index" / "embeddings.f16", "ab") as f:
        f.write(np.zeros((3, vlm.config.model.embed_dim), np.float16).tobytes()[:-5])
    with open(tmp_path / "index" / "paths.txt", "a") as f:
        f.write("sub/half-writ")
    resumed = build_index(vlm, exported, folder, tmp_path / "index", batch_size=2, progress=False)
    assert (resumed.skipped_existing, resumed.added, resumed.total) == (2, 3, clean.total)
    a, b = ImageIndex(tmp_path / "clean"), ImageIndex(tmp_path / "index")
    assert a.paths == b.paths and np.array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))


def test_decoding_workers_build_the_same_index(exported, image_folder, tmp_path):
    folder, _ = image_folder
    vlm = VLM.from_pretrained(exported, device="cpu", precision="fp32")
    one = build_index(vlm, exported, folder, tmp_path / "one", batch_size=2, progress=False)
    two = build_index(vlm, exported, folder, tmp_path / "two", batch_size=2, progress=False, workers=2)
    assert (two.added, two.unreadable) == (one.added, one.unreadable) == (5, 1)
    a, b = ImageIndex(tmp_path / "one"), ImageIndex(tmp_path / "two")
    assert a.paths == b.paths and np.array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="names that are not UTF-8 (Linux file systems)")
def test_file_names_that_are_not_utf8_or_hold_line_breaks(exported, image_folder, tmp_path, capsysbinary):
    """A name that is not valid UTF-8 (an archive from another system) ended the build with "surrogates not
    allowed"; one with U+2028 was split in two lines of paths.txt; one with a line break is left out."""
    import os

    from maskvlm.cli import main
    folder, _ = image_folder
    source = next(p for p in folder.glob("*.png") if p.name != "broken.png")
    odd = {b"\xff\xfe-latin1.png", "x\u2028y.png".encode(), "caf\u00e9.png".encode()}
    for name in odd | {b"line\nbreak.png"}:
        shutil.copy(source, os.path.join(os.fsencode(folder), name))
    vlm = VLM.from_pretrained(exported, device="cpu", precision="fp32")
    stats = build_index(vlm, exported, folder, tmp_path / "ix", batch_size=3, progress=False)
    assert (stats.added, stats.unreadable) == (8, 1)  # the 5 images, 3 odd names; broken.png
    index = ImageIndex(tmp_path / "ix")
    assert odd <= {os.fsencode(p) for p in index.paths} and all((folder / p).is_file() for p in index.paths)
    assert build_index(vlm, exported, folder, tmp_path / "ix", progress=False).added == 0  # read back the same
    assert main(["search", "--index", str(tmp_path / "ix"), "--query", "a red circle", "--top-k", "20"]) == 0
    printed = capsysbinary.readouterr().out
    assert all(name in printed for name in odd)  # each name's own bytes


def test_an_empty_image_folder_is_an_error_before_any_index_is_written(exported, tmp_path):
    vlm = VLM.from_pretrained(exported, device="cpu", precision="fp32")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="empty: no image files in it or below it"):
        build_index(vlm, exported, tmp_path / "empty", tmp_path / "ix", progress=False)
    assert not (tmp_path / "ix").exists()
