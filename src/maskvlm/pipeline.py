"""The ``pretrain`` job end to end: data (synthetic scenes if none given), tokenizer, model,
objectives, trainer, then zero-shot retrieval on the test split."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from .config import Config, merge_into, objectives_train, parse_overrides, trained_heads
from .folder_lock import FolderInUse, hold_folder
from .data.formats import PairDataset, PretrainCollator
from .data.tokenizer import load_tokenizer, train_wordpiece
from .data.transforms import ImageTransform
from .models.io import MODEL_FILE, TOKENIZER_FILE, load_state, model_weights, read_config, unique_state_dict
from .models.model import build_model
from .tasks.pretrain import (PretrainTask, make_retrieval_eval, needs_image_mask, needs_text_mask,
                             optimizer_steps_per_epoch, prepare_data_paths)
from .tasks.retrieval import format_table
from .train.checkpoint import list_checkpoints, model_folder, resolve_resume
from .train.distributed import barrier, broadcast_object, init_from_env, is_main
from .train.logging import log_to_file, setup_logging
from .train.loop import Trainer, seed_everything

log = logging.getLogger("maskvlm")


def default_output_dir(config: Config) -> Path:
    """``runs/[task-]recipe-preset-time``, made here: a name no other run has. Runs started in the
    same second (a sweep sent to the background) get ``-2``, ``-3``, ... rather than one folder."""
    job = "" if config.task.name == "pretrain" else f"{config.task.name}-"
    base = Path("runs") / f"{job}{config.recipe}-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir()  # atomic: exactly one process creates a given name
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: no free run folder name; pass --output-dir")


def pretrain(config: Config, resume: Optional[str] = None, overrides: Optional[list[str]] = None,
             evaluate_test: bool = True) -> dict:
    """Run pre-training; returns {"train": last train metrics, "test": test retrieval metrics, ...}.

    With ``resume``, the checkpoint's own ``config.yaml`` is used (so the architecture cannot change
    by accident) and only ``overrides`` (``key=value`` strings, e.g. ``train.max_steps=900``) are
    applied on top; ``config`` then only supplies ``train.output_dir``."""
    setup_logging()
    if init_from_env() and not is_main():
        logging.getLogger("maskvlm").setLevel(logging.WARNING)  # rank 0 reports; the others only warn
    output_dir, checkpoint, config = resolve_run(config, resume, overrides)
    with run_folder(output_dir):
        return _pretrain(config, checkpoint, output_dir, evaluate_test)


@contextlib.contextmanager
def run_folder(output_dir: Path):
    """While a run works in ``output_dir``: it is the folder's only writer (``folder_lock``; rank 0
    holds it for all ranks, and its refusal is raised on every rank) and rank 0 logs to its
    ``train.log``."""
    with contextlib.ExitStack() as stack:
        error = None
        if is_main():
            try:
                stack.enter_context(hold_folder(output_dir, "training run",
                                                "pass another --output-dir (train.output_dir)"))
            except FolderInUse as e:
                error = str(e)
        error = broadcast_object(error)
        if error is not None:
            raise FolderInUse(error)
        if is_main():
            stack.enter_context(log_to_file(output_dir))
        yield


def resolve_run(config: Config, resume: Optional[str], overrides: Optional[list[str]]):
    output_dir = Path(config.train.output_dir) if config.train.output_dir else None
    checkpoint = _resume_point(resume, output_dir) if resume else None
    if resume and checkpoint is None:
        log.info("--resume auto: no checkpoint in %s yet; starting from scratch", output_dir)
    if checkpoint is not None:
        # The run's own configuration wins; command-line key=value overrides still apply (e.g. more steps).
        config = read_config(checkpoint)
        merge_into(config, parse_overrides(overrides or []))
        config.validate()
        _check_run_data(config, checkpoint)
        output_dir = output_dir or checkpoint.parent.parent
    if checkpoint is None:
        record_trained_heads(config)
    if output_dir is None:
        output_dir = default_output_dir(config) if is_main() else None
    output_dir = Path(broadcast_object(str(output_dir)))  # rank 0's folder for all ranks
    config.train.output_dir = str(output_dir)
    if checkpoint is None and list_checkpoints(output_dir):
        raise FileExistsError(f"{output_dir} already holds checkpoints; pass --resume auto to continue that run "
                              "or choose another --output-dir")
    return output_dir, checkpoint, config


def _check_run_data(config: Config, checkpoint: Path) -> None:
    """The files a resumed run reads come from its own config: one that has moved since is named with
    how to point the run at it."""
    d = config.data
    for key, value in (("data.train", d.train), ("data.val", d.val), ("data.test", d.test),
                       ("data.image_root", d.image_root)):
        for path in (value.split("::") if value else []):
            if not Path(path).exists():
                raise FileNotFoundError(f"{path} is gone: the run in {checkpoint.parent.parent} was trained with "
                                        f"{key}={value} (its config.yaml). If the data has moved, resume with "
                                        f"{key}=NEW_PATH as well")


def _resume_point(resume: str, output_dir: Optional[Path]) -> Optional[Path]:
    """The checkpoint ``resume`` names (``resolve_resume``): rank 0 reads and checks the files and tells
    the other ranks, and its error, if any, is raised on every rank."""
    found, error = None, None
    if is_main():
        try:
            found = resolve_resume(resume, output_dir)
        except (ValueError, FileNotFoundError) as e:
            error = (isinstance(e, FileNotFoundError), str(e))
    found, error = broadcast_object((None if found is None else str(found), error))
    if error is not None:
        raise (FileNotFoundError if error[0] else ValueError)(error[1])
    return None if found is None else Path(found)


def record_trained_heads(config: Config) -> None:
    """``task.trained`` of a run that starts now: the heads its objectives train plus those its starting
    model (``task.init``) had trained; unknown (None) when the starting model's record is."""
    inherited: Optional[set[str]] = set()
    if config.task.init:
        inherited = trained_heads(read_config(model_folder(config.task.init)))
    config.task.trained = None if inherited is None else sorted(inherited | objectives_train(config))


