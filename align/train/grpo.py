"""`align grpo`: GRPO (Shao et al. 2024, DeepSeekMath) over TRL's GRPOTrainer: for each prompt a group of
completions is sampled from the policy during training, scored by reward functions (align/train/rewards.py), and
the policy moved toward the completions that beat their group's mean, with a per-token KL to a reference.

The reference is DPO's where it applies (align/train/reference.py): the frozen SFT adapter (TRL 1.16 copies a
PeftModel's adapter into a frozen "ref" adapter when beta > 0, as DPOTrainer does) or the adapter-disabled base for a
fresh LoRA; one base in memory. `precompute` cannot apply (the completions do not exist before training) and
GRPOTrainer takes no separate reference model with a LoRA policy, so both are refused. beta = 0 has no KL term and no
reference, recorded as such.

The step-0 check: before any update the policy is its reference and the sampling policy, so on the first batch the
per-token log-probs of policy and reference agree, TRL's logged KL is 0, and the importance ratio is 1 (no token
clipped); anything else fails the run before it trains.

Stages, in data-flow order: validate inputs -> load data -> load model -> build trainer -> check step 0 -> train ->
save. Every input check (rewards, weights, --num-generations against the batch) happens before the output dir is
created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from align.core.artifacts import Timer, partial_dir
from align.core.config import GRPORecipe
from align.core.data import (
    DataError, Rows, as_messages, detect_sft_format, field_error, fingerprint_rows, normalize_rows,
    normalize_sft_row, read_rows, text_field,
)
from align.core.errors import AlignError
from align.core.models import ResolvedModel, load_tokenizer, tokenizer_source
from align.core.preferences import detect_preference_format, normalize_preference_row
from align.core.reference import parse_reference
from align.train.preference import load_policy, resolve_policy
from align.train.reference import (
    STEP0_TOLERANCE, ReferencePlan, plan_reference, raise_settings_error,
)
from align.train.rewards import CheckedReward, check_reward_tokenizers, completion_text, parse_rewards
from align.train.training import (
    check_run_inputs, continued_lora, estimated_steps, final_metrics, finish_training, finished_run, log_series,
    plan_machine, progress_callback, quiet_trainer, run_config, run_record, train, trainer_arguments, training_run,
)

ANSWER_COLUMNS = ("answer", "reference", "solution", "completion")
"""Where a `prompt` row's reference answer is looked for, in this order, when --answer-column is not given."""
PAIR_PROMPT_FORMATS = ("hh", "implicit", "sharegpt_ranking", "alpaca_ranking")
"""Preference rows read as prompts: the shared prompt, the chosen answer as the reference (explicit rows have a
`prompt` column and read as `prompt`; scored rows have no single answer)."""
PROMPT_FORMATS = ("prompt", "messages", "sharegpt", "alpaca", *PAIR_PROMPT_FORMATS)


# ---- data --------------------------------------------------------------------------------------------------------


@dataclass
class PromptSplits:
    train: list[dict[str, Any]]
    """TRL's prompt-only form: {prompt: messages, answer: str or None}; `answer` reaches reward functions."""
    record: dict[str, Any]
    locations: list[str]


def detect_prompt_format(row: dict[str, Any]) -> str | None:
    if "prompt" in row:
        return "prompt"
    pair = detect_preference_format(row)
    found = pair if pair in PAIR_PROMPT_FORMATS else detect_sft_format(row)
    return found if found in PROMPT_FORMATS else None


def prompt_row(row: dict[str, Any], fmt: str, where: str, answer_column: str | None) -> dict[str, Any]:
    """One row as {prompt, answer}: a `prompt` column (text or messages) with its answer column, or an SFT
    conversation whose last assistant message is the answer and whatever precedes it the prompt."""
    if fmt == "prompt":
        prompt = as_messages(row.get("prompt"), "user", where, "prompt")
        if answer_column is not None and answer_column not in row:
            raise field_error(where, answer_column, "missing (--answer-column)")
        column = answer_column or next((c for c in ANSWER_COLUMNS if c in row), None)
        value = row.get(column) if column else None
        if isinstance(value, list):
            answer: str | None = completion_text(value)
        else:
            answer = None if value is None else text_field(value, where, str(column))
        return {"prompt": prompt, "answer": answer}
    if fmt in PAIR_PROMPT_FORMATS:
        pair = normalize_preference_row(row, fmt, where)["pairs"][0]  # type: ignore[arg-type]
        return {"prompt": pair["prompt"], "answer": completion_text(pair["chosen"])}
    messages = normalize_sft_row(row, fmt, where)["messages"]  # type: ignore[arg-type]
    if messages[-1]["role"] == "assistant":
        prompt, answer = messages[:-1], messages[-1]["content"]
    else:
        prompt, answer = messages, None
    if not any(m["role"] == "user" for m in prompt):
        raise field_error(where, "messages", "no user turn before the answer to prompt with")
    return {"prompt": prompt, "answer": answer}


