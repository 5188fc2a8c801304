"""`align dpo`: preference alignment of a LoRA adapter with TRL's DPOTrainer, one base model in memory.

The reference and its step-0 check are align/train/reference.py's (shared with `align kto`); here is what is
DPO's own: the loss family's step-0 values, the trainer, and the run.

Stages, in data-flow order: validate inputs -> load data -> load models -> build trainer -> check reference -> train
-> save. Every input check happens before the output dir is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import set_seed

from align.core.artifacts import Timer, partial_dir
from align.core.config import DPORecipe
from align.core.errors import AlignError
from align.core.models import ResolvedModel, load_tokenizer
from align.train.preference import (
    REWARD_KEYS, PreferenceSplits, final_rewards, preference_collator, prepare_preference_data,
)
from align.train.reference import (
    ReferencePlan, Step0Rule, check_reference_at_step0, choose_reference, plan_reference, reference_arguments,
)
from align.train.reference import build_trainer as build_reference_trainer
from align.train.training import (
    check_run_inputs, continued_lora, finished_run, estimated_steps, final_metrics, finish_training, log_series,
    evaluate_at_saves, plan_machine, progress_callback, quiet_trainer, run_config, run_record, train,
    trainer_arguments, training_run,
)
from align.train.truncation import (
    check_eval_kept, check_prompts_fit, check_truncation, dpo_truncation, prompt_lengths,
)


# ---- the step-0 values of the loss family ------------------------------------------------------------------------


# Each loss type's value when every log-ratio is 0 (the policy equal to its reference), from TRL's own formulas
# (DPOTrainer._compute_loss), as functions of beta and label smoothing (eps). `sft` has none: it is the data's NLL.
# tests/test_dpo.py checks every entry against the loss TRL computes at step 0, and that the table covers every loss
# type the installed DPOConfig lists.
STEP0_LOSS: dict[str, Callable[[float, float], float]] = {
    "sigmoid": lambda beta, eps: math.log(2),
    "sigmoid_norm": lambda beta, eps: math.log(2),
    "robust": lambda beta, eps: math.log(2),  # ((1 - eps) ln 2 - eps ln 2) / (1 - 2 eps)
    "aot": lambda beta, eps: math.log(2),
    "aot_unpaired": lambda beta, eps: math.log(2),
    "hinge": lambda beta, eps: 1.0,
    "ipo": lambda beta, eps: (1 / (2 * beta)) ** 2,
    "exo_pair": lambda beta, eps: -math.log(2) - 0.5 * math.log(eps * (1 - eps)),
    "nca_pair": lambda beta, eps: 2 * math.log(2),
    "bco_pair": lambda beta, eps: 2 * math.log(2),
    "sppo_hard": lambda beta, eps: 2 * (0.5 / beta) ** 2,
    "apo_zero": lambda beta, eps: 1.0,
    "apo_down": lambda beta, eps: 1.0,
    "discopop": lambda beta, eps: 0.5 * (math.log(2) + 1),
}



def step0_loss(loss_types: list[str], loss_weights: list[float] | None, beta: float, label_smoothing: float = 0.0,
               weighted: bool = False) -> float | None:
    """The loss when every log-ratio is 0 (policy = reference), where it is a constant: None for `sft` (the NLL of
    the data) and under WPO weighting (`use_weighting`, which scales each pair by the policy's probabilities)."""
    if weighted or not all(t in STEP0_LOSS for t in loss_types):
        return None
    weights = loss_weights or [1.0] * len(loss_types)
    return sum(STEP0_LOSS[t](beta, label_smoothing) * w for t, w in zip(loss_types, weights))



DPO_STEP0 = Step0Rule(
    "dpo",
    lambda trainer, batch: step0_loss(list(trainer.loss_types), trainer.loss_weights, trainer.beta,
                                      trainer.label_smoothing, trainer.use_weighting),
    lambda batch: ("pairs", int(batch["input_ids"].shape[0] // 2)),  # chosen and rejected are concatenated
)


# ---- the run -----------------------------------------------------------------------------------------------------


def dpo_config(args: dict[str, Any]) -> Any:
    from trl import DPOConfig

    try:
        return DPOConfig(**args)
    except (TypeError, ValueError) as exc:
        raise AlignError(f"invalid train settings: {str(exc).splitlines()[0]}") from None



def build_trainer(recipe: DPORecipe, policy: ResolvedModel, reference: ReferencePlan, tokenizer: Any, config: Any,
                  data: PreferenceSplits, gradient_checkpointing: bool, callbacks: list[Any]) -> Any:
    from trl import DPOTrainer

    return quiet_trainer(build_reference_trainer(
        DPOTrainer, "dpo", recipe, policy, reference, tokenizer, config, data, gradient_checkpointing, callbacks,
        data_collator=preference_collator(recipe, config, tokenizer)))


def run_dpo(recipe: DPORecipe, progress: bool = True) -> Path:
    """Train a LoRA adapter on preference pairs as the recipe says; return the finished output dir."""
    out = check_run_inputs(recipe)
    if finished_run(recipe):
        return out
    timer = Timer()
    with timer.phase("resolve_model"):
        policy, reference = plan_reference(recipe)
        recipe = continued_lora(recipe, policy.adapter)
        tokenizer = load_tokenizer(policy, recipe.model.chat_template)
    with timer.phase("data"):
        data = prepare_preference_data(recipe)
    reference = choose_reference(reference, recipe.train, len(data.train))
    steps = estimated_steps(recipe.train, len(data.train))
    plan = plan_machine(recipe.model, recipe.train, recipe, "dpo", reference.mode)
    args = reference_arguments(reference, trainer_arguments(recipe, plan, partial_dir(out)))
    evaluate_at_saves(args, bool(data.eval), recipe.train)
    config = dpo_config(args)

    check_prompts_fit(prompt_lengths(tokenizer, data.train), data.locations, config.max_length,
                      config.truncation_mode)

    with training_run(recipe, out, run_config(recipe, policy, args, data.record)) as run:
        handle, checkpoint = run.handle, run.checkpoint
        with timer.phase("load_model"):
            set_seed(int(args["seed"]))  # LoRA init (here or inside TRL for --ref base) draws from the global RNG
            trainer = build_trainer(recipe, policy, reference, tokenizer, config, data, plan.gradient_checkpointing,
                                    [progress_callback(steps, progress and run.writer), *run.callbacks()])
        data.record["truncation"] = check_truncation(dpo_truncation(trainer, len(data.train), data.locations), None)
        check_eval_kept(trainer, len(data.eval))
        # before train() loads any checkpoint, so a resumed run checks the same starting point
        with timer.phase("step0_check"):
            step0 = check_reference_at_step0(trainer, reference.mode, DPO_STEP0)
        with timer.phase("train"):
            output = train(trainer, checkpoint, handle.path)
        run.raise_if_stopped(trainer.state.global_step)
        if data.eval:
            with timer.phase("eval"):
                trainer.evaluate()
        history = list(trainer.state.log_history)
        metrics = final_metrics(history, output)
        metrics.update(final_rewards(history))
        record = run_record("dpo", recipe, policy, plan, args, data.record, history, metrics,
                            {**timer.phases, "total": timer.total()}, trainer.model,
                            extra={"reference": reference.describe(), "beta": float(config.beta),
                                   "loss_type": list(config.loss_type), "step0_check": step0,
                                   "resumed_from": checkpoint, "resume": run.resume})
        plots = {"loss.png": log_series(history, "loss", "eval_loss"),
                 "rewards.png": log_series(history, *REWARD_KEYS)}
        return finish_training(handle, "dpo", trainer, tokenizer, recipe, policy, record, plots)

