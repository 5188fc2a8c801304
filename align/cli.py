"""`align`: the command line. Each command parses, validates, and calls one plain function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from align import __version__
from align.core.clitools import CONTEXT_SETTINGS, OneLineGroup, debug_option, handle_errors
from align.core.config import build_recipe
from align.core.options import ShownDefaultOption, recipe_flags, recipe_option, recipe_options
from align.train.methods import METHODS, TrainingMethod

CONTEXT = CONTEXT_SETTINGS


def command_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What a training command does besides its recipe: launching, planning, overriding, debugging. The recipe's own
    flags are generated from its fields (`recipe_options`)."""
    for option in reversed([
        click.option("--num-processes", type=int, cls=ShownDefaultOption, shown="1",
                     help="Launch N processes through `accelerate launch` (DDP; gloo on CPU)."),
        click.option("--dry-run", is_flag=True, default=False, show_default=True,
                     help="Print the memory plan for this run and exit."),
        click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Override any recipe value, e.g. --set train.weight_decay=0.01."),
        click.option("--config", type=click.Path(dir_okay=False), default=None,
                     help="The recipe as TRL spells it (`trl sft --config`): a sectioned recipe, or a TRL / "
                          "alignment-handbook flat config (model_name_or_path, dataset_name, lora_r, ...)."),
        debug_option,
    ]):
        fn = option(fn)
    return fn


def recipe_file(recipe: str | None, ctx: click.Context) -> str | None:
    """RECIPE or --config FILE: the same file either way (build_recipe tells a flat config from a sectioned one)."""
    config = ctx.params.get("config")
    if recipe and config:
        from align.core.errors import AlignError

        raise AlignError(f"give RECIPE ({recipe}) or --config ({config}), not both")
    return recipe or config


@click.group(cls=OneLineGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V", prog_name="align")
def main() -> None:
    """alignmerge: LoRA SFT, DPO with the adapter as its own reference, merging and evaluation."""


def training_command(method: TrainingMethod) -> click.Command:
    """`align NAME` for a training method of the registry: its recipe's flags, the shared command options, and a
    call of its run function."""

    @click.argument("recipe", required=False, type=click.Path(dir_okay=False))
    @recipe_options(method.recipe)
    @command_options
    @reference_free_guard(method)
    @click.pass_context
    @handle_errors
    def command(ctx: click.Context, recipe: str | None, num_processes: int | None, dry_run: bool,
                sets: tuple[str, ...], debug: bool, **_: Any) -> None:
        relaunch_if_asked(num_processes)
        built = build_recipe(method.recipe, recipe_file(recipe, ctx), recipe_flags(ctx), sets,
                             trl_config=method.config_class())
        if dry_run:
            click.echo(dry_run_plan(built, method))
            return
        report_written("adapter", method.run(built))

    return click.command(method.name, context_settings=CONTEXT, help=method.summary)(command)


def reference_free_guard(method: TrainingMethod) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A method with no reference refuses `--ref` in one line that says why (click would name only the flag)."""
    if method.reference:
        return lambda fn: fn

    def refuse(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None:
            raise click.UsageError(f"--ref {value}: {method.name} has no reference model (it is reference-free); "
                                   "drop --ref", ctx)

    return click.option("--ref", hidden=True, expose_value=False, callback=refuse)


for _method in METHODS.values():
    main.add_command(training_command(_method))


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


def dry_run_plan(recipe: Any, method: TrainingMethod) -> str:
    from align.train.estimate import format_plan, plan_from_recipe

    return format_plan(plan_from_recipe(recipe, method.name, method.reference_mode(recipe)))


@main.group(context_settings=CONTEXT)
def data() -> None:
    """Look at datasets before training on them."""


@data.command("inspect", context_settings=CONTEXT)
@click.argument("source")
@click.option("--model", "-m", default="smollm2-135m", show_default=True, help="Whose tokenizer and chat template.")
@click.option("--format", "fmt", default=None, show_default="auto-detect",
              help="Force the data format (an SFT, preference or KTO format).")
@click.option("--split", default=None, show_default="train", help="Dataset split.")
@click.option("--limit", type=int, default=None, show_default="all rows", help="Look at the first N rows only.")
@click.option("--loss-on", type=click.Choice(["assistant", "last", "all"]), default="assistant", show_default=True)
@recipe_option("train.max_length", "--max-length", type=int)
@debug_option
@handle_errors
def inspect(source: str, model: str, fmt: str | None, split: str | None, limit: int | None, loss_on: str,
            max_length: int, debug: bool) -> None:
    """Detected format, rows, token lengths, what --max-length would cut, and one example with its learned tokens
    in [[ ]]: for SFT, preference (DPO) and labelled (KTO) data, read as `align sft` and `align dpo` read them.
    Invalid rows are counted and the first is named; any makes the exit status 2."""
    from align.core.errors import AlignError
    from align.core.inspection import inspect_data
    from align.core.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    report = inspect_data(source, tokenizer, fmt, split, limit, loss_on, max_length)  # type: ignore[arg-type]
    for line in report_lines(report):
        click.echo(line)
    if report["invalid"]:
        raise AlignError(f"{report['invalid']} of {report['rows']} rows invalid; the first: {report['first_invalid']}")


# What each kind of data calls its examples and the token counts worth showing.
INSPECTED = {"sft": ("examples", ("tokens", "loss_tokens")),
             "preference": ("pairs", ("prompt_tokens", "chosen_tokens", "rejected_tokens")),
             "unpaired": ("labelled completions", ("prompt_tokens", "completion_tokens"))}


def report_lines(report: dict[str, Any]) -> list[str]:
    """`align data inspect`'s report as aligned `label: value` lines, then the example."""
    examples, lengths = INSPECTED[report["kind"]]
    counts = f"{report['examples']} {examples}"
    if report["kind"] == "unpaired":
        counts += f" ({report['desirable']} desirable, {report['undesirable']} undesirable)"
    if report.get("rows_without_pair"):
        counts += f"; {report['rows_without_pair']} rows give no pair (scores tie)"
    fields = [("source", report["source"]), ("format", f"{report['format']} ({report['kind']})"),
              ("rows", f"{report['rows']} -> {counts}; {report['invalid']} invalid")]
    for key in lengths:
        stats = report[key]
        fields.append((key.replace("_", " "),
                       f"p50 {stats['p50']}  p95 {stats['p95']}  max {stats['max']}  mean {stats['mean']:.1f}"))
    fields += [("max length", f"{report['max_length']}: truncates {report['truncated']}, leaves {report['emptied']} "
                              "with nothing to learn (dropped in training)"),
               ("fingerprint", report["fingerprint"])]
    if report["first_invalid"]:
        fields.append(("first invalid row", report["first_invalid"]))
    width = max(len(label) for label, _ in fields) + 2
    return [f"{label + ':':<{width}}{value}" for label, value in fields] + [
        "example (learned tokens in [[ ]]):", report["example"]]


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

    from align.export import CLEAR_MARGIN, export_gguf, verify_round_trip

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