def prepare_prompt_data(recipe: GRPORecipe) -> PromptSplits:
    spec = recipe.data
    if spec.mixture:
        raise AlignError("data.mixture: align grpo reads one source (give data.path); mix the files beforehand")
    if spec.eval_path or spec.eval_size:
        raise AlignError("align grpo has no eval set yet (its eval would sample completions): drop --eval-data and "
                         "--eval-size, and score the adapter with align eval")
    return read_prompts(spec.path, spec.split, spec.limit, spec.config, spec.format, spec.answer_column,
                        spec.skip_invalid)


def read_prompts(source: str, split: str | None = None, limit: int | None = None, config: str | None = None,
                 fmt: str | None = None, answer_column: str | None = None, skip_invalid: bool = False) -> PromptSplits:
    """Prompt rows ({prompt: messages, answer: str or None}) from any source `prompt_row` reads: for GRPO, and for
    the pipeline's pairs stage with a scoring judge."""
    rows: Rows = read_rows(source, split, limit, config)
    examples, fmt = normalize_rows(
        rows, fmt, lambda row, chosen, where: prompt_row(row, chosen, where, answer_column),
        detect_prompt_format, PROMPT_FORMATS, skip_invalid)
    if rows.skipped:
        logging.getLogger(__name__).warning("skipped %d invalid rows (first: %s)", rows.skipped, rows.problems[0])
    with_answer = sum(1 for e in examples if e["answer"] is not None)
    record = {"source": source, "format": fmt, "rows": len(rows), "prompts": len(examples),
              "with_answer": with_answer, "skipped_invalid": rows.skipped, "fingerprint": fingerprint_rows(examples)}
    return PromptSplits(examples, record, rows.kept)


def check_rewards_apply(rewards: list[CheckedReward], data: PromptSplits) -> None:
    """A built-in reward that cannot score a row would return None for it all run long: refused up front."""
    for reward in rewards:
        if reward.needs is None:
            continue
        scores, needs = reward.needs
        bad = next((i for i, row in enumerate(data.train) if not scores(row)), None)
        if bad is not None:
            raise DataError(f"{data.locations[bad]}: --reward {reward.where} needs {needs}, and this row has none")


def check_vllm(recipe: GRPORecipe, train: dict[str, Any]) -> None:
    """TRL's vLLM generation (either mode) imports vllm and runs on CUDA; without them it fails inside GRPOTrainer,
    after the model has loaded. Read from the train arguments, so `train: {use_vllm: true}` is held to it too. Both
    are named when both are missing: installing vllm on a machine with no GPU would only lead to the next refusal."""
    if not train.get("use_vllm"):
        return
    switch = "--vllm" if recipe.vllm else "train.use_vllm"
    asked = f"--vllm {recipe.vllm}" if recipe.vllm else "train.use_vllm"
    extra = "the vllm extra (pip install -e '.[vllm]' in the alignmerge checkout)"
    gpu = torch.cuda.is_available()
    installed = vllm_installed()
    if not gpu and not installed:
        raise AlignError(f"{asked} needs a CUDA GPU and {extra}, and this machine has neither; drop {switch} to "
                         "sample with transformers")
    if not installed:
        raise AlignError(f"{asked} needs {extra}, which is not installed")
    if not gpu:
        raise AlignError(f"{asked} needs a CUDA GPU (TRL runs vLLM on the training GPUs), and torch sees none; drop "
                         f"{switch} to sample with transformers")


def vllm_installed() -> bool:
    """TRL's own test, so the two agree on what counts (it warns about a vllm outside the versions it supports)."""
    from trl.import_utils import is_vllm_available

    return is_vllm_available()


