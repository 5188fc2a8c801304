"""`merge`: thin click commands over `merge.run` (tests and the pipeline call the same functions)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from align.core.clitools import CONTEXT_SETTINGS, OneLineGroup, comma_floats, debug_option, handle_errors
from merge.extract import DEFAULT_MIN_AGREEMENT, ExtractRequest, parse_rank, run_extract_lora
from merge.moe import GATE_MODES, MoERequest, read_prompts, run_moe, run_moe_config
from merge.methods import DEFAULT_DENSITY, METHODS, PARAMETERS, MergekitMethod, MergeParams, Option
from merge.run import MergeRequest, run_config_file, run_merge_request


shard_size_option = click.option(
    "--shard-size", default=None,
    help="Output shard size in bytes, e.g. 500M (default mergekit's 5B); one shard is held in memory until written.")


allow_base_mismatch_option = click.option(
    "--allow-base-mismatch", is_flag=True,
    help="Merge adapters against a base they were not trained on (refused otherwise; merge.json records it).")


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options every shortcut shares."""
    for option in reversed([
        click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
                     help="Output dir (a model dir, or an adapter dir for adapter-space merges)."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty output dir."),
        click.option("--tokenizer-source", default=None,
                     help="Reconcile different vocabularies: base, union, or one of the input models."),
        click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Compute and store dtype (default: the inputs' own)."),
        click.option("--materialize", "mode", flag_value="materialize",
                     help="Merge each adapter into its base first, then merge full models (exact)."),
        click.option("--as-adapter", "mode", flag_value="adapter",
                     help="Merge adapters in adapter space and write an adapter (default for linear over adapters)."),
        click.option("--rank", type=int, default=None,
                     help="Adapter-space output rank (default: the sum of the input ranks)."),
        allow_base_mismatch_option,
        shard_size_option,
        debug_option,
    ]):
        fn = option(fn)
    return fn


def weights_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(PARAMETERS["weight"].flag_for("weight"), "weights", default=None,
                        help=PARAMETERS["weight"].help)(fn)


seed_option = click.option("--seed", type=int, default=None,
                           help="Random seed for methods that draw at random (DARE, DELLA): same seed, same merge.")


def base_option(required: bool = True) -> Callable[..., Any]:
    """--base: mergekit's base_model. Where the method requires one, adapters of one base imply it."""
    help_text = ("The model the others were fine-tuned from (default: the adapters' base)." if required else
                 "A base model: with one, the models' task vectors are merged (default: none).")
    return click.option("--base", default=None, help=help_text)


def parameter_option(option: Option) -> Callable[..., Any]:
    """A mergekit parameter as a click option; values stay text (or None when not given) until the method parses
    them, so a bad value is one line naming the flag, and an absent one takes the method's default."""
    text = f"{option.help.rstrip('.')} ({option.describe_default()})."
    if option.kind is bool:
        flag = option.flag.removeprefix("--")
        return click.option(f"--{flag}/--no-{flag}", option.name, default=None, help=text)
    number = "INT" if option.kind is int else "FLOAT"
    metavar = f"{number}[,{number}...]" if option.per_model or option.name == "t" else number
    return click.option(option.flag, option.name, default=None, metavar=metavar, help=text)


def _request(method: str, models: tuple[str, ...], out: Path, mode: str | None, params: MergeParams,
             **common: Any) -> MergeRequest:
    common.pop("debug", None)
    return MergeRequest(method=method, models=list(models), out=out, mode=mode or "auto", params=params, **common)


def _done(path: Path) -> None:
    click.echo(f"merged into {path}")


# mergekit's spelling works too (`merge model_stock ... --select_topk`): the YAML name and the subcommand are one word
@click.group(cls=OneLineGroup, context_settings={**CONTEXT_SETTINGS, "token_normalize_func": lambda token: token.replace("_", "-")})
def main() -> None:
    """Merge models or LoRA adapters: linear, SLERP, layer stacking, task arithmetic, TIES, DARE and every other
    mergekit method (via mergekit)."""


@main.command()
@click.argument("models", nargs=-1, required=True)
@weights_option
@click.option("--normalize", is_flag=True, help="Divide by the sum of the weights.")
@output_options
@handle_errors
def linear(models: tuple[str, ...], weights: str | None, normalize: bool, out: Path, mode: str | None,
           **common: Any) -> None:
    """Weighted sum Σ wᵢ·θᵢ of MODELS (default weights: equal, summing to 1)."""
    params = MergeParams(weights=comma_floats(weights, "--weights"), normalize=normalize)
    _done(run_merge_request(_request("linear", models, out, mode, params, **common)))


@main.command()
@click.argument("model_a")
@click.argument("model_b")
@click.option("-t", "t", default="0.5", show_default=True,
              help="Interpolation factor (0 = A, 1 = B); a list such as 0,0.5,1 is a gradient across layers.")
@click.option("--t-attn", default=None, help="t for attention modules (overrides -t there).")
@click.option("--t-mlp", default=None, help="t for MLP modules (overrides -t there).")
@output_options
@handle_errors
def slerp(model_a: str, model_b: str, t: str, t_attn: str | None, t_mlp: str | None, out: Path, mode: str | None,
          **common: Any) -> None:
    """Spherical interpolation between MODEL_A and MODEL_B, per tensor."""
    params = MergeParams(t=comma_floats(t, "-t"), t_attn=comma_floats(t_attn, "--t-attn"),
                         t_mlp=comma_floats(t_mlp, "--t-mlp"))
    _done(run_merge_request(_request("slerp", (model_a, model_b), out, mode, params, **common)))


@main.command()
@click.option("--slice", "slices", multiple=True, required=True,
              help="MODEL:START-END, layers START..END-1 of MODEL; repeat in output order.")
@output_options
@handle_errors
def stack(slices: tuple[str, ...], out: Path, mode: str | None, **common: Any) -> None:
    """Layer stacking (passthrough): frankenmerges and depth up-scaling, e.g. --slice A:0-24 --slice A:8-32."""
    request = _request("stack", (), out, mode, MergeParams(), **common)
    request.slices = list(slices)
    _done(run_merge_request(request))


def _task_vector_command(method: str, doc: str, sparse: bool) -> None:
    @click.argument("models", nargs=-1, required=True)
    @base_option()
    @weights_option
    @click.option("--normalize/--no-normalize", default=None, help="Divide by the sum of the weights.")
    @output_options
    @handle_errors
    def command(models: tuple[str, ...], base: str | None, weights: str | None, normalize: bool | None, out: Path,
                mode: str | None, density: str | None = None, seed: int | None = None, consensus: bool = False,
                **common: Any) -> None:
        params = MergeParams(weights=comma_floats(weights, "--weights"), normalize=normalize,
                             density=comma_floats(density, "--density"), seed=seed, consensus=consensus)
        _done(run_merge_request(_request(method, models, out, mode, params, base=base, **common)))

    command.__doc__ = doc
    if sparse:
        command = click.option("--density", default=None,
                               help=f"{PARAMETERS['density'].help} (default {DEFAULT_DENSITY:g})")(command)
        command = seed_option(command)
    if METHODS[method].consensus_option:
        command = click.option("--consensus", is_flag=True, help="Elect signs as TIES does (mergekit's dare_ties).")(command)
    main.command(name=method)(command)


_task_vector_command("task-arithmetic", "θ_base + Σ wᵢ·(θᵢ − θ_base) (default weights 1).", sparse=False)
_task_vector_command("ties", "TIES: keep the largest deltas (--density), elect a sign per parameter, average those "
                             "that agree.", sparse=True)
_task_vector_command("dare", "DARE: drop deltas at random (keep --density), rescale the rest, sum (default weights 1).",
                     sparse=True)


def _mergekit_command(method: MergekitMethod) -> None:
    """`merge METHOD MODELS... [--base BASE] [--PARAMETER VALUE ...]`, its options the method's mergekit parameters."""
    # numbers before switches, per-model ones first: the order one reads the method's math in
    options = sorted(method.options(), key=lambda o: (o.kind is bool, not o.per_model))

    def command(models: tuple[str, ...], out: Path, mode: str | None, base: str | None = None,
                seed: int | None = None, **given: Any) -> None:
        parsed = {o.name: o.parse(given.pop(o.name)) for o in options if given.get(o.name) is not None}
        for o in options:
            given.pop(o.name, None)
        params = MergeParams(options=parsed, seed=seed)
        _done(run_merge_request(_request(method.name, models, out, mode, params, base=base, **given)))

    command.__doc__ = method.__doc__
    decorators = [click.argument("models", nargs=-1, required=True)]
    if method.base_policy != "ignored":
        decorators.append(base_option(method.needs_base))
    decorators += [parameter_option(o) for o in options]
    if method.randomized:
        decorators.append(seed_option)
    decorators += [output_options, handle_errors]
    for decorator in reversed(decorators):
        command = decorator(command)
    main.command(name=method.name)(command)


for _method in METHODS.values():
    if isinstance(_method, MergekitMethod):
        _mergekit_command(_method)


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output model dir.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output dir.")
@seed_option
@shard_size_option
@allow_base_mismatch_option
@debug_option
@handle_errors
def config(file: Path, out: Path, overwrite: bool, seed: int | None, shard_size: str | None,
           allow_base_mismatch: bool, debug: bool) -> None:
    """Run any mergekit configuration FILE (for everything the shortcuts don't cover)."""
    _done(run_config_file(file, out, overwrite=overwrite, seed=seed, shard_size=shard_size,
                          allow_base_mismatch=allow_base_mismatch))


@main.command(name="extract-lora")
@click.argument("model")
@click.option("--base", required=True, help="The model MODEL was fine-tuned from.")
@click.option("--rank", "rank", required=True, metavar="R|auto",
              help="The adapter's rank, or auto: the smallest of 1, 2, 4, ... that reaches --min-agreement.")
@click.option("--min-agreement", type=float, default=None,
              help=f"With --rank auto: top-1 agreement with MODEL to keep, over every position of fixed prompts "
                   f"(default {DEFAULT_MIN_AGREEMENT:g}).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output adapter dir.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output dir.")
@debug_option
@handle_errors
def extract_lora(model: str, base: str, rank: str, min_agreement: float | None, out: Path, overwrite: bool,
                 debug: bool) -> None:
    """MODEL − BASE as a LoRA adapter on BASE (mergekit's SVD extraction), with its error in merge.json."""
    request = ExtractRequest(model=model, base=base, out=out, rank=parse_rank(rank), min_agreement=min_agreement,
                             overwrite=overwrite)
    click.echo(f"extracted into {run_extract_lora(request)}")


@main.command()
@click.option("--base", required=True, help="The model whose attention, embeddings and norms the mixture keeps.")
@click.option("--expert", "experts", multiple=True, required=True,
              help="A model or SFT adapter whose MLPs become one expert; repeat, each followed by its --prompts.")
@click.option("--prompts", "prompts", multiple=True,
              help="The expert's routing prompts: a file (one prompt a line) or the text of one prompt.")
@click.option("--gate-mode", type=click.Choice(GATE_MODES), default="hidden", show_default=True,
              help="Router vectors from the prompts' hidden states (runs BASE), their mean embedding, or random.")
@click.option("--experts-per-token", type=int, default=2, show_default=True, help="Experts each token is routed to.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output model dir.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output dir.")
@seed_option
@allow_base_mismatch_option
@debug_option
@handle_errors
def moe(base: str, experts: tuple[str, ...], prompts: tuple[str, ...], gate_mode: str, experts_per_token: int,
        out: Path, overwrite: bool, seed: int | None, allow_base_mismatch: bool, debug: bool) -> None:
    """A mixture of experts (mergekit-moe): BASE with each --expert's MLPs as experts, routed by their --prompts."""
    per_expert = [read_prompts(p) for p in prompts] if prompts or gate_mode != "random" else [[] for _ in experts]
    request = MoERequest(base=base, experts=list(experts), prompts=per_expert, out=out, gate_mode=gate_mode,
                         experts_per_token=experts_per_token, seed=seed, overwrite=overwrite,
                         allow_base_mismatch=allow_base_mismatch)
    _done(run_moe(request))


@main.command(name="moe-config")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output model dir.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output dir.")
@seed_option
@debug_option
@handle_errors
def moe_config(file: Path, out: Path, overwrite: bool, seed: int | None, debug: bool) -> None:
    """Run any mergekit-moe configuration FILE (base_model, experts with positive_prompts, gate_mode, ...)."""
    _done(run_moe_config(file, out, overwrite=overwrite, seed=seed))


if __name__ == "__main__":
    main()
