"""`align kto`: KTO (Ethayarajh et al. 2024) over TRL's KTOTrainer: each example is one answer with a thumbs up or
down, scored against the reference's log-ratio and a KL estimate, so unpaired feedback trains as pairs do.

The reference is DPO's (align/train/reference.py): the frozen SFT adapter, the adapter-disabled base, precomputed
log-probs or a separate model, one base in memory, checked at step 0 (policy = reference: every reward and the KL
estimate 0, each example's loss 1/2 times its class weight). Pairs split in two (`--from-pairs`, or by default when the
data holds pairs) give one desirable and one undesirable example each. Class weights balance the two classes, as the
KTO paper recommends (desirable weight x desirable examples = undesirable weight x undesirable examples), unless set.

Stages, in data-flow order: validate inputs -> load data -> load models -> build trainer -> check reference -> train
-> save. Every input check happens before the output dir is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from align.core.artifacts import Timer, partial_dir
from align.core.config import KTORecipe
from align.core.data import Rows, fingerprint_rows, hold_out, read_rows
from align.core.errors import AlignError
from align.core.models import ResolvedModel, load_tokenizer
from align.core.preferences import (
    detect_preference_format, detect_unpaired_format, normalize_preference_rows, normalize_unpaired_rows,
)
from align.train.preference import REWARD_KEYS, final_rewards
from align.train.reference import (
    ReferencePlan, Step0Rule, check_reference_at_step0, choose_reference, plan_reference, reference_arguments,
)
from align.train.reference import build_trainer as build_reference_trainer
from align.train.truncation import (
    check_eval_kept, check_prompts_fit, check_truncation, kto_truncation, prompt_lengths,
)
from align.train.training import (
    check_run_inputs, continued_lora, estimated_steps, evaluate_at_saves, final_metrics, finish_training,
    finished_run, log_series, plan_machine, progress_callback, quiet_trainer, run_config, run_record, train,
    trainer_arguments, training_run,
)

KTO_REWARD_KEYS = (*REWARD_KEYS, "kl")


# ---- data --------------------------------------------------------------------------------------------------------


@dataclass
class LabelledSplits:
    train: list[dict[str, Any]]
    """TRL's unpaired form: {prompt, completion, label}, conversational."""
    eval: list[dict[str, Any]]
    record: dict[str, Any]
    locations: list[str]
    """Where each training example came from (file and line; both halves of a split pair name its line)."""