def check_generation_batch(train: dict[str, Any]) -> None:
    """TRL's batch counts completions, and each prompt's group must fall in one generation batch."""
    batch = int(train["per_device_train_batch_size"]) * int(train["gradient_accumulation_steps"]) \
        * int(os.environ.get("WORLD_SIZE", "1"))
    groups = int(train["num_generations"])
    if train.get("generation_batch_size") is None and train.get("steps_per_generation") is None and batch % groups:
        raise AlignError(f"--num-generations {groups} does not divide the batch of {batch} completions (--batch-size "
                         f"x --grad-accum x processes): each prompt's {groups} completions must share a batch; use a "
                         f"batch that is a multiple of {groups}")


# ---- the reference -----------------------------------------------------------------------------------------------


def plan_grpo_reference(recipe: GRPORecipe, beta: float) -> tuple[ResolvedModel, ReferencePlan | None]:
    """The policy's model, and the reference of the KL term (None when beta is 0)."""
    requested = recipe.ref or "auto"
    mode, _ = parse_reference(requested)
    if mode == "precompute":
        raise AlignError("--ref precompute: GRPO samples its completions during training, so there is nothing to "
                         "score beforehand; use --ref adapter (the frozen SFT adapter) or base")
    if mode == "model":
        raise AlignError(f"--ref {requested}: TRL's GRPOTrainer takes no separate reference model with a LoRA policy; "
                         "use --ref adapter (the frozen SFT adapter) or base")
    if beta == 0:
        if mode != "auto":
            raise AlignError(f"--ref {requested} with beta 0: there is no KL term, so no reference; drop --ref or set "
                             "--beta above 0")
        return resolve_policy(recipe), None
    policy, reference = plan_reference(recipe)
    if requested == "auto":
        kind = "the frozen SFT adapter" if reference.mode == "adapter" else "the base (adapters off)"
        reference = replace(reference, reason=f"{reference.mode} ({kind}): precompute does not apply to online samples")
    return policy, reference


def describe_reference(reference: ReferencePlan | None) -> dict[str, Any]:
    if reference is None:
        return {"mode": None, "reason": "beta 0: no KL term, so no reference model and no reference forward"}
    return reference.describe()


# ---- the step-0 check --------------------------------------------------------------------------------------------


CLIPPED = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio")


@contextmanager
def training_shapes(trainer: Any) -> Iterator[None]:
    """TRL's eval mode (dropout off) with training's batch shapes: the reference forward in slices of the per-device
    train batch (not the eval batch) and groups of `num_generations`. The check's own forwards take the same slices,
    since bf16 kernels round differently for a different number of rows: on the embedded model under bf16 autocast,
    slices of 4 and of 8 rows put one model's log-probs 0.16 nats apart, a false refusal of a right reference."""
    eval_batch, eval_groups = trainer.args.per_device_eval_batch_size, trainer.num_generations_eval
    trainer.args.per_device_eval_batch_size, trainer.num_generations_eval = \
        trainer.args.per_device_train_batch_size, trainer.num_generations
    try:
        yield
    finally:
        trainer.args.per_device_eval_batch_size, trainer.num_generations_eval = eval_batch, eval_groups