def init_from_model(model, source: Path) -> None:
    """Continued pre-training: ``model`` starts from the weights of the maskvlm model in ``source``.
    A tensor of another shape is an error; tensors only one side has are listed (new ones keep their
    initial weights, e.g. a mask token that visible-only training never had)."""
    missing, unexpected = load_state(model, model_weights(source), str(source / MODEL_FILE), strict=False)
    loaded = len(unique_state_dict(model)) - len(missing)
    log.info("initialised from %s: %d tensors loaded%s%s", source, loaded,
             f"; new (initial weights): {', '.join(missing)}" if missing else "",
             f"; not used by this model: {', '.join(unexpected)}" if unexpected else "")


def embedding_rows(config: Config, tokenizer, source: Optional[Path]) -> int:
    """``model.vocab_size``: the word-embedding rows. A maskvlm model to resume or continue from keeps
    its own; a Hugging Face ``model.text_init`` folder keeps its config.json's where that is more than
    its tokenizer has (vocabularies padded to a multiple of 8 or 64), and gains fresh rows for the
    tokens it lacks (added to the tokenizer, embeddings not resized). The rows past the tokenizer's
    ids are never targets nor random MLM replacements."""
    if source is not None:
        rows = read_config(source).model.vocab_size
        if rows < tokenizer.vocab_size:
            raise ValueError(f"{source}: its tokenizer has {tokenizer.vocab_size} tokens but the model "
                             f"model.vocab_size={rows} embedding rows")
        return rows
    if not config.model.text_init:
        return tokenizer.vocab_size
    from .models.hf_text import read_hf_config
    rows = read_hf_config(config.model.text_init).get("vocab_size", tokenizer.vocab_size)
    if rows < tokenizer.vocab_size:
        log.warning("%s: the tokenizer has %d tokens but config.json's vocab_size is %d; ids %d-%d get new "
                    "(untrained) embedding rows", config.model.text_init, tokenizer.vocab_size, rows, rows,
                    tokenizer.vocab_size - 1)
    elif rows > tokenizer.vocab_size:
        log.info("%s: %d embedding rows for %d tokens (config.json's vocab_size; the %d extra rows are unused)",
                 config.model.text_init, rows, tokenizer.vocab_size, rows - tokenizer.vocab_size)
    return max(rows, tokenizer.vocab_size)


def modality_aware(config: Config):
    mk = config.masking
    return (mk.modality_probs, mk.heavy_ratio, mk.light_ratio) if mk.modality_aware else None


def main_rank_first(prepare: Callable[[bool], None], progress: bool) -> None:
    """Run ``prepare(progress)`` on rank 0, then on the other ranks: data generated once by rank 0 is
    complete when the others look for it."""
    if is_main():
        prepare(progress)
    barrier()
    if not is_main():
        prepare(False)


