"""`align rm`: a LoRA reward model over TRL's RewardTrainer. The base gets a one-output score head (a sequence
classifier reading the last non-pad token); LoRA and the head train on the pairs `align dpo` reads, with the
Bradley-Terry loss -log sigmoid(score(chosen) - score(rejected)). No reference model.

The output is a plain PEFT sequence-classification adapter dir (the head saved through `modules_to_save`, as TRL
and PEFT do for SEQ_CLS) with its tokenizer; run.json records held-out pair accuracy (chosen scored strictly above
rejected) with a Wilson 95% interval, and the base and tokenizer a judge must match (align/train/reward_model.py).

Stages, in data-flow order: validate inputs -> load data -> load model -> build trainer -> train -> score the eval
pairs -> save. Every input check happens before the output dir is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from transformers import set_seed

from align.core.artifacts import Timer, partial_dir
from align.core.config import RMRecipe
from align.core.errors import AlignError
from align.core.models import LoadOptions, ResolvedModel, load_model, load_tokenizer, resolve_model, tokenizer_source
from align.train.methods import METHODS
from align.train.preference import PreferenceSplits, prepare_preference_data, trl_config
from align.train.reward_model import score_ids, tokenizer_record
from align.train.training import (
    check_run_inputs, estimated_steps, evaluate_at_saves, final_metrics, finish_training, finished_run, log_series,
    lora_config, plan_machine, prepare_quantized, progress_callback, quiet_trainer, run_config, run_record, train,
    trainer_arguments, training_run,
)

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


# ---- pair accuracy -----------------------------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (95% by default): unlike the normal approximation it stays
    inside [0, 1] and is not empty at 0 or n successes, which small eval splits hit."""
    if trials <= 0:
        raise ValueError("no trials")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def pair_accuracy(chosen: list[float], rejected: list[float]) -> dict[str, Any]:
    """Held-out pair accuracy: the share of pairs whose chosen answer scores strictly above the rejected one (a tie
    counts as wrong), with its Wilson 95% interval."""
    correct = sum(c > r for c, r in zip(chosen, rejected))
    low, high = wilson_interval(correct, len(chosen))
    return {"accuracy": correct / len(chosen), "ci95": [low, high], "interval": "wilson", "correct": correct,
            "pairs": len(chosen), "ties": sum(c == r for c, r in zip(chosen, rejected)),
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)}


def score_pairs(model: Any, dataset: Any, pad_token_id: int) -> dict[str, Any]:
    """Score every pair of a RewardTrainer's tokenized dataset (its chosen_ids / rejected_ids) with `model`."""
    chosen = score_ids(model, dataset["chosen_ids"], pad_token_id)
    rejected = score_ids(model, dataset["rejected_ids"], pad_token_id)
    return pair_accuracy(chosen, rejected)


# ---- checks before the output dir --------------------------------------------------------------------------------


MIN_EVAL_PAIRS = 2


def resolve_base(recipe: RMRecipe) -> ResolvedModel:
    """The base the head goes on. An adapter dir is refused: its LoRA was trained for next-token prediction."""
    resolved = resolve_model(recipe.model.name)
    if resolved.adapter is not None:
        raise AlignError(f"--model {recipe.model.name} is a LoRA adapter (on {resolved.base}): align rm trains a "
                         "reward head on a base model; give the base, or merge the adapter into it first")
    return resolved


def check_eval_pairs(recipe: RMRecipe, pairs: int) -> None:
    """An eval split asked for must hold enough pairs for an accuracy worth an interval."""
    spec = recipe.data
    if (spec.eval_path or spec.eval_size) and pairs < MIN_EVAL_PAIRS:
        where = f"--eval-data {spec.eval_path}" if spec.eval_path else f"--eval-size {spec.eval_size}"
        raise AlignError(f"{where} gives {pairs} eval pair{'s' * (pairs != 1)}: pair accuracy needs at least "
                         f"{MIN_EVAL_PAIRS}")


def check_pad_token(tokenizer: Any, config: Any) -> None:
    """RewardTrainer pads with train.pad_token, else the tokenizer's pad token, else EOS, and the head reads the last
    token that is not that one: it must exist and be in the vocabulary (TRL would raise inside the run)."""
    pad = getattr(config, "pad_token", None) or tokenizer.pad_token or tokenizer.eos_token
    if pad is None:
        raise AlignError("the tokenizer has no pad token and no EOS token: a reward model needs one to pad with "
                         "(set train.pad_token to a token of the vocabulary)")
    if pad not in tokenizer.get_vocab():
        raise AlignError(f"pad token {pad!r} is not in the tokenizer's vocabulary: the reward head could not find "
                         "each sequence's last token (give train.pad_token a token of the vocabulary)")


# ---- the run -----------------------------------------------------------------------------------------------------


