"""What the reference-free preference methods (`align orpo`, `align simpo`) share: one model copy, a policy that
starts as the SFT adapter or a fresh LoRA on the base, TRL's trainer over the same pairs `align dpo` reads, and the
same output contract (adapter, run.json last, loss.png, rewards.png).

Stages, in data-flow order: validate inputs -> load data -> load model -> build trainer -> train -> save. Every input
check happens before the output dir is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from align.core.artifacts import Timer, partial_dir
from align.core.config import PreferenceRecipe
from align.core.errors import AlignError
from align.core.models import load_tokenizer
from align.train.dpo import REWARD_KEYS, final_rewards, load_policy, prepare_preference_data, resolve_policy
from align.train.methods import METHODS
from align.train.training import (
    check_run_inputs, continued_lora, estimated_steps, evaluate_at_saves, final_metrics, finish_training,
    finished_run, log_series, plan_machine, progress_callback, quiet_trainer, run_config, run_record, train,
    trainer_arguments, training_run,
)


@dataclass(frozen=True)
class ReferenceFreeTrainer:
    """How one reference-free method drives TRL: its trainer and the arguments the method fixes."""

    method: str
    trainer: str
    """`module:Class` of the TRL trainer."""
    fixed: tuple[tuple[str, Any], ...] = ()
    """Trainer arguments that make the method what it is (SimPO's loss type): a recipe may not change them."""

    def trainer_class(self) -> type:
        module, _, name = self.trainer.partition(":")
        import importlib

        return getattr(importlib.import_module(module), name)

    def arguments(self, args: dict[str, Any]) -> dict[str, Any]:
        for key, value in self.fixed:
            if key in args and args[key] != value:
                raise AlignError(f"train.{key}={args[key]!r}: {self.method} is {key}={value!r} (use align dpo for "
                                 "other losses)")
        # these trainers' batches hold chosen_/rejected_input_ids, which the Trainer's token count cannot read
        return {**args, **dict(self.fixed), "include_num_input_tokens_seen": False}


def run_reference_free(recipe: PreferenceRecipe, how: ReferenceFreeTrainer, progress: bool = True) -> Path:
    """Train a LoRA adapter on preference pairs with a reference-free TRL trainer; return the finished output dir."""
    method = METHODS[how.method]
    out = check_run_inputs(recipe)
    if finished_run(recipe):
        return out
    timer = Timer()
    with timer.phase("resolve_model"):
        policy = resolve_policy(recipe)
        recipe = continued_lora(recipe, policy.adapter)
        tokenizer = load_tokenizer(policy, recipe.model.chat_template)
    with timer.phase("data"):
        data = prepare_preference_data(recipe)
    steps = estimated_steps(recipe.train, len(data.train))
    plan = plan_machine(recipe.model, recipe.train, recipe, method.name)
    args = how.arguments(trainer_arguments(recipe, plan, partial_dir(out)))
    evaluate_at_saves(args, bool(data.eval), recipe.train)
    config = trl_config(method.config_class(), args)

    with training_run(recipe, out, run_config(recipe, policy, args, data.record)) as run:
        handle, checkpoint = run.handle, run.checkpoint
        with timer.phase("load_model"):
            set_seed(int(args["seed"]))  # a fresh LoRA (made inside TRL) draws from the global RNG
            model, peft_config = load_policy(policy, recipe, tokenizer, plan.gradient_checkpointing, int(args["seed"]))
            trainer = build(how, model, peft_config, config, tokenizer, data,
                            [progress_callback(steps, progress and run.writer), *run.callbacks()])
        with timer.phase("train"):
            output = train(trainer, checkpoint, handle.path)
        run.raise_if_stopped(trainer.state.global_step)
        if data.eval:
            with timer.phase("eval"):
                trainer.evaluate()
        history = list(trainer.state.log_history)
        metrics = {**final_metrics(history, output), **final_rewards(history)}
        record = run_record(method.name, recipe, policy, plan, args, data.record, history, metrics,
                            {**timer.phases, "total": timer.total()}, trainer.model,
                            extra={"reference": None, "beta": float(config.beta), "resumed_from": checkpoint,
                                   "resume": run.resume})
        plots = {"loss.png": log_series(history, "loss", "eval_loss"),
                 "rewards.png": log_series(history, *REWARD_KEYS)}
        return finish_training(handle, method.name, trainer, tokenizer, recipe, policy, record, plots)


def trl_config(config_class: type, args: dict[str, Any]) -> Any:
    try:
        return config_class(**args)
    except (TypeError, ValueError) as exc:
        raise AlignError(f"invalid train settings: {str(exc).splitlines()[0]}") from None


def build(how: ReferenceFreeTrainer, model: Any, peft_config: Any, config: Any, tokenizer: Any, data: Any,
          callbacks: list[Any]) -> Any:
    from datasets import Dataset

    trainer = how.trainer_class()(
        model=model, args=config, processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
    )
    return quiet_trainer(trainer)
