"""The ablation study driver: nested data subsets, resumable runs, the table and the plot."""

import json

import pytest

from maskvlm.ablation import CONFIGS, Study, report, run_study, subset_annotations
from maskvlm.cli import write_between_markers
from tests.conftest import MICRO


def test_subsets_are_nested_and_keep_every_caption_of_an_image(synthetic_dir, tmp_path):
    small = json.loads(subset_annotations(synthetic_dir / "train.json", 0.25, 3, tmp_path / "a.json").read_text())
    large = json.loads(subset_annotations(synthetic_dir / "train.json", 0.5, 3, tmp_path / "b.json").read_text())
    ids = lambda rows: {r["image_id"] for r in rows}  # noqa: E731
    assert ids(small) < ids(large)
    everything = json.loads((synthetic_dir / "train.json").read_text())
    per_image = {i: sum(1 for e in everything if e["image_id"] == i) for i in ids(small)}
    assert len(small) == sum(per_image.values())


def test_study_runs_each_config_once_and_reports(tmp_path):
    study = Study(out=tmp_path / "study", configs=["itc", "mlim"], fractions=[0.5, 1.0], seeds=[0],
                  pretrain_steps=2, finetune_steps=1, batch_size=8, size_overrides=list(MICRO),
                  extra_overrides=[f"data.synthetic.dir={tmp_path / 'data'}", "data.synthetic.num_val=4",
                                   "data.synthetic.num_test=6", "data.synthetic.image_size=32",
                                   "model.single_layers=1"],
                  num_train=16)
    rows = run_study(study)
    assert len(rows) == 4
    by = {(r["config"], r["fraction"]): r for r in rows}
    assert "zero_shot_r1" in by[("itc", 1.0)] and "zero_shot_r1" not in by[("mlim", 1.0)]  # MLIM has no ITC/ITM
    assert all("finetuned_r1" in r for r in rows)
    assert by[("itc", 0.5)]["train_pairs"] < by[("itc", 1.0)]["train_pairs"]
    lines = (tmp_path / "study" / "results.jsonl").read_text().splitlines()
    assert len(run_study(study)) == 4 and (tmp_path / "study" / "results.jsonl").read_text().splitlines() == lines
    study.pretrain_steps = 3
    with pytest.raises(ValueError, match="other step counts"):
        run_study(study)
    text = report(rows, tmp_path / "study", command="maskvlm ablate ...")
    assert "| itc |" in text and "| mlim | n/a | n/a |" in text and "50% data" in text
    assert (tmp_path / "study" / "ablation.png").stat().st_size > 1000


def test_a_stopped_run_is_not_recorded_and_the_same_command_continues_it(tmp_path, monkeypatch):
    # A Ctrl-C in a study's run used to be recorded as a finished run (fine-tuned from the half-trained
    # model, without its zero-shot figure) and the study went on; running the command again then
    # failed on the run folder's checkpoints.
    import contextlib
    import maskvlm.train.loop as loop
    from maskvlm.ablation import StudyStopped
    real, fits = loop.stop_requests, []

    class StopAfter(loop.StopRequest):  # a stop request during the third step
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls >= 3

    @contextlib.contextmanager
    def first_fit_stopped():
        fits.append(1)
        if len(fits) == 1:
            yield StopAfter()
        else:
            with real() as event:
                yield event
    monkeypatch.setattr(loop, "stop_requests", first_fit_stopped)
    study = Study(out=tmp_path / "study", configs=["itc"], fractions=[1.0], seeds=[0], pretrain_steps=6,
                  finetune_steps=1, batch_size=8, size_overrides=list(MICRO),
                  extra_overrides=[f"data.synthetic.dir={tmp_path / 'data'}", "data.synthetic.num_val=4",
                                   "data.synthetic.num_test=6", "data.synthetic.image_size=32"], num_train=16)
    with pytest.raises(StudyStopped, match=r"stopped during itc-f1-s0 \(pre-training at step 3\); it is not recorded"):
        run_study(study)
    assert not (tmp_path / "study" / "results.jsonl").exists()
    rows = run_study(study)  # continues the stopped run from its step-3 checkpoint
    assert len(rows) == 1 and "zero_shot_r1" in rows[0] and "finetuned_r1" in rows[0]
    from maskvlm.train.checkpoint import list_checkpoints, load_trainer_state
    pre = tmp_path / "study" / "runs" / "itc-f1-s0" / "pre"
    assert load_trainer_state(list_checkpoints(pre)[-1])["step"] == 6
    assert "resumed from" in (pre / "train.log").read_text()


def test_every_ablation_config_names_a_recipe():
    from maskvlm.config import list_recipes
    assert {recipe for recipe, _ in CONFIGS.values()} <= set(list_recipes())
    assert set(list_recipes()) <= set(CONFIGS)  # every recipe is in the study


def test_report_block_is_replaced_not_duplicated(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nother text\n")
    write_between_markers(path, "first\n", "ablation")
    write_between_markers(path, "second\n", "ablation")
    text = path.read_text()
    assert text.count("<!-- ablation:start -->") == 1 and "second" in text and "first" not in text
    assert text.startswith("# Results\n\nother text\n")