def _pretrain(config: Config, checkpoint: Optional[Path], output_dir: Path, evaluate_test: bool) -> dict:
    main_rank_first(lambda progress: prepare_data_paths(config, progress), config.train.progress)


    d, m = config.data, config.model
    transform = ImageTransform(m.image_size, d.mean, d.std, train=True, crop_scale=d.crop_scale, hflip=d.hflip,
                               reduced_decode=d.reduced_decode)
    if d.shards:
        from .data.stream import open_stream
        dataset = open_stream(d.shards.split("::"), d.shard_weights, transform, seed=config.train.seed,
                              shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
                              samples_per_epoch=d.samples_per_epoch, two_views=config.loss.proto > 0,
                              max_pixels=d.max_image_pixels)
    else:
        dataset = PairDataset(d.train, d.image_root, transform, seed=config.train.seed,
                              two_views=config.loss.proto > 0, max_pixels=d.max_image_pixels)

    init = model_folder(config.task.init) if config.task.init and checkpoint is None else None
    if checkpoint is not None or init is not None:
        tokenizer = load_tokenizer((checkpoint or init) / TOKENIZER_FILE)
    elif m.text_init:
        tokenizer = load_tokenizer(m.text_init)  # the text weights come with their vocabulary
    elif d.tokenizer:
        tokenizer = load_tokenizer(d.tokenizer)
    else:
        captions = dataset.captions()
        tokenizer = train_wordpiece(captions, d.vocab_size)
        log.info("trained a WordPiece tokenizer on %d captions: %d tokens", len(captions), tokenizer.vocab_size)
    config.model.vocab_size = embedding_rows(config, tokenizer, checkpoint or init)

    seed_everything(config.train.seed)
    model = build_model(config)
    if m.text_init and checkpoint is None:
        from .models.hf_text import init_text_from_hf
        report = init_text_from_hf(model, m.text_init, m.text_layers, m.cross_layers)
        log.info("text initialisation from %s", report.summary())
    if m.image_init and checkpoint is None:
        from .models.hf_vision import init_vision
        report = init_vision(model.visual_encoder, m.image_init, prefix="visual_encoder.")
        log.info("image initialisation from %s", report.summary())
    if init is not None:
        init_from_model(model, init)
    task = PretrainTask(model, config, optimizer_steps_per_epoch(config, len(dataset)))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("recipe %s, preset %s: %.1fM parameters, objectives %s", config.recipe, config.preset, n_params / 1e6,
             ", ".join(f"{k}x{v:g}" for k, v in task.weights.items()))

    grid = (m.image_size // m.patch_size,) * 2
    fixed_len = d.fixed_text_len or "reduce-overhead" in (config.train.compile_mode or "")
    if fixed_len:
        log.info("captions padded to data.max_text_len=%d in every batch (fixed shapes)", d.max_text_len)
    collator = PretrainCollator(tokenizer, d.max_text_len,
                                text_ratio=config.masking.text_ratio if needs_text_mask(config) else 0.0,
                                image_ratio=config.masking.image_ratio if needs_image_mask(config) else 0.0,
                                grid=grid, image_block=1 if config.masking.image_policy == "random"
                                else config.masking.image_block, modality_aware=modality_aware(config),
                                fixed_len=fixed_len)
    aligned = config.loss.itc > 0 or config.loss.itm > 0  # retrieval needs a trained ITC or ITM head
    if not aligned:
        log.info("no ITC/ITM objective in this recipe: zero-shot retrieval is skipped (fine-tune retrieval instead)")
    evaluate = make_retrieval_eval(model, tokenizer, config, d.val) if d.val and aligned else None
    # the test split is read now: a missing image is an error before training, not after it
    test_eval = make_retrieval_eval(model, tokenizer, config, d.test, progress=config.train.progress and is_main()) \
        if evaluate_test and d.test and aligned else None
    trainer = Trainer(task, config, dataset, collator, output_dir, tokenizer, evaluate)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    log.info("training %d steps of %d pairs on %s (%s), output in %s", config.train.max_steps,
             config.train.batch_size * config.train.grad_accum, trainer.device, config.train.precision, output_dir)
    start = time.perf_counter()
    train_metrics = trainer.fit()
    result = {"train": train_metrics, "train_seconds": time.perf_counter() - start, "step": trainer.step,
              "interrupted": trainer.interrupted, "stopped_early": trainer.stopped_early,
              "checkpoint": str(trainer.last_checkpoint),
              "output_dir": str(output_dir)}
    if evaluate_test and not d.test and aligned:
        log.info("no test file (--test-data / data.test): zero-shot retrieval at the end is skipped")
    ends = not trainer.interrupted  # every rank evaluates: the work is split over the ranks
    if evaluate is not None and ends and config.eval.keep_best:  # the final weights' val figures, for the best choice
        trainer.record_val(trainer.run_evaluation(evaluate))
        result["best"] = trainer.best
    if test_eval is not None and ends:
        weights = trainer.use_best_for_test()
        test = trainer.run_evaluation(test_eval)
        if not is_main():
            return result
        result["test"] = test
        print(format_table(test, f"zero-shot retrieval on {d.test}{weights}", config.eval.score))
        with open(output_dir / "results.json", "w") as f:
            json.dump(result, f, indent=2)
    return result
