"""`align`: the command line. Each command parses, validates, and calls one plain function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from align import __version__
from align.core.clitools import debug_option, handle_errors

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _opt(*names: str, default_shown: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An option whose value is None unless given (so YAML values survive), showing the effective default."""
    return click.option(*names, default=None, show_default=str(default_shown), **kwargs)


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        _opt("--model", "-m", default_shown="smollm2-135m",
             help="Model dir, hub id, .gguf file, PEFT adapter dir, or the embedded alias smollm2-135m."),
        _opt("--dtype", default_shown="auto", help="auto (bf16 where fast, else fp32), float32, bfloat16, bf16-autocast, float16."),
        _opt("--attn", default_shown="sdpa", type=click.Choice(["sdpa", "eager", "flash_attention_2"]),
             help="Attention implementation."),
        _opt("--quantize", default_shown="none", type=click.Choice(["4bit", "8bit"]),
             help="Load the base with bitsandbytes (4bit = QLoRA)."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                     show_default="auto (only when memory needs it)", help="Recompute activations in backward."),
        click.option("--compile/--no-compile", "compile_", default=None,
                     show_default="off (batch shapes vary; it recompiles)", help="torch.compile the model."),
    ]):
        fn = option(fn)
    return fn


def training_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Flags spelled the same in every training command."""
    for option in reversed([
        _opt("--data", "-d", default_shown="builtin:pig-latin", help="jsonl/json/csv/parquet file, hub dataset, or builtin:NAME."),
        _opt("--output", "-o", default_shown="(required)", help="Output dir for the adapter and run.json."),
        _opt("--format", "fmt", default_shown="auto-detect", help="Force the data format."),
        _opt("--split", default_shown="train", help="Dataset split."),
        _opt("--limit", type=int, default_shown="all rows", help="Use only the first N rows."),
        _opt("--eval-data", default_shown="none", help="Separate evaluation data for eval loss."),
        _opt("--eval-size", type=float, default_shown="0", help="Hold out this share of rows for eval loss."),
        click.option("--skip-invalid", is_flag=True, default=None, show_default="off", help="Drop invalid rows and report how many."),
        _opt("--max-steps", type=int, default_shown="-1 (use epochs)", help="Optimizer steps to run."),
        _opt("--epochs", type=float, default_shown="3", help="Epochs over the data (when --max-steps is not set)."),
        _opt("--lr", type=float, default_shown="sft 2e-4, dpo 5e-5", help="Peak learning rate."),
        _opt("--scheduler", default_shown="cosine", help="Learning-rate schedule (any transformers scheduler name)."),
        _opt("--warmup", type=float, default_shown="0.05", help="Warmup steps (an integer) or share of steps (below 1)."),
        _opt("--batch-size", type=int, default_shown="8", help="Per-device micro-batch size."),
        _opt("--grad-accum", type=int, default_shown="1", help="Gradient accumulation steps."),
        _opt("--max-length", type=int, default_shown="1024", help="Maximum tokens per sequence (or per packed block)."),
        _opt("--seed", type=int, default_shown="0", help="Random seed (data order and init)."),
        _opt("--optim", default_shown="adamw_torch", help="Optimizer, e.g. adamw_torch, adamw_8bit, paged_adamw_8bit."),
        _opt("--lora-r", type=int, default_shown="16", help="LoRA rank."),
        _opt("--lora-alpha", type=float, default_shown="2*r", help="LoRA alpha (scale alpha/r)."),
        _opt("--lora-dropout", type=float, default_shown="0.05", help="LoRA dropout."),
        _opt("--target-modules", default_shown="all-linear", help="Comma-separated module names, or all-linear."),
        click.option("--rslora", is_flag=True, default=None, show_default="off", help="Scale by alpha/sqrt(r)."),
        click.option("--dora", is_flag=True, default=None, show_default="off", help="Weight-decomposed LoRA."),
        _opt("--lora-init", type=click.Choice(["default", "gaussian", "pissa", "loftq"]), default_shown="default",
             help="LoRA initialization."),
        click.option("--packing/--no-packing", default=None, show_default="off", help="Pack sequences into blocks."),
        _opt("--save-steps", type=int, default_shown="100", help="Checkpoint every N steps."),
        click.option("--resume", is_flag=True, default=False, show_default=True, help="Continue from the last checkpoint."),
        _opt("--num-processes", type=int, default_shown="1",
             help="Launch N processes through `accelerate launch` (DDP; gloo on CPU)."),
        click.option("--overwrite", is_flag=True, default=False, show_default=True, help="Replace a non-empty output dir."),
        click.option("--dry-run", is_flag=True, default=False, show_default=True,
                     help="Print the memory plan for this run and exit."),
        click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Override any recipe value, e.g. --set train.weight_decay=0.01."),
        debug_option,
    ]):
        fn = option(fn)
    return fn


def training_flags(kw: dict[str, Any]) -> dict[str, Any]:
    """Map the shared flags to dotted recipe keys (None = not given)."""
    targets = kw.get("target_modules")
    return {
        "model.name": kw.get("model"),
        "model.dtype": kw.get("dtype"),
        "model.attn": kw.get("attn"),
        "model.quantize": kw.get("quantize"),
        "model.gradient_checkpointing": kw.get("gradient_checkpointing"),
        "model.compile": kw.get("compile_"),
        "data.path": kw.get("data"),
        "data.format": kw.get("fmt"),
        "data.split": kw.get("split"),
        "data.limit": kw.get("limit"),
        "data.eval_path": kw.get("eval_data"),
        "data.eval_size": kw.get("eval_size"),
        "data.skip_invalid": kw.get("skip_invalid"),
        "train.max_steps": kw.get("max_steps"),
        "train.num_train_epochs": kw.get("epochs"),
        "train.learning_rate": kw.get("lr"),
        "train.lr_scheduler_type": kw.get("scheduler"),
        "train.warmup_steps": kw.get("warmup"),
        "train.per_device_train_batch_size": kw.get("batch_size"),
        "train.gradient_accumulation_steps": kw.get("grad_accum"),
        "train.max_length": kw.get("max_length"),
        "train.seed": kw.get("seed"),
        "train.optim": kw.get("optim"),
        "train.packing": kw.get("packing"),
        "train.save_steps": kw.get("save_steps"),
        "lora.r": kw.get("lora_r"),
        "lora.alpha": kw.get("lora_alpha"),
        "lora.dropout": kw.get("lora_dropout"),
        "lora.target_modules": targets if targets in (None, "all-linear") else targets.split(","),
        "lora.rslora": kw.get("rslora"),
        "lora.dora": kw.get("dora"),
        "lora.init": kw.get("lora_init"),
        "output": kw.get("output"),
        "resume": kw.get("resume") or None,
        "overwrite": kw.get("overwrite") or None,
    }


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V", prog_name="align")
def main() -> None:
    """alignmerge: LoRA SFT, DPO with the adapter as its own reference, merging and evaluation."""


@main.command(context_settings=CONTEXT)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@model_options
@training_options
@_opt("--loss-on", type=click.Choice(["assistant", "last", "all"]), default_shown="assistant",
      help="Tokens that carry loss: assistant turns, the last assistant turn, or all.")
@_opt("--neftune", type=float, default_shown="off", help="NEFTune noise alpha (e.g. 5).")
@click.option("--padding-free/--no-padding-free", default=None, show_default="off (on with packing)",
              help="Flatten batches without padding.")
@handle_errors
def sft(recipe: str | None, dry_run: bool, sets: tuple[str, ...], debug: bool, **kw: Any) -> None:
    """Supervised fine-tuning of a LoRA adapter. RECIPE is an optional YAML with model/data/lora/train sections."""
    relaunch_if_asked(kw.get("num_processes"))
    from trl import SFTConfig

    from align.core.config import SFTRecipe, build_recipe

    flags = training_flags(kw)
    flags.update({"data.loss_on": kw.get("loss_on"), "train.neftune_noise_alpha": kw.get("neftune"),
                  "train.padding_free": kw.get("padding_free")})
    built = build_recipe(SFTRecipe, recipe, flags, sets, trl_config=SFTConfig)
    if dry_run:
        click.echo(dry_run_plan(built, "sft"))
        return
    from align.train.sft import run_sft

    out = run_sft(built)
    report_written("adapter", out)


@main.command(context_settings=CONTEXT)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@model_options
@training_options
@_opt("--adapter", "-a", default_shown="none (fresh LoRA)", help="SFT adapter dir: the policy starts as a copy of it.")
@_opt("--ref", default_shown="adapter with --adapter, else base", metavar="adapter|base|precompute|model:PATH",
      help="Reference: the frozen SFT adapter, the base (adapters off), log-probs precomputed once, or a separate model.")
@_opt("--beta", type=float, default_shown="0.1", help="DPO beta: lower lets the policy drift further from the reference.")
@_opt("--loss-type", default_shown="sigmoid", help="TRL loss type(s), comma-separated: sigmoid, ipo, hinge, robust, ...")
@_opt("--label-smoothing", type=float, default_shown="0", help="Label smoothing (robust DPO: flip probability).")
@_opt("--max-prompt-length", type=int, default_shown="none", help="Keep the last N prompt tokens.")
@_opt("--max-completion-length", type=int, default_shown="none", help="Keep the first N tokens of each completion.")
@_opt("--pairs", type=click.Choice(["best_worst", "all"]), default_shown="best_worst",
      help="Scored completions: best vs worst, or every pair above --score-margin.")
@_opt("--score-margin", type=float, default_shown="0", help="Scored completions: least score difference for a pair.")
@handle_errors
def dpo(recipe: str | None, dry_run: bool, sets: tuple[str, ...], debug: bool, **kw: Any) -> None:
    """Preference alignment (DPO) of a LoRA adapter, with the SFT adapter as its own reference.

    RECIPE is an optional YAML with model/data/lora/train sections plus adapter, ref, max_prompt_length and
    max_completion_length; `train` takes any DPOConfig field.
    """
    relaunch_if_asked(kw.get("num_processes"))
    from trl import DPOConfig

    from align.core.config import DPORecipe, build_recipe

    flags = training_flags(kw)
    loss_type = kw.get("loss_type")
    flags.update({
        "adapter": kw.get("adapter"),
        "ref": kw.get("ref"),
        "max_prompt_length": kw.get("max_prompt_length"),
        "max_completion_length": kw.get("max_completion_length"),
        "data.pairs": kw.get("pairs"),
        "data.score_margin": kw.get("score_margin"),
        "train.beta": kw.get("beta"),
        "train.loss_type": loss_type.split(",") if loss_type else None,
        "train.label_smoothing": kw.get("label_smoothing"),
    })
    built = build_recipe(DPORecipe, recipe, flags, sets, trl_config=DPOConfig)
    if dry_run:
        click.echo(dry_run_plan(built, "dpo", built.ref))
        return
    from align.train.dpo import run_dpo

    out = run_dpo(built)
    report_written("adapter", out)


def report_written(what: str, out: Any) -> None:
    """Say where the artifact went, once (not from every process of a distributed run)."""
    from align.core.runtime import is_main_process

    if is_main_process():
        click.echo(f"{what} written to {out}")


def relaunch_if_asked(num_processes: int | None) -> None:
    """`--num-processes N` (N > 1) re-runs this same command under `accelerate launch` and exits with its status."""
    import os
    import sys

    if num_processes and num_processes > 1 and os.environ.get("ALIGNMERGE_LAUNCHED") != "1":
        from align.core.runtime import relaunch_with_accelerate

        sys.exit(relaunch_with_accelerate(num_processes))


def dry_run_plan(recipe: Any, stage: str, ref: str | None = None) -> str:
    from align.train.estimate import format_plan, plan_from_recipe

    return format_plan(plan_from_recipe(recipe, stage, ref))


@main.group(context_settings=CONTEXT)
def data() -> None:
    """Look at datasets before training on them."""


@data.command("inspect", context_settings=CONTEXT)
@click.argument("source")
@click.option("--model", "-m", default="smollm2-135m", show_default=True, help="Whose tokenizer and chat template.")
@click.option("--format", "fmt", default=None, show_default="auto-detect", help="Force the data format.")
@click.option("--split", default=None, show_default="train", help="Dataset split.")
@click.option("--limit", type=int, default=None, show_default="all rows", help="Look at the first N rows only.")
@click.option("--loss-on", type=click.Choice(["assistant", "last", "all"]), default="assistant", show_default=True)
@debug_option
@handle_errors
def inspect(source: str, model: str, fmt: str | None, split: str | None, limit: int | None, loss_on: str,
            debug: bool) -> None:
    """Detected format, row count, token-length stats, and one example with its loss tokens in [[ ]]."""
    from align.core.data import inspect_data
    from align.core.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    report = inspect_data(source, tokenizer, fmt, split, limit, loss_on)  # type: ignore[arg-type]
    click.echo(f"source:      {report['source']}")
    click.echo(f"format:      {report['format']}")
    click.echo(f"rows:        {report['rows']}")
    tokens, loss = report["tokens"], report["loss_tokens"]
    click.echo(f"tokens:      p50 {tokens['p50']}  p95 {tokens['p95']}  max {tokens['max']}  mean {tokens['mean']:.1f}")
    click.echo(f"loss tokens: p50 {loss['p50']}  p95 {loss['p95']}  max {loss['max']}")
    click.echo(f"fingerprint: {report['fingerprint']}")
    click.echo("example (loss-carrying tokens in [[ ]]):")
    click.echo(report["example"])


@main.command("run", context_settings=CONTEXT)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output", "-o", default=None, show_default="runs/<recipe name>", help="Run dir; stages go to RUNDIR/<stage>/.")
@click.option("--from", "start_from", default=None, show_default="first stage whose inputs changed",
              help="Force this stage and every stage after it.")
@click.option("--only", default=None, show_default="all stages", help="Run only this stage (its inputs must be complete).")
@click.option("--set", "sets", multiple=True, metavar="STAGE.KEY=VALUE",
              help="Override a stage's value, e.g. --set sft.train.max_steps=10 (or model.name=...).")
@debug_option
@handle_errors
def run(recipe: str, output: str | None, start_from: str | None, only: str | None, sets: tuple[str, ...],
        debug: bool) -> None:
    """Run a recipe's stages in order (sft, pairs, dpo, merge, eval), skipping the ones already up to date."""
    from pathlib import Path

    from align.pipeline.run import load_pipeline, run_pipeline

    pipeline = load_pipeline(recipe, sets)
    rundir = Path(output) if output else Path("runs") / Path(recipe).stem
    out = run_pipeline(pipeline, rundir, start_from, only)
    click.echo(f"run written to {out} (report: {out / 'report.md'})")


