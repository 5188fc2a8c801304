"""`align estimate`: the memory planner's command. Thin: parse flags into a TrainSetup, plan, print."""

from __future__ import annotations

from typing import Any

import click

from align.core.clitools import debug_option, handle_errors
from align.core.errors import AlignError
from align.core.options import recipe_option
from align.core.reference import REFERENCE_MODES
from align.core.config import GRPOTrainSettings
from align.train.estimate import (
    Plan, TrainSetup, format_plan, load_shape, parse_size, plan_json, plan_with_budget, reward_model_shapes,
)
from align.train.methods import METHODS


def estimate(model: str, budget: str | None = None, dtype: str = "auto", device: str = "auto",
             rewards: tuple[str, ...] = (), **settings: Any) -> Plan:
    """Plan `model` with the given settings (TrainSetup field names) and `--reward` specs; what the command and tests
    call."""
    from align.core.models import pick_precision

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto" and device == "cuda":
        dtype = "bfloat16"  # planning for a GPU from a machine without one: what `auto` picks on any recent GPU
    precision = pick_precision(dtype, device)
    setup = TrainSetup(device=device, weights_dtype=str(precision.weights).removeprefix("torch."),  # type: ignore[arg-type]
                       autocast=precision.bf16_autocast, reward_models=reward_model_shapes(rewards), **settings)
    return plan_with_budget(load_shape(model), setup, model, parse_size(budget) if budget else None)


@click.command("estimate")
@recipe_option("model.name", "--model", "model",
               help="Model dir, hub id (cached config), .gguf file, adapter dir or alias. Only the config is read.")
@click.option("--quantize", type=click.Choice(["none", "8bit", "4bit"]), default="none", show_default=True)
@recipe_option("lora.r", "--lora-r", type=int)
@recipe_option("lora.target_modules", "--lora-targets", help="all-linear, or comma-separated module names (q_proj,v_proj).")
@click.option("--modules-to-save", default="",
               help="Comma-separated modules trained whole (e.g. gate: a mixture's routers; with --lora-targets '' "
                    "nothing else).")
@recipe_option("lora.dropout", "--lora-dropout", type=float,
               help="LoRA dropout (planned as 0 for the preference stages, whose TRL configs' disable_dropout zeroes it).")
@click.option("--full", is_flag=True, help="Full fine-tuning instead of LoRA.")
@recipe_option("train.optim", "--optim",
               help="adamw_torch_fused, adamw_torch, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, adafactor, sgd.")
@recipe_option("train.per_device_train_batch_size", "--batch-size", type=int)
@recipe_option("train.max_length", "--max-length", type=int)
@recipe_option("train.gradient_accumulation_steps", "--grad-accum", type=int)
@click.option("--gradient-checkpointing", is_flag=True)
@recipe_option("model.attn", "--attn", type=click.Choice(["sdpa", "eager", "flash"]))
@click.option("--loss-head", type=click.Choice(["chunked", "full"]), default="chunked", show_default=True,
              help="chunked: TRL's fused LM head; full: materialized logits.")
@click.option("--stage", type=click.Choice(list(METHODS)), default="sft", show_default=True,
              help="The training method (an `align` command).")
@click.option("--ref", type=click.Choice(REFERENCE_MODES), default="adapter", show_default=True,
              help="The reference of a method that has one (dpo): the frozen SFT adapter, the base (planned as "
                   "adapter), log-probs precomputed, or a second model copy.")
@click.option("--max-completion-length", type=int, show_default=True,
              default=GRPOTrainSettings.model_fields["max_completion_length"].default,
              help="grpo: tokens sampled per completion; --max-length counts the prompt and these.")
@click.option("--steps-per-generation", type=int, default=None, show_default="--grad-accum",
              help="grpo: micro-batches one generation batch feeds (TRL's steps_per_generation); the batch sampled at "
                   "once is --batch-size x this.")
@click.option("--reward", "rewards", multiple=True, metavar="rm:DIR",
              help="grpo: a reward model that scores the completions (its weights and forward are planned; other "
                   "rewards cost no memory). Repeatable.")
@click.option("--num-processes", type=int, default=1, show_default=True)
@click.option("--zero", type=click.Choice(["0", "2", "3"]), default="0", show_default=True)
@recipe_option("model.dtype", "--dtype")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--budget", default=None, help="Memory available, e.g. 24GiB; proposes changes when it does not fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@debug_option
@handle_errors
def estimate_command(model: str, quantize: str, lora_r: int, lora_targets: str, modules_to_save: str,
                     lora_dropout: float, full: bool,
                     optim: str, batch_size: int, max_length: int, grad_accum: int, gradient_checkpointing: bool,
                     attn: str, loss_head: str, stage: str, ref: str, max_completion_length: int,
                     steps_per_generation: int | None, rewards: tuple[str, ...], num_processes: int, zero: str,
                     dtype: str, device: str, budget: str | None, as_json: bool, debug: bool) -> None:
    """Predict the peak memory of a training run from the model's config alone, term by term."""
    if ref != "adapter" and not METHODS[stage].reference:
        raise AlignError(f"--ref {ref}: --stage {stage} has no reference model "
                         f"(methods with one: {', '.join(m.name for m in METHODS.values() if m.reference)})")
    targets: str | tuple[str, ...] = lora_targets if lora_targets == "all-linear" else tuple(
        t.strip() for t in lora_targets.split(",") if t.strip())
    if (rewards or steps_per_generation) and not METHODS[stage].samples:
        raise AlignError(f"--reward and --steps-per-generation plan sampling: --stage {stage} samples nothing "
                         f"(methods that do: {', '.join(m.name for m in METHODS.values() if m.samples)})")
    plan = estimate(
        model, budget, dtype, device, rewards, stage=stage, quantize=None if quantize == "none" else quantize,
        lora_r=None if full else lora_r, lora_targets=targets, lora_dropout=lora_dropout, optim=optim,
        modules_to_save=tuple(m.strip() for m in modules_to_save.split(",") if m.strip()),
        batch_size=batch_size, max_length=max_length, grad_accum=grad_accum,
        gradient_checkpointing=gradient_checkpointing, attn=attn, ref=ref, num_processes=num_processes,
        zero=int(zero), chunked_loss=loss_head == "chunked", max_completion_length=max_completion_length,
        steps_per_generation=steps_per_generation,
    )
    click.echo(plan_json(plan) if as_json else format_plan(plan))