def split_pairs(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair as its chosen answer (desirable) and its rejected one (undesirable), prompt shared."""
    return [example for pair in pairs for example in (
        {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
        {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})]


def labelled(rows: Rows, recipe: KTORecipe) -> tuple[list[dict[str, Any]], str, bool]:
    """(examples, format, from pairs): the rows as labelled completions, read as pairs and split where the data
    holds pairs (`--from-pairs`, or detected when unset). `rows.kept` then names each example's row."""
    spec = recipe.data
    first = rows.rows[0] if rows.rows else {}
    from_pairs = spec.from_pairs
    if from_pairs is None:
        from_pairs = detect_unpaired_format(first) is None and detect_preference_format(first) is not None
    if from_pairs:
        loaded = normalize_preference_rows(rows, spec.format, spec.skip_invalid, spec.pairs, spec.score_margin)
        rows.kept = [location for location in rows.kept for _ in ("chosen", "rejected")]
        return split_pairs(loaded.pairs), loaded.format, True
    loaded = normalize_unpaired_rows(rows, spec.format, spec.skip_invalid)
    return loaded.rows, loaded.format, False


def prepare_labelled_data(recipe: KTORecipe) -> LabelledSplits:
    spec = recipe.data
    if spec.mixture:
        raise AlignError("data.mixture: align kto reads one source (give data.path); mix the files beforehand")
    rows = read_rows(spec.path, spec.split, spec.limit, spec.config)
    examples, fmt, from_pairs = labelled(rows, recipe)
    locations = rows.kept
    held: list[dict[str, Any]] = []
    if spec.eval_path:
        held, _, _ = labelled(read_rows(spec.eval_path, spec.eval_split, None, spec.eval_config), recipe)
    elif spec.eval_size > 0:
        examples, held = hold_out(examples, spec.eval_size, recipe.train_seed, rows.source)
        locations, _ = hold_out(locations, spec.eval_size, recipe.train_seed, rows.source)
    desirable = sum(1 for e in examples if e["label"])
    if desirable in (0, len(examples)):
        kind = "desirable" if desirable else "undesirable"
        raise AlignError(f"{spec.path}: all {len(examples)} training examples are {kind}; KTO weighs desirable "
                         "answers against undesirable ones and needs both")
    if rows.skipped:
        logging.getLogger(__name__).warning("skipped %d invalid rows (first: %s)", rows.skipped, rows.problems[0])
    record = {
        "source": spec.path, "format": fmt, "from_pairs": from_pairs, "rows": len(rows),
        "examples": len(examples), "desirable": desirable, "undesirable": len(examples) - desirable,
        "eval_examples": len(held), "skipped_invalid": rows.skipped,
        "fingerprint": fingerprint_rows(examples), "eval_fingerprint": fingerprint_rows(held) if held else None,
    }
    return LabelledSplits(examples, held, record, locations)


def class_weights(train: dict[str, Any], desirable: int, undesirable: int) -> dict[str, Any]:
    """The desirable and undesirable weights: the recipe's, else balanced so that weight x count is equal for both
    classes (the larger class weighs 1 a example), the KTO paper's recommendation (its ratio in [1, 4/3])."""
    asked_d, asked_u = train.get("desirable_weight"), train.get("undesirable_weight")
    if asked_d is not None or asked_u is not None:
        weights, reason = (float(asked_d or 1.0), float(asked_u or 1.0)), "requested"
    elif desirable >= undesirable:
        weights, reason = (undesirable / desirable, 1.0), "balanced"
    else:
        weights, reason = (1.0, desirable / undesirable), "balanced"
    ratio = weights[0] * desirable / (weights[1] * undesirable)
    if not 1.0 <= ratio <= 4 / 3 + 1e-9:
        logging.getLogger(__name__).warning(
            "desirable weight x %d desirable / undesirable weight x %d undesirable = %.2f: the KTO paper recommends "
            "1 to 4/3", desirable, undesirable, ratio)
    return {"desirable_weight": weights[0], "undesirable_weight": weights[1], "ratio": ratio, "reason": reason}


# ---- the step-0 check --------------------------------------------------------------------------------------------


def kto_step0_loss(trainer: Any, batch: dict[str, Any]) -> float:
    """With the policy equal to its reference every log-ratio and the KL estimate are 0, so each example's loss is
    1 - sigmoid(0) = 1/2 (apo_zero_unpaired: 1/2 too) times its class weight; TRL averages over the batch."""
    labels = [bool(label) for label in batch["label"]]
    weights = [trainer.desirable_weight if label else trainer.undesirable_weight for label in labels]
    return 0.5 * sum(weights) / len(weights)


KTO_STEP0 = Step0Rule("kto", kto_step0_loss, lambda batch: ("examples", len(batch["label"])))


# ---- the run -----------------------------------------------------------------------------------------------------


def kto_config(args: dict[str, Any]) -> Any:
    from trl import KTOConfig

    try:
        return KTOConfig(**args)
    except (TypeError, ValueError) as exc:
        raise AlignError(f"invalid train settings: {str(exc).splitlines()[0]}") from None


def build_trainer(recipe: KTORecipe, policy: ResolvedModel, reference: ReferencePlan, tokenizer: Any, config: Any,
                  data: LabelledSplits, gradient_checkpointing: bool, callbacks: list[Any]) -> Any:
    from trl import KTOTrainer

    return quiet_trainer(build_reference_trainer(KTOTrainer, "kto", recipe, policy, reference, tokenizer, config, data,
                                                 gradient_checkpointing, callbacks))


def run_kto(recipe: KTORecipe, progress: bool = True) -> Path:
    """Train a LoRA adapter on labelled completions as the recipe says; return the finished output dir."""
    out = check_run_inputs(recipe)
    if finished_run(recipe):
        return out
    timer = Timer()
    with timer.phase("resolve_model"):
        policy, reference = plan_reference(recipe)
        recipe = continued_lora(recipe, policy.adapter)
        tokenizer = load_tokenizer(policy, recipe.model.chat_template)
    with timer.phase("data"):
        data = prepare_labelled_data(recipe)
    reference = choose_reference(reference, recipe.train, len(data.train), unit="examples")
    weights = class_weights(recipe.train, data.record["desirable"], data.record["undesirable"])
    steps = estimated_steps(recipe.train, len(data.train))
    plan = plan_machine(recipe.model, recipe.train, recipe, "kto", reference.mode)
    args = {**reference_arguments(reference, trainer_arguments(recipe, plan, partial_dir(out))),
            "desirable_weight": weights["desirable_weight"], "undesirable_weight": weights["undesirable_weight"]}
    evaluate_at_saves(args, bool(data.eval), recipe.train)
    config = kto_config(args)
    # KTOTrainer drops every example whose prompt fills max_length (it truncates keep_start); none left is refused here
    check_prompts_fit(prompt_lengths(tokenizer, data.train), data.locations, config.max_length, "keep_start")

    with training_run(recipe, out, run_config(recipe, policy, args, data.record)) as run:
        handle, checkpoint = run.handle, run.checkpoint
        with timer.phase("load_model"):
            set_seed(int(args["seed"]))  # LoRA init (here or inside TRL for --ref base) draws from the global RNG
            trainer = build_trainer(recipe, policy, reference, tokenizer, config, data, plan.gradient_checkpointing,
                                    [progress_callback(steps, progress and run.writer), *run.callbacks()])
        data.record["truncation"] = check_truncation(kto_truncation(trainer, len(data.train), data.locations), None)
        check_eval_kept(trainer, len(data.eval))
        with timer.phase("step0_check"):  # before train() loads any checkpoint: a resumed run checks the start too
            step0 = check_reference_at_step0(trainer, reference.mode, KTO_STEP0)
        with timer.phase("train"):
            output = train(trainer, checkpoint, handle.path)
        run.raise_if_stopped(trainer.state.global_step)
        if data.eval:
            with timer.phase("eval"):
                trainer.evaluate()
        history = list(trainer.state.log_history)
        metrics = {**final_metrics(history, output), **final_rewards(history)}
        record = run_record("kto", recipe, policy, plan, args, data.record, history, metrics,
                            {**timer.phases, "total": timer.total()}, trainer.model,
                            extra={"reference": reference.describe(), "beta": float(config.beta),
                                   "loss_type": config.loss_type, "class_weights": weights, "step0_check": step0,
                                   "resumed_from": checkpoint, "resume": run.resume})
        plots = {"loss.png": log_series(history, "loss", "eval_loss"),
                 "rewards.png": log_series(history, *KTO_REWARD_KEYS)}
        return finish_training(handle, "kto", trainer, tokenizer, recipe, policy, record, plots)