@main.command("export", context_settings=CONTEXT)
@click.argument("model")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="The .gguf file to write.")
@click.option("--type", "export_type", type=click.Choice(["f16", "q8_0"]), default="f16", show_default=True,
              help="Weight type of the matrices (norms stay f32).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--verify/--no-verify", default=False, show_default=True,
              help="Load the file back through transformers' GGUF loader and compare logits with the source.")
@debug_option
@handle_errors
def export(model: str, output: str, export_type: str, overwrite: bool, verify: bool, debug: bool) -> None:
    """Write MODEL (model dir, adapter dir, merged model, .gguf or hub id) as one GGUF file for llama.cpp / Ollama."""
    from pathlib import Path

    from align.core.export import CLEAR_MARGIN, export_gguf, verify_round_trip

    result = export_gguf(model, Path(output), export_type, overwrite)
    click.echo(f"wrote {result.path} ({result.type}, {result.bytes / 2**20:.1f} MiB, {result.tensors} tensors, "
               f"eos/eot {result.eos_token!r}) in {result.seconds:.1f}s")
    if verify:
        check = verify_round_trip(model, result.path)
        click.echo(f"round trip on {check.prompts} prompts ({check.positions} positions): max |logit diff| "
                   f"{check.max_abs_diff:.4g}, top-1 agreement {check.top1_agreement:.4f} ({check.top1_agreement_clear:.4f} "
                   f"where the source leads by >= {CLEAR_MARGIN}), mean KL {check.mean_kl:.3g}, "
                   f"tokens {'match' if check.tokens_match else 'DIFFER'}, chat template "
                   f"{'matches' if check.chat_template_match else 'DIFFERS'}, eos "
                   f"{'matches' if check.eos_match else 'DIFFERS'}")


def _register_commands() -> None:
    """The commands that live with their own packages, registered here explicitly (one place, no import magic)."""
    from align.estimate_cli import estimate_command
    from eval.cli import eval_command

    main.add_command(eval_command, "eval")
    main.add_command(estimate_command, "estimate")


_register_commands()

if __name__ == "__main__":
    main()
