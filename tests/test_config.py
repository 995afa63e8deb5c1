import pytest

from maskvlm.config import ConfigError, build_config, list_recipes, parse_overrides


def test_defaults_recipe_and_presets():
    cfg = build_config()
    assert cfg.recipe == "maskvlm" and cfg.preset == "tiny"
    assert (cfg.masking.text_ratio, cfg.masking.image_ratio, cfg.masking.image_block) == (0.3, 0.6, 2)
    base = build_config(preset="base")
    m = base.model
    assert (m.image_size, m.patch_size, m.vision_width, m.vision_layers) == (224, 16, 768, 12)
    assert (m.text_layers, m.cross_layers, m.image_cross_layers) == (6, 6, 3)
    small = build_config(preset="small").model
    assert (small.image_size, small.patch_size, small.vision_width, small.vision_layers) == (128, 16, 384, 6)
    assert "maskvlm" in list_recipes()


def test_overrides_are_typed():
    cfg = build_config(overrides=["train.lr=3e-4", "masking.visible_only=false", "data.crop_scale=[0.5, 1.0]",
                                  "data.tokenizer=/x/vocab.txt", "train.max_steps=7"])
    assert cfg.train.lr == 3e-4 and cfg.masking.visible_only is False and cfg.data.crop_scale == [0.5, 1.0]
    assert cfg.data.tokenizer == "/x/vocab.txt" and cfg.train.max_steps == 7
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'. valid keys here: .*batch_size.*lr"),
    ("modle.x=1", "unknown config key 'modle'; did you mean 'model'"),
    ("train.learning_rate=1", "unknown config key 'train.learning_rate'; valid keys here"),  # nothing close
    ("train.max_steps=ten", "train.max_steps='ten': expected int"),
    ("masking.image_ratio=1.0", r"masking.image_ratio=1.0: expected a ratio in \[0, 1\)"),
    ("masking.text_ratio=-0.1", "masking.text_ratio"),
    ("train.batch_size=0", "train.batch_size=0: expected a positive integer"),
    ("masking.mode=both", "masking.mode='both': expected one of 'separate', 'joint'"),
    ("model.image_size=30", "not a multiple of model.patch_size"),
    ("train", "expected the form key.sub=value"),
    ("train=5", r"^train: expected a mapping of its keys, got int 5$"),  # was "train.: expected a mapping"
    # both only renamed the run: recipe=albef trained MaskVLM's objectives under ALBEF's name
    ("recipe=albef", r"the recipe is chosen with `maskvlm pretrain --recipe albef`; as an override it would only"),
    ("preset=base", r"the preset is chosen with `maskvlm pretrain --preset base`"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[override])


def test_all_zero_weights_is_an_error():
    with pytest.raises(ConfigError, match="nothing to train"):
        build_config(overrides=["loss.itc=0", "loss.itm=0", "loss.mlm=0", "loss.mim=0"])


def test_unknown_recipe_and_user_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; available: .*maskvlm"):
        build_config("nope")
    user = tmp_path / "mine.yaml"
    user.write_text("train:\n  batch_size: 12\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown config key 'train.colour'"):
        build_config(config_file=str(user))


@pytest.mark.parametrize("recipe,overrides,message", [
    ("maskvlm", ["masking.text_ratio=0"], r"masking.text_ratio=0 leaves loss.mlm nothing to predict"),
    ("maskvlm", ["masking.image_ratio=0"], r"masking.image_ratio=0 leaves loss.mim nothing to predict"),
    ("mamo", ["masking.image_ratio=0"], r"leaves loss.mim_feat nothing to predict"),
])
def test_a_zero_masking_ratio_under_an_objective_that_needs_it_is_refused_up_front(recipe, overrides, message):
    # found at the first step before, and for MLM as "batch has no mlm_labels, so no mlm_query_positions"
    with pytest.raises(ConfigError, match=message):
        build_config(recipe, overrides=overrides)
    build_config(recipe, overrides=[*overrides, "loss.mlm=0", "loss.mim=0", "loss.mim_feat=0"])  # fine without them


