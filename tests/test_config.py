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
    ("train.lrr=1", "unknown config key 'train.lrr'; valid keys here: .*batch_size.*lr"),
    ("modle.x=1", "unknown config key 'modle'"),
    ("train.max_steps=ten", "train.max_steps='ten': expected int"),
    ("masking.image_ratio=1.0", r"masking.image_ratio=1.0: expected a ratio in \[0, 1\)"),
    ("masking.text_ratio=-0.1", "masking.text_ratio"),
    ("train.batch_size=0", "train.batch_size=0: expected a positive integer"),
    ("masking.mode=both", "masking.mode='both': expected one of 'separate', 'joint'"),
    ("model.image_size=30", "not a multiple of model.patch_size"),
    ("train", "expected the form key.sub=value"),
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
