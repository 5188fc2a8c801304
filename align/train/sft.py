"""`align sft`: supervised fine-tuning of a LoRA adapter with TRL's SFTTrainer.

Stages, in data-flow order: validate inputs -> load data -> load model -> build trainer -> train -> save.
Every input check happens before the output dir is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.core.artifacts import Timer, partial_dir
from align.core.config import DataSpec, MixtureSource, SFTRecipe
from align.core.data import Rows, fingerprint_rows, hold_out, load_sft_data, normalize_sft_rows, tokenize_sft_rows
from align.core.errors import AlignError
from align.core.mixture import Mixture, mix_sources
from align.core.models import LoadOptions, load_model, load_tokenizer, resolve_model
from align.core.template import template_contract
from align.train.training import (
    attach_lora, check_run_inputs, continued_lora, finished_run, estimated_steps, evaluate_at_saves, final_metrics,
    finish_training, log_series, plan_machine, progress_callback, quiet_trainer, run_config, run_record, train,
    trainer_arguments, training_run,
)
from align.train.truncation import check_eval_kept, check_truncation, numbered, shortest_keeping, sft_truncation


@dataclass
class SFTData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    record: dict[str, Any]
    locations: list[str]
    """Where each training row came from (file and line)."""


def prepare_sft_data(recipe: SFTRecipe, tokenizer: Any) -> SFTData:
    """Read, validate, normalize and tokenize; hold out an eval split when asked."""
    spec = recipe.data
    mixture = sft_mixture(spec, recipe.train_seed) if spec.mixture else None
    rows, fmt, raw = mixture.as_loaded() if mixture else load_sft_data(spec.path, spec.format, spec.split, spec.limit,
                                                                       spec.skip_invalid, spec.config)
    locations = raw.kept
    eval_rows: list[dict[str, Any]] = []
    if spec.eval_path:
        eval_rows, _, _ = load_sft_data(spec.eval_path, spec.format, spec.eval_split, None, spec.skip_invalid,
                                        spec.eval_config)
    elif spec.eval_size > 0:
        rows, eval_rows = hold_out(rows, spec.eval_size, recipe.train_seed, raw.source)
        locations, _ = hold_out(locations, spec.eval_size, recipe.train_seed, raw.source)
    train = tokenize_sft_rows(tokenizer, rows, spec.loss_on)
    if not any(any(label != -100 for label in t["labels"]) for t in train):
        raise AlignError(f"{spec.path}: no row has any token to learn from (loss_on={spec.loss_on})")
    record = {
        "source": "data.mixture" if mixture else spec.path,
        "format": fmt,
        "rows": len(rows),
        "eval_rows": len(eval_rows),
        "skipped_invalid": raw.skipped,
        "fingerprint": fingerprint_rows(rows),
        "eval_fingerprint": fingerprint_rows(eval_rows) if eval_rows else None,
        "mixture": mixture.sources if mixture else None,
    }
    if raw.skipped:
        import logging

        logging.getLogger(__name__).warning("skipped %d invalid rows (first: %s)", raw.skipped, raw.problems[0])
    return SFTData(train, tokenize_sft_rows(tokenizer, eval_rows, spec.loss_on), record, locations)


def sft_mixture(spec: DataSpec, seed: int) -> Mixture:
    """data.mixture: each source read and sampled with the seed on its own, then normalized."""
    def normalize(source: MixtureSource, rows: Rows) -> tuple[list[dict[str, Any]], str]:
        normalized, fmt, _ = normalize_sft_rows(rows, source.format or spec.format, spec.skip_invalid)
        return normalized, fmt

    return mix_sources(spec.mixture or [], normalize, seed, spec.limit)


def sft_config(args: dict[str, Any]) -> Any:
    from trl import SFTConfig

    try:
        return SFTConfig(**args)
    except (TypeError, ValueError) as exc:
        raise AlignError(f"invalid train settings: {str(exc).splitlines()[0]}") from None


def run_sft(recipe: SFTRecipe, progress: bool = True) -> Path:
    """Train a LoRA adapter as the recipe says; return the finished output dir."""
    from trl import SFTTrainer

    out = check_run_inputs(recipe)
    if finished_run(recipe):
        return out
    timer = Timer()
    with timer.phase("resolve_model"):
        resolved = resolve_model(recipe.model.name)
        recipe = continued_lora(recipe, resolved.adapter)
        tokenizer = load_tokenizer(resolved, recipe.model.chat_template)
    with timer.phase("data"):
        data = prepare_sft_data(recipe, tokenizer)
    steps = estimated_steps(recipe.train, len(data.train))
    plan = plan_machine(recipe.model, recipe.train, recipe, "sft",
                        lengths=[len(row["input_ids"]) for row in data.train])
    args = trainer_arguments(recipe, plan, partial_dir(out))
    evaluate_at_saves(args, bool(data.eval), recipe.train)
    config = sft_config(args)

    with training_run(recipe, out, run_config(recipe, resolved, args, data.record)) as run:
        handle, checkpoint = run.handle, run.checkpoint
        with timer.phase("load_model"):
            options = LoadOptions(recipe.model.dtype, recipe.model.attn, recipe.model.quantize)
            model = load_model(resolved, options, tokenizer, adapter="trainable")
            model = attach_lora(model, recipe.lora, plan.gradient_checkpointing, int(args["seed"]))
        trainer = quiet_trainer(SFTTrainer(
            model=model,
            args=config,
            train_dataset=numbered(data.train),
            eval_dataset=numbered(data.eval) if data.eval else None,
            processing_class=tokenizer,
            callbacks=[progress_callback(steps, progress and run.writer), *run.callbacks()],
        ))
        data.record["truncation"] = check_truncation(sft_truncation(trainer, data.train, data.locations),
                                                     shortest_keeping(data.train[0]["labels"], config.truncation_mode))
        check_eval_kept(trainer, len(data.eval))
        with timer.phase("train"):
            output = train(trainer, checkpoint, handle.path)
        run.raise_if_stopped(trainer.state.global_step)
        history = [h for h in trainer.state.log_history]
        metrics = final_metrics(history, output)
        record = run_record("sft", recipe, resolved, plan, args, data.record, history, metrics,
                            {**timer.phases, "total": timer.total()}, trainer.model,
                            extra={"resumed_from": checkpoint, "resume": run.resume,
                                   "template": template_contract(tokenizer, model)})
        plots = {"loss.png": log_series(history, "loss", "eval_loss")}
        return finish_training(handle, "sft", trainer, tokenizer, recipe, resolved, record, plots)
