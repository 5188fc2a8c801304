"""What the preference methods share: a policy that starts as the SFT adapter or a fresh LoRA on the base, the pairs
(read, mixed, held out, length-limited), and the reward metrics; and the runner of the reference-free ones (`align
orpo`, `align simpo`): one model copy, TRL's trainer over the same pairs `align dpo` reads, and the same output
contract (adapter, run.json last, loss.png, rewards.png).

Stages, in data-flow order: validate inputs -> load data -> load model -> build trainer -> train -> save. Every input
check happens before the output dir is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from align.core.artifacts import Timer, partial_dir
from align.core.config import DPORecipe, MixtureSource, PreferenceDataSpec, PreferenceRecipe, RMRecipe
from align.core.data import Rows, fingerprint_rows, hold_out
from align.core.errors import AlignError
from align.core.mixture import Mixture, mix_sources
from align.core.models import LoadOptions, ResolvedModel, load_model, load_tokenizer, resolve_model
from align.core.preferences import PreferenceData, load_preference_data, normalize_preference_rows
from align.train.methods import METHODS
from align.train.training import (
    attach_lora, lora_config, prepare_quantized, check_run_inputs, continued_lora, estimated_steps, evaluate_at_saves, final_metrics, finish_training,
    finished_run, log_series, plan_machine, progress_callback, quiet_trainer, run_config, run_record, train,
    trainer_arguments, training_run,
)


# ---- the policy and the pairs ------------------------------------------------------------------------------------


def resolve_policy(recipe: PreferenceRecipe) -> ResolvedModel:
    """The policy's starting point: the base, plus the SFT adapter when given (`--adapter`, or an adapter dir as
    `--model`); refuses an adapter trained on another base than `--model`."""
    if recipe.adapter:
        policy = resolve_model(recipe.adapter)
        if policy.adapter is None:
            raise AlignError(f"--adapter {recipe.adapter}: not a PEFT adapter dir (no adapter_config.json)")
        if "name" in recipe.model.model_fields_set:  # left unset, --model means the adapter's own base
            named = resolve_model(recipe.model.name)
            if named.adapter is not None and named.adapter != policy.adapter:
                raise AlignError(f"--model {recipe.model.name} is itself an adapter: pass the base model as --model")
            if named.base != policy.base:
                raise AlignError(f"--adapter {recipe.adapter} was trained on {policy.base}, not on --model "
                                 f"{recipe.model.name}")
    else:
        policy = resolve_model(recipe.model.name)  # an adapter dir as --model counts as the SFT adapter
    return policy



@dataclass
class PreferenceSplits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    record: dict[str, Any]
    locations: list[str]
    """Where each training pair came from (file and line)."""



def prepare_preference_data(recipe: PreferenceRecipe | RMRecipe) -> PreferenceSplits:
    spec = recipe.data
    mixture = None
    if spec.mixture:
        mixture, loaded = preference_mixture(spec, recipe.train_seed)
    else:
        loaded = load_preference_data(spec.path, spec.format, spec.split, spec.limit, spec.skip_invalid, spec.pairs,
                                      spec.score_margin, spec.config)
    train, held, locations = loaded.pairs, [], loaded.raw.kept
    if spec.eval_path:
        held = load_preference_data(spec.eval_path, spec.format, spec.eval_split, None, spec.skip_invalid, spec.pairs,
                                    spec.score_margin, spec.eval_config).pairs
    elif spec.eval_size > 0:
        train, held = hold_out(train, spec.eval_size, recipe.train_seed, loaded.raw.source)
        locations, _ = hold_out(locations, spec.eval_size, recipe.train_seed, loaded.raw.source)
    if loaded.raw.skipped:
        import logging

        logging.getLogger(__name__).warning("skipped %d invalid rows (first: %s)", loaded.raw.skipped,
                                            loaded.raw.problems[0])
    record = {
        "source": "data.mixture" if mixture else spec.path,
        "format": loaded.format,
        "rows": len(loaded.raw),
        "pairs": len(train),
        "eval_pairs": len(held),
        "skipped_invalid": loaded.raw.skipped,
        "rows_without_pair": loaded.rows_without_pair,
        "fingerprint": fingerprint_rows(train),
        "eval_fingerprint": fingerprint_rows(held) if held else None,
        "mixture": mixture.sources if mixture else None,
    }
    return PreferenceSplits(train, held, record, locations)



def preference_mixture(spec: PreferenceDataSpec, seed: int) -> tuple[Mixture, PreferenceData]:
    """data.mixture of preference sources: each source's rows sampled with the seed on its own, then turned into
    pairs (a scored row may give several, or none)."""
    without_pair = []

    def normalize(source: MixtureSource, rows: Rows) -> tuple[list[dict[str, Any]], str]:
        loaded = normalize_preference_rows(rows, source.format or spec.format, spec.skip_invalid, spec.pairs,
                                           spec.score_margin)
        without_pair.append(loaded.rows_without_pair)
        return loaded.pairs, loaded.format

    mixture = mix_sources(spec.mixture or [], normalize, seed, spec.limit)
    return mixture, PreferenceData(*mixture.as_loaded(), rows_without_pair=sum(without_pair))



@dataclass
class LengthLimitedCollator:
    """Trims prompts (keeping their end, next to the answer) and completions (keeping their start) before TRL's own
    collator pads them. TRL 1.16 dropped max_prompt_length / max_completion_length; only the total max_length is left."""

    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    max_prompt_length: int | None
    max_completion_length: int | None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompt, completion = self.max_prompt_length, self.max_completion_length
        trimmed = [
            {
                **example,
                "prompt_ids": example["prompt_ids"][-prompt:] if prompt else example["prompt_ids"],
                "chosen_ids": example["chosen_ids"][:completion] if completion else example["chosen_ids"],
                "rejected_ids": example["rejected_ids"][:completion] if completion else example["rejected_ids"],
            }
            for example in examples
        ]
        return self.collate(trimmed)



def preference_collator(recipe: DPORecipe, config: Any, tokenizer: Any) -> LengthLimitedCollator | None:
    """None (TRL builds its own) unless prompt or completion lengths are limited."""
    if recipe.max_prompt_length is None and recipe.max_completion_length is None:
        return None
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    inner = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=config.max_length,
                                      truncation_mode=config.truncation_mode,
                                      pad_to_multiple_of=config.pad_to_multiple_of)
    return LengthLimitedCollator(inner, recipe.max_prompt_length, recipe.max_completion_length)



def load_policy(policy: ResolvedModel, recipe: PreferenceRecipe, tokenizer: Any, gradient_checkpointing: bool,
                seed: int) -> tuple[Any, Any]:
    """(model, peft_config for TRL). With an SFT adapter: a PeftModel whose trainable "default" adapter is the SFT
    adapter (TRL then adds the frozen "ref" copy). Without: the bare base and a fresh LoraConfig, which TRL wraps."""
    options = LoadOptions(recipe.model.dtype, recipe.model.attn, recipe.model.quantize)
    model = load_model(policy, options, tokenizer, adapter="trainable")
    if policy.adapter is not None:
        return attach_lora(model, recipe.lora, gradient_checkpointing, seed), None
    return prepare_quantized(model, gradient_checkpointing), lora_config(recipe.lora)



REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")



def final_rewards(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of each reward metric, train and eval."""
    out: dict[str, float] = {}
    for key in REWARD_KEYS + tuple(f"eval_{k}" for k in REWARD_KEYS):
        values = [h[key] for h in history if key in h]
        if values:
            out[key] = values[-1]
    return out



# ---- the reference-free methods ----------------------------------------------------------------------------------


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