def check_policy_at_step0(trainer: Any, reference: ReferencePlan | None,
                          tolerance: float = STEP0_TOLERANCE) -> dict[str, Any]:
    """Sample the first batch's completions and score them through TRL's own code, with the model in eval mode
    (dropout off) and the RNG restored after, before any update: the policy's per-token log-probs must equal the
    reference's (TRL's logged `kl` 0) and the sampling policy's (the importance ratio 1, no token clipped).

    TRL skips the sampling policy's log-probs when generation and update are in step (it uses the policy's own,
    detached, so the ratio is 1 by construction); here they are computed in their own forward and handed to the
    loss, as TRL does when they are out of step, so the ratio is measured. Raises AlignError when not neutral."""
    from trl.trainer.utils import split_tensor_dict

    model = trainer.model
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), training_shapes(trainer):
            inputs = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
            mask = inputs["completion_mask"]
            size = int(trainer.args.per_device_train_batch_size)
            with torch.no_grad():
                sampled, _, _ = trainer._get_per_token_logps_and_entropies(
                    model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
                    torch.cat([inputs["prompt_mask"], mask], dim=1), inputs["completion_ids"].size(1),
                    batch_size=size)
                inputs["old_per_token_logps"] = sampled
                losses = []
                for batch in split_tensor_dict(inputs, max(1, mask.shape[0] // size)):
                    with trainer.accelerator.autocast():
                        losses.append(float(trainer.compute_loss(model, batch)))
    except (ValueError, NotImplementedError) as exc:
        raise_settings_error(exc, "grpo")
        raise
    finally:
        model.train(was_training)
    logged = trainer._metrics["eval"]  # TRL files metrics under "eval" when the model is not training
    measured = {key: float(max(logged[key][-len(losses):], key=abs)) for key in ("kl", *CLIPPED) if logged.get(key)}
    rewards = {key.removesuffix("/mean").removeprefix("rewards/"): float(values[-1])
               for key, values in logged.items() if key.startswith("rewards/") and key.endswith("/mean") and values}
    logged.clear()
    deviations = [abs(v) for v in measured.values()]
    if reference is not None:
        ref = inputs["ref_per_token_logps"]
        difference = float(((sampled - ref).abs() * mask).max()) if mask.any() else 0.0
        measured["max_logp_difference"] = difference
        deviations.append(difference)
    deviation = max(deviations, default=0.0)
    result = {"passed": deviation <= tolerance, "loss": sum(losses) / len(losses), **measured,
              "max_deviation": deviation, "tolerance": tolerance, "completions": int(mask.shape[0]), "rewards": rewards}
    if not result["passed"]:
        got = ", ".join(f"{key} {value:.6f}" for key, value in measured.items())
        which = f"--ref {reference.mode}" if reference is not None else "beta 0 (no reference)"
        raise AlignError(f"step-0 check failed for {which}: before any update the policy must equal its reference "
                         f"and its sampling policy (KL 0, importance ratio 1, nothing clipped), got {got}; the "
                         "reference is not the model the policy starts from")
    return result


# ---- the run -----------------------------------------------------------------------------------------------------


class GenerationClock:
    """Seconds spent inside TRL's `_generate` (sampling the completions), for the share of training spent there."""

    def __init__(self, trainer: Any) -> None:
        self.seconds = 0.0
        generate = trainer._generate

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        trainer._generate = timed


def generation_backend(config: Any) -> str:
    """How the completions are sampled: transformers' generate, or vLLM in TRL's mode (vllm-colocate)."""
    return f"vllm-{config.vllm_mode}" if config.use_vllm else "transformers"


def vllm_settings(config: Any) -> dict[str, Any]:
    """What run.json records of a vLLM backend: its version, and in colocate mode the share of the GPU it was given."""
    if not config.use_vllm:
        return {}
    from importlib.metadata import version

    colocated = {"vllm_gpu_memory_utilization": config.vllm_gpu_memory_utilization,
                 "vllm_enable_sleep_mode": config.vllm_enable_sleep_mode} if config.vllm_mode == "colocate" else {}
    return {"vllm": version("vllm"), **colocated}


def plan_grpo_config(recipe: GRPORecipe, reference: ReferencePlan | None, workdir: Path
                     ) -> tuple[Any, dict[str, Any], Any]:
    """The machine plan, the trainer arguments and the GRPOConfig they make."""
    plan = plan_machine(recipe.model, recipe.train, recipe, "grpo", reference.mode if reference else None)
    # GRPO counts its own tokens (prompt and completion); the Trainer's count looks for input_ids it never gets
    args = {**trainer_arguments(recipe, plan, workdir), "include_num_input_tokens_seen": False}
    return plan, args, grpo_config(args)


def grpo_config(args: dict[str, Any]) -> Any:
    from trl import GRPOConfig

    try:
        return GRPOConfig(**args)
    except (TypeError, ValueError) as exc:
        raise AlignError(f"invalid train settings: {str(exc).splitlines()[0]}") from None


def build_trainer(recipe: GRPORecipe, policy: ResolvedModel, reference: ReferencePlan | None, tokenizer: Any,
                  config: Any, data: PromptSplits, rewards: list[CheckedReward], gradient_checkpointing: bool,
                  callbacks: list[Any]) -> Any:
    """GRPOTrainer over the policy (the SFT adapter, or a fresh LoRA TRL makes); with beta > 0 and the SFT adapter,
    TRL's frozen "ref" copy is checked against the saved adapter (`prepare_reference`)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    model, peft_config = load_policy(policy, recipe, tokenizer, gradient_checkpointing, int(config.seed))
    try:
        trainer = GRPOTrainer(model=model, reward_funcs=list(rewards), args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(data.train), peft_config=peft_config,
                              callbacks=callbacks)
    except (ValueError, NotImplementedError) as exc:
        raise_settings_error(exc, "grpo")
        raise
    if reference is not None:
        from align.train.reference import prepare_reference  # looked up here, so tests can swap it for a wrong one

        prepare_reference(trainer, reference)
    return quiet_trainer(trainer)


def reward_series(history: list[dict[str, Any]], rewards: list[CheckedReward]) -> dict[str, list[dict[str, Any]]]:
    """Each reward's mean and spread over the step's completions, per logged step (TRL's `rewards/<name>/mean|std`)."""
    return {r.__name__: [{"step": h["step"], "mean": h.get(f"rewards/{r.__name__}/mean"),
                          "std": h.get(f"rewards/{r.__name__}/std")}
                         for h in history if f"rewards/{r.__name__}/mean" in h]
            for r in rewards}


def run_grpo(recipe: GRPORecipe, progress: bool = True) -> Path:
    """Train a LoRA adapter with GRPO on the recipe's prompts and rewards; return the finished output dir."""
    out = check_run_inputs(recipe)
    if finished_run(recipe):
        return out
    settings = recipe.train_arguments()
    check_generation_batch(settings)
    check_vllm(recipe, settings)
    rewards = parse_rewards(recipe.rewards, settings.get("reward_weights"),
                            int(settings["max_completion_length"] or 256))
    timer = Timer()
    with timer.phase("resolve_model"):
        policy, reference = plan_grpo_reference(recipe, float(settings["beta"]))
        recipe = continued_lora(recipe, policy.adapter)
        tokenizer = load_tokenizer(policy, recipe.model.chat_template)
    check_reward_tokenizers(rewards, tokenizer, tokenizer_source(policy))
    with timer.phase("data"):
        data = prepare_prompt_data(recipe)
    check_rewards_apply(rewards, data)
    steps = estimated_steps(recipe.train, len(data.train) * int(settings["num_generations"]))
    plan, args, config = plan_grpo_config(recipe, reference, partial_dir(out))

    with training_run(recipe, out, run_config(recipe, policy, args, data.record)) as run:
        handle, checkpoint = run.handle, run.checkpoint
        with timer.phase("load_model"):
            set_seed(int(args["seed"]))  # LoRA init (here or inside TRL for a fresh LoRA) draws from the global RNG
            trainer = build_trainer(recipe, policy, reference, tokenizer, config, data, rewards,
                                    plan.gradient_checkpointing,
                                    [progress_callback(steps, progress and run.writer), *run.callbacks()])
        with timer.phase("step0_check"):  # before train() loads any checkpoint: a resumed run checks the start too
            step0 = check_policy_at_step0(trainer, reference)
        clock = GenerationClock(trainer)
        with timer.phase("train"):
            output = train(trainer, checkpoint, handle.path)
        run.raise_if_stopped(trainer.state.global_step)
        history = list(trainer.state.log_history)
        metrics = final_metrics(history, output)
        series = reward_series(history, rewards)
        metrics.update({f"rewards/{name}/mean": points[-1]["mean"] for name, points in series.items() if points})
        train_seconds = timer.phases.get("train") or 0.0
        record = run_record("grpo", recipe, policy, plan, args, data.record, history, metrics,
                            {**timer.phases, "total": timer.total()}, trainer.model,
                            extra={"reference": describe_reference(reference), "beta": float(config.beta),
                                   "loss_type": config.loss_type, "num_generations": int(config.num_generations),
                                   "rewards": [{"name": r.__name__, "reward": r.where, "weight": w}
                                               for r, w in zip(rewards, config.reward_weights or [1.0] * len(rewards))],
                                   "reward_stats": series,
                                   "generation": {"backend": generation_backend(config), **vllm_settings(config),
                                                  "seconds": clock.seconds,
                                                  "share_of_train": clock.seconds / train_seconds if train_seconds
                                                  else None},
                                   "step0_check": step0, "resumed_from": checkpoint, "resume": run.resume})
        plots = {"loss.png": log_series(history, "loss"),
                 "rewards.png": log_series(history, "reward", *(f"rewards/{r.__name__}/mean" for r in rewards))}
        return finish_training(handle, "grpo", trainer, tokenizer, recipe, policy, record, plots)