@pytest.mark.parametrize("override,message", [
    # each of these ran before: log_every=0 crashed with ZeroDivisionError at the first step; the rest trained
    # something other than what was asked (a negative temperature, an empty caption, a mirror-only data set...)
    ("train.log_every=0", r"train.log_every=0: expected a positive number of steps"),
    ("model.temp=0", r"model.temp=0.0: expected a positive temperature"),
    ("data.hflip=2", r"data.hflip=2.0: expected a probability in \[0, 1\]"),
    ("data.max_text_len=2", r"data.max_text_len=2: expected at least 3"),
    ("loss.itc=-1", r"loss.itc=-1.0: expected a weight >= 0"),
    ("train.lr=-0.1", r"train.lr=-0.1: expected a learning rate >= 0"),
    ("train.keep_last=-1", r"train.keep_last=-1: expected a count >= 0 \(0: keep every checkpoint\)"),
    ("model.text_heads=-1", r"model.text_heads=-1: expected a positive integer"),
    ("model.hidden_dropout=1.5", r"model.hidden_dropout=1.5: expected a probability in \[0, 1\)"),
    ("data.crop_scale=[0.5]", r"data.crop_scale=\[0.5\]: expected 2 numbers"),
    ("train.betas=[0.9, 1.5]", r"train.betas=\[0.9, 1.5\]: expected 2 numbers, each in \[0, 1\)"),
    ("data.std=[0.2, 0, 0.2]", r"data.std=.*positive channel standard deviation"),
    ("train.freeze=[1]", r"train.freeze=\[1\]: expected a list of names"),
    # crashed with a shape error in the first step: MIM reads the image cross-modality encoder's output
    ("model.image_cross_layers=0", r"model.image_cross_layers=0: loss.mim read the output of that cross-modality"),
    # trained: ITM and MLM then never saw the image
    ("model.cross_layers=0", r"model.cross_layers=0: loss.itm, loss.mlm read"),
])
def test_numbers_out_of_range_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[override])


def test_zero_layers_are_fine_where_no_objective_reads_them_and_one_name_freezes():
    build_config(overrides=["model.image_cross_layers=0", "loss.mim=0"])
    build_config(overrides=["model.text_layers=0"])
    assert build_config(overrides=["train.freeze=visual_encoder"]).train.freeze == ["visual_encoder"]
    assert build_config(overrides=["train.keep_last=0", "train.save_every=0"]).train.keep_last == 0


def test_every_recipe_and_preset_is_in_range():
    for recipe in list_recipes():
        for preset in ("tiny", "small", "base"):
            build_config(recipe, preset)


def test_a_leading_tilde_in_a_path_setting_is_the_home_folder(tmp_path, monkeypatch):
    """`train.output_dir: ~/runs` in a YAML file (or --output-dir=~/runs, which no shell expands)
    made a folder named `~` in the working directory (before 2026-11-24)."""
    import os
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("train:\n  output_dir: ~/runs/a\ndata:\n  train: ~/d/one.json::~/d/two.json\n")
    cfg = build_config("maskvlm", config_file=str(tmp_path / "c.yaml"), overrides=["data.tokenizer=~/vocab.txt"])
    assert cfg.train.output_dir == os.path.join(str(tmp_path), "runs", "a")
    assert cfg.data.train == f"{tmp_path}/d/one.json::{tmp_path}/d/two.json"
    assert cfg.data.tokenizer == f"{tmp_path}/vocab.txt" and cfg.data.test is None


def test_a_config_file_indented_with_tabs_says_so(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n\tmax_steps: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML \(YAML indents with spaces, not tabs\)"):
        build_config("maskvlm", config_file=str(tmp_path / "c.yaml"))


def test_a_key_given_twice_in_a_config_file_is_an_error(tmp_path):
    """Plain YAML keeps the last: a second `train:` section silently dropped the first's settings."""
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.0001\n  max_steps: 3\ndata:\n  hflip: 0.5\ntrain:\n"
                                     "  warmup_steps: 1\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice in one mapping \(lines 1 and 6"):
        build_config("maskvlm", config_file=str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("train:\n  lr: 0.0001\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match="key 'lr' appears twice"):
        build_config("maskvlm", config_file=str(tmp_path / "d.yaml"))
