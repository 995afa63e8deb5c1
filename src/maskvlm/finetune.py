"""The ``finetune`` and ``evaluate`` jobs of the downstream tasks: retrieval (ITC + ITM on the
pre-training objectives), VQA, NLVR2 and SNLI-VE (a classifier on the fused [CLS]). They run
on the same trainer, configuration, checkpoints and resume as pre-training."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from .config import Config, ConfigError, DataConfig, LossConfig, finetune_recipe, load_yaml, merge_into, parse_overrides
from .data.formats import DataError, PairDataset, PretrainCollator, RetrievalDataset
from .data.tokenizer import load_tokenizer
from .data.transforms import ImageTransform
from .models.io import MODEL_FILE, TOKENIZER_FILE, load_state, model_weights, read_config, read_weights
from .models.model import build_model
from .runtime import resolve_device
from .tasks.classify import ExampleCollator, ExampleDataset, FusedClassifier, predict
from .tasks.downstream import CLASSES_FILE, CLASSIFICATION_TASKS, ClassificationTask
from .tasks.pretrain import (PretrainTask, eval_transform, make_retrieval_eval, optimizer_steps_per_epoch,
                             prepare_data_paths)
from .tasks.retrieval import format_table
from .train.checkpoint import model_folder
from .train.distributed import init_from_env, is_main
from .train.logging import setup_logging
from .train.loop import Trainer, seed_everything

log = logging.getLogger("maskvlm")
DOWNSTREAM = ("retrieval",) + tuple(CLASSIFICATION_TASKS)


def build_finetune_config(task: str, init: Optional[str], config_file: Optional[str] = None,
                          overrides: Optional[list[str]] = None) -> Config:
    """The pre-trained model's architecture (and its image normalisation, text length, masking
    settings and synthetic-data settings) <- recipes/finetune/<task>.yaml <- user YAML <- overrides."""
    if task not in DOWNSTREAM:
        raise ConfigError(f"unknown task '{task}'; available: {', '.join(DOWNSTREAM)}")
    recipe = load_yaml(finetune_recipe(task))
    user = load_yaml(config_file) if config_file else {}
    if init is None:  # a saved --print-config (or task.init=PATH) names the pre-trained model itself
        for source in (user, parse_overrides(overrides or [])):
            task_keys = source.get("task")
            if isinstance(task_keys, dict) and task_keys.get("init"):
                init = str(task_keys["init"])
    if init is None:
        cfg = Config()  # resuming: the checkpoint's own config replaces this one
    else:
        base = read_config(model_folder(init))
        # Only the architecture carries over: the pre-training objectives, teacher and prototypes do not
        # (the task recipe names its own objectives; the loss defaults here are ITC + ITM).
        cfg = Config(recipe=base.recipe, preset=base.preset, model=base.model, masking=base.masking,
                     loss=LossConfig(mlm=0.0, mim=0.0))
        cfg.data = DataConfig(mean=base.data.mean, std=base.data.std, max_text_len=base.data.max_text_len,
                              synthetic=base.data.synthetic)
        cfg.task.init = str(init)
    cfg.task.name = task
    for source, data in ((str(finetune_recipe(task)), recipe), (config_file, user)):
        try:
            merge_into(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    merge_into(cfg, parse_overrides(overrides or []))
    cfg.validate()
    return cfg


def prepare_task_data(config: Config, progress: bool = True) -> None:
    """With no ``data.train``, point the task at the built-in synthetic data (generated once)."""
    d, name = config.data, config.task.name
    if d.train is not None:
        return
    if name == "retrieval":
        prepare_data_paths(config, progress)
        return
    from .data.synthetic_tasks import generate_task

    s = d.synthetic
    root = generate_task(name, Path(s.dir) / name, image_size=s.image_size, seed=s.seed, progress=progress)
    d.train, d.val, d.test = (str(root / f) for f in CLASSIFICATION_TASKS[name].synthetic_files)
    d.image_root = None


def finetune(config: Config, resume: Optional[str] = None, overrides: Optional[list[str]] = None,
             evaluate_test: bool = True) -> dict:
    """Fine-tune ``config.task.name`` starting from ``config.task.init`` (or continue ``resume``)."""
    from .pipeline import resolve_run, run_folder

    setup_logging()
    if init_from_env() and not is_main():  # under torchrun: DDP (or FSDP), rank 0 reports
        logging.getLogger("maskvlm").setLevel(logging.WARNING)
    wanted = config.task.name
    output_dir, checkpoint, config = resolve_run(config, resume, overrides)
    if config.task.name != wanted:
        raise ConfigError(f"{checkpoint} is a '{config.task.name}' run; it cannot be resumed as '{wanted}'")
    if checkpoint is None and not config.task.init:
        raise ConfigError("fine-tuning starts from a pre-trained model: pass --checkpoint PATH (task.init)")
    with run_folder(output_dir):
        return _finetune(config, checkpoint, output_dir, evaluate_test)


def _load_start(config: Config, checkpoint: Optional[Path]):
    """(model with the pre-trained weights unless resuming, tokenizer)."""
    source = checkpoint if checkpoint is not None else model_folder(config.task.init)
    tokenizer = load_tokenizer(source / TOKENIZER_FILE)
    seed_everything(config.train.seed)
    model = build_model(config)
    if hasattr(model, "modality_dropout"):  # single-stream models: drop one modality of a training pair
        model.modality_dropout = config.task.modality_dropout
    elif config.task.modality_dropout > 0:
        raise ConfigError("task.modality_dropout needs a single-stream model (model.arch=single_stream)")
    if checkpoint is None:
        load_state(model, model_weights(source), str(source / MODEL_FILE))
        log.info("initialised from %s", source)
    return model, tokenizer


def _train_transform(config: Config) -> ImageTransform:
    d = config.data
    return ImageTransform(config.model.image_size, d.mean, d.std, train=True, crop_scale=d.crop_scale, hflip=d.hflip,
                          reduced_decode=d.reduced_decode)


def _finetune(config: Config, checkpoint: Optional[Path], output_dir: Path, evaluate_test: bool) -> dict:
    from .pipeline import main_rank_first

    main_rank_first(lambda progress: prepare_task_data(config, progress), config.train.progress)
    model, tokenizer = _load_start(config, checkpoint)
    name, d = config.task.name, config.data
    if name == "retrieval":
        dataset = PairDataset(d.train, d.image_root, _train_transform(config), seed=config.train.seed,
                              swap_on_flip=True, max_pixels=d.max_image_pixels)
        # momentum.alpha > 0 (ALBEF's fine-tuning: 0.4): the teacher starts as a copy of the pre-trained
        # model, and the distillation weight ramps up over the first epoch unless alpha_warmup_steps is set
        module = PretrainTask(model, config, optimizer_steps_per_epoch(config, len(dataset)))
        if module.teacher is not None:
            mo = config.momentum
            log.info("EMA teacher (decay %g): ITC queue of %d, momentum distillation weight %g (ramped over %d "
                     "steps)", mo.decay, mo.queue_size, mo.alpha, module.alpha_warmup)
        collator = PretrainCollator(tokenizer, d.max_text_len)
        evaluate = make_retrieval_eval(model, tokenizer, config, d.val) if d.val else None
        extra, spec, classes = {}, None, None
    else:
        spec = CLASSIFICATION_TASKS[name]
        train_examples, train_files, train_sizes = spec.load_training(d.train, d.image_root)
        classes = _classes(spec, train_examples, config, checkpoint)
        lost = spec.attach(train_examples, classes)
        if lost:
            log.info("%d of %d training questions have no answer in the %d-answer vocabulary (kept; their target "
                     "is all zeros)", lost, len(train_examples), len(classes))
        module = FusedClassifier(model, len(classes), spec.num_images, config.task.head_hidden, spec.soft)
        dataset = ExampleDataset(train_examples, _train_transform(config), seed=config.train.seed, files=train_files,
                                 sizes=train_sizes)
        collator = ExampleCollator(tokenizer, d.max_text_len, len(classes) if spec.soft else 0)
        evaluate = _classification_eval(spec, module, tokenizer, config, classes, d.val)[0] if d.val else None
        extra = {CLASSES_FILE: classes}
    # the test split is read now (its loader looks for every image): a missing one is an error before training
    test_data = None
    if evaluate_test and d.test:
        test_data = RetrievalDataset(d.test, d.image_root, eval_transform(config)) if name == "retrieval" \
            else spec.load(d.test, d.image_root)
    log.info("fine-tuning %s on %s (%d training examples) from %s", name, d.train, len(dataset),
             checkpoint or config.task.init)
    trainer = Trainer(module, config, dataset, collator, output_dir, tokenizer, evaluate, extra_files=extra)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    start = time.perf_counter()
    train_metrics = trainer.fit()
    result = {"task": name, "train": train_metrics, "train_seconds": time.perf_counter() - start,
              "step": trainer.step, "interrupted": trainer.interrupted, "stopped_early": trainer.stopped_early,
              "checkpoint": str(trainer.last_checkpoint),
              "output_dir": str(output_dir)}
    # every rank evaluates (each a share of the work); rank 0 reports
    main = is_main()
    if trainer.interrupted:
        return result
    for split, path in (("val", d.val), ("test", d.test if evaluate_test else None)):
        if not path:
            continue
        weights = trainer.use_best_for_test() if split == "test" else ""
        read = test_data if split == "test" else None
        if name == "retrieval":
            metrics = trainer.run_evaluation(make_retrieval_eval(model, tokenizer, config, path,
                                                                 progress=config.train.progress and main, dataset=read))
            title = f"fine-tuned retrieval on {path}"
        else:
            run, examples = _classification_eval(spec, module, tokenizer, config, classes, path,
                                                 predictions=output_dir / f"predictions_{split}.json" if main else None,
                                                 examples=read)
            metrics = trainer.run_evaluation(run)
            if name == "vqa":
                metrics["vqa_prior_acc"] = question_prior_accuracy(train_examples, examples)
            title = f"{spec.title} on {path}"
        title += weights
        if split == "val":
            trainer.record_val(metrics)  # the final weights count too
        if main:
            print(format_table(metrics, title, config.eval.score) if name == "retrieval"
                  else format_metrics(spec, metrics, title))
        result[split] = metrics
    if not main:
        return result
    result["best"] = trainer.best
    with open(output_dir / "results.json", "w") as f:
        json.dump(result, f, indent=2)
    return result


def _classes(spec: ClassificationTask, train_examples, config: Config, checkpoint: Optional[Path]) -> list[str]:
    if checkpoint is not None and (checkpoint / CLASSES_FILE).is_file():
        with open(checkpoint / CLASSES_FILE) as f:
            return json.load(f)
    classes = spec.build_classes(train_examples, config)
    if spec.soft:
        log.info("answer vocabulary: %d answers (task.num_answers=%d)", len(classes), config.task.num_answers)
    return classes


def _classification_eval(spec: ClassificationTask, module: FusedClassifier, tokenizer, config: Config,
                         classes: list[str], path: str, predictions: Optional[Path] = None,
                         image_root: Optional[str] = None, progress: bool = False, examples=None,
                         on_names: Optional[Callable[[list[str]], None]] = None):
    """(zero-argument function returning the metrics on ``path``, its examples); with
    ``predictions`` the predictions file is written too, and ``on_names`` receives the predicted
    class names."""
    examples = examples or spec.load(path, image_root or config.data.image_root)
    dataset = ExampleDataset(examples, eval_transform(config))
    collator = ExampleCollator(tokenizer, config.data.max_text_len)
    device = resolve_device(config.train.device)

    def run() -> dict:
        logits = predict(module, dataset, collator, config.eval.batch_size, device, config.train.precision,
                         progress=progress, split_over_ranks=True)
        metrics, names = spec.score(logits, examples, classes)
        if on_names is not None:
            on_names(names)
        if predictions is not None:
            spec.write_predictions(predictions, names, examples)
            log.info("predictions written: %s", predictions)
        return metrics
    return run, examples


def question_prior_accuracy(train_examples, examples) -> float:
    """VQA accuracy of answering each question with the most common training answer of its first
    three words ("how many circles", "is there a"): what the question alone gets right."""
    from .tasks.vqa import normalize_answer, vqa_accuracy

    by_prefix: dict[str, Counter] = {}
    overall: Counter = Counter()
    for ex in train_examples:
        answers = [normalize_answer(a) for a in ex.answers or []]
        by_prefix.setdefault(" ".join(ex.text.lower().split()[:3]), Counter()).update(answers)
        overall.update(answers)
    scored = []
    for ex in examples:
        if ex.answers:
            counts = by_prefix.get(" ".join(ex.text.lower().split()[:3])) or overall
            scored.append(vqa_accuracy(counts.most_common(1)[0][0], ex.answers))
    return 100.0 * sum(scored) / max(1, len(scored))


def format_metrics(spec: ClassificationTask, metrics: dict, title: str) -> str:
    if not metrics:  # a test split without labels (VQA test-dev, NLVR2 test-U): predictions only
        return f"{title}: the file has no {'answers' if spec.soft else 'labels'}, so nothing is scored"
    lines = [title]
    for key, value in metrics.items():
        lines.append(f"  {key:24s}{value:8.2f}")
    if spec.chance is not None:
        lines.append(f"  {'chance':24s}{spec.chance:8.2f}")
    return "\n".join(lines)


def evaluate_task(task: str, checkpoint: str, data: Optional[str] = None, image_root: Optional[str] = None,
                  device: Optional[str] = None, precision: Optional[str] = None, batch_size: Optional[int] = None,
                  predictions: Optional[str] = None, progress: bool = True, report: bool = True,
                  by_question_type: bool = False) -> dict:
    """Evaluate a fine-tuned VQA / NLVR2 / SNLI-VE checkpoint on ``data`` (default: its data.test).
    Under torchrun (every rank calling it) each rank predicts a share of the examples; ``report``:
    print the figures (rank 0). ``by_question_type`` (VQA): also the official per-question-type
    table, returned under ``question_types``."""
    spec = CLASSIFICATION_TASKS[task]
    if by_question_type and not spec.soft:
        raise ValueError(f"by_question_type is a VQA breakdown, not one of {task}")
    folder = model_folder(checkpoint)
    config = read_config(folder)
    if config.task.name != task:
        raise ConfigError(f"{folder} is a '{config.task.name}' checkpoint, not a fine-tuned '{task}' model")
    if not (folder / CLASSES_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {CLASSES_FILE} (the task's classes are saved with every checkpoint)")
    with open(folder / CLASSES_FILE) as f:
        classes = json.load(f)
    if device:
        config.train.device = device
    if precision:
        config.train.precision = precision
    if batch_size:
        config.eval.batch_size = batch_size
    path = data or config.data.test
    if not path:
        raise DataError("no --data given and the checkpoint's config has no data.test")
    root = image_root if data else (image_root or config.data.image_root)
    examples = spec.load(path, root)  # data errors first, before any model work
    tokenizer = load_tokenizer(folder / TOKENIZER_FILE)
    module = FusedClassifier(build_model(config), len(classes), spec.num_images, config.task.head_hidden, spec.soft)
    load_state(module, read_weights(folder / MODEL_FILE), str(folder / MODEL_FILE))
    module.to(resolve_device(config.train.device))
    predicted: list[str] = []
    run, examples = _classification_eval(spec, module, tokenizer, config, classes, path,
                                         Path(predictions) if predictions else None, root, progress, examples,
                                         on_names=predicted.extend)
    metrics = run()
    if report:
        text = format_metrics(spec, metrics, f"{spec.title} on {path} ({len(examples)} examples)")
        if not metrics:
            text += f"; predictions written to {predictions}" if predictions else "; --predictions FILE writes them"
        print(text)
    if by_question_type and metrics:
        from .tasks.vqa import accuracy_by_question_type, format_question_types

        rows = accuracy_by_question_type(predicted, examples)
        if report:
            print(format_question_types(rows))
        metrics["question_types"] = rows
    return metrics