def build_trainer(recipe: RMRecipe, base: ResolvedModel, tokenizer: Any, config: Any, data: PreferenceSplits,
                  gradient_checkpointing: bool, callbacks: list[Any]) -> Any:
    """The base as a one-output classifier and a fresh LoRA whose `modules_to_save` trains and saves the head."""
    from datasets import Dataset
    from trl import RewardTrainer

    model = load_model(base, LoadOptions(recipe.model.dtype, recipe.model.attn, recipe.model.quantize), tokenizer,
                       adapter="skip", num_labels=1)
    trainer = RewardTrainer(
        # SEQ_CLS: PEFT adds the head (`score`, or `classifier`) to modules_to_save, so it trains and is saved
        model=prepare_quantized(model, gradient_checkpointing), args=config, processing_class=tokenizer,
        peft_config=lora_config(recipe.lora, task="SEQ_CLS"), callbacks=callbacks,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
    )
    return quiet_trainer(trainer)


def pairs_kept(trainer: Any, data: PreferenceSplits) -> dict[str, Any]:
    """RewardTrainer drops every pair longer than max_length (it does not cut them): refuse a run left with no
    training pairs or too few eval pairs, warn when it dropped any; the record."""
    max_length = trainer.args.max_length
    kept = len(trainer.train_dataset)
    eval_kept = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    if kept == 0:
        raise AlignError(f"--max-length {max_length} drops all {len(data.train)} training pairs (RewardTrainer "
                         "drops a pair whose chosen or rejected sequence is longer): raise it")
    if data.eval and eval_kept < MIN_EVAL_PAIRS:
        raise AlignError(f"--max-length {max_length} leaves {eval_kept} of the {len(data.eval)} eval pairs: pair "
                         f"accuracy needs at least {MIN_EVAL_PAIRS}; raise it")
    if kept < len(data.train) or eval_kept < len(data.eval):
        log.warning("--max-length %s drops %d of %d training pairs and %d of %d eval pairs; raise it to keep them",
                    max_length, len(data.train) - kept, len(data.train), len(data.eval) - eval_kept, len(data.eval))
    return {"max_length": max_length, "pairs_read": len(data.train), "pairs_trained": kept,
            "eval_pairs_read": len(data.eval), "eval_pairs_scored": eval_kept}


def run_rm(recipe: RMRecipe, progress: bool = True) -> Path:
    """Train a LoRA reward model on preference pairs as the recipe says; return the finished output dir."""
    method = METHODS["rm"]
    out = check_run_inputs(recipe)
    if finished_run(recipe):
        return out
    timer = Timer()
    with timer.phase("resolve_model"):
        base = resolve_base(recipe)
        tokenizer = load_tokenizer(base, recipe.model.chat_template)
    with timer.phase("data"):
        data = prepare_preference_data(recipe)
    check_eval_pairs(recipe, len(data.eval))
    steps = estimated_steps(recipe.train, len(data.train))
    plan = plan_machine(recipe.model, recipe.train, recipe, method.name)
    args = trainer_arguments(recipe, plan, partial_dir(out))
    evaluate_at_saves(args, bool(data.eval), recipe.train)
    config = trl_config(method.config_class(), args)
    check_pad_token(tokenizer, config)

    with training_run(recipe, out, run_config(recipe, base, args, data.record)) as run:
        handle, checkpoint = run.handle, run.checkpoint
        with timer.phase("load_model"):
            set_seed(int(args["seed"]))  # the head and the LoRA are drawn from the global RNG
            trainer = build_trainer(recipe, base, tokenizer, config, data, plan.gradient_checkpointing,
                                    [progress_callback(steps, progress and run.writer), *run.callbacks()])
        data.record["truncation"] = pairs_kept(trainer, data)
        with timer.phase("train"):
            output = train(trainer, checkpoint, handle.path)
        run.raise_if_stopped(trainer.state.global_step)
        accuracy = None
        if data.eval:
            with timer.phase("eval"):
                trainer.evaluate()
                accuracy = score_pairs(trainer.model, trainer.eval_dataset, trainer.processing_class.pad_token_id)
        history = list(trainer.state.log_history)
        metrics = final_metrics(history, output)
        if accuracy is not None:
            metrics.update(pair_accuracy=accuracy["accuracy"], pair_accuracy_ci95=accuracy["ci95"])
        record = run_record(method.name, recipe, base, plan, args, data.record, history, metrics,
                            {**timer.phases, "total": timer.total()}, trainer.model,
                            extra={"reference": None, "pair_accuracy": accuracy, "resumed_from": checkpoint,
                                   "resume": run.resume,
                                   "reward_model": {"base": base.base, "num_labels": 1, "head": "score",
                                                    "tokenizer": tokenizer_record(trainer.processing_class,
                                                                                  tokenizer_source(base))}})
        plots = {"loss.png": log_series(history, "loss", "eval_loss"),
                 "accuracy.png": log_series(history, "accuracy", "eval_accuracy")}
        return finish_training(handle, method.name, trainer, trainer.processing_class, recipe, base, record, plots,
                               loader="AutoPeftModelForSequenceClassification", load_arguments=", num_labels=1")
