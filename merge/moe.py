"""`merge moe` and `merge moe-config`: a mixture of experts from dense models, by mergekit-moe.

Data flow: the experts (and their routing prompts) → checks on small files (architecture, shapes, vocabulary, each
adapter's base, counts, prompts) → in the partial dir, adapters merged into their base → mergekit-moe's own
`build` (its gate vectors from the prompts, its output architecture chosen from the base: Mixtral for Llama or
Mistral) → the base's tokenizer, chat template and a generation config that stops at end of turn → merge.json last.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.core.artifacts import Timer, check_output_dir, output_dir, provenance
from align.core.config import load_yaml, one_line_error
from align.core.errors import AlignError
from align.core.template import write_template
from merge import inputs as checks
from merge.inputs import MergeInput

GATE_MODES = ("hidden", "cheap_embed", "random")
"""mergekit-moe's gate modes: router vectors from the prompts' hidden states per layer (runs the base), from the
prompts' mean token embedding (same for every layer), or at random (prompts optional; pass a seed)."""
MERGEKIT_GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
"""Every gate mode mergekit-moe reads (`merge moe-config` takes them all)."""


@dataclass
class MoERequest:
    """One `merge moe`: the base, the experts in order, and each expert's routing prompts."""

    base: str
    experts: list[str]
    prompts: list[list[str]]
    """Per expert, its positive prompts (mergekit's `positive_prompts`); may be empty lists with gate mode random."""
    out: Path
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    seed: int | None = None
    overwrite: bool = False
    allow_base_mismatch: bool = False
    template_source: str | None = None
    """A model or adapter dir whose tokenizer and chat template the MoE takes (the base's otherwise): the pipeline
    passes its last SFT stage, so the mixture renders and stops as the experts were trained to."""


@dataclass
class _Plan:
    """What one MoE run needs once its inputs are checked: mergekit-moe's configuration with local paths, the one
    written beside the weights (inputs named as the user named them), and the inputs to record."""

    run_config: dict[str, Any]
    shown_config: dict[str, Any]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    tokenizer_dir: Path | None = None


def read_prompts(value: str) -> list[str]:
    """`--prompts FILE_OR_TEXT`: a file's non-empty lines, one prompt each, or the text itself as one prompt."""
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise AlignError(f"--prompts {value}: not UTF-8 text") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise AlignError(f"--prompts {value}: the file holds no prompts (one per line)")
        return prompts
    if not value.strip():
        raise AlignError("--prompts '': an empty prompt (give the text, or a file with one prompt per line)")
    return [value]


def run_moe(request: MoERequest) -> Path:
    """Check everything, then build the MoE into `request.out`; returns the output dir."""
    from merge.run import local_dir, mergekit_reference

    check_output_dir(request.out, request.overwrite)
    check_counts(request.gate_mode, request.experts_per_token, len(request.experts), request.prompts)
    base = checks.resolve_inputs([request.base])[0]
    experts = checks.resolve_inputs(request.experts)
    everyone = [base] + experts
    checks.check_architectures(everyone)
    checks.check_shapes(everyone)
    checks.check_vocabularies(everyone, None)
    checks.check_base_mismatches(checks.base_mismatches(experts, base), request.allow_base_mismatch)
    if len({(e.resolved.base, str(e.resolved.adapter)) for e in experts}) == 1:
        raise AlignError("every --expert is the same model: the mixture would compute what one expert does")
    timer = Timer()
    with output_dir(request.out, overwrite=request.overwrite) as handle:
        scratch = handle.path / ".materialized"
        scratch.mkdir()
        with timer.phase("materialize"):
            local = {item.spec: local_dir(item, scratch) for item in everyone}
        shown = {item.spec: mergekit_reference(item) for item in everyone}
        run_config, shown_config = (_config(request, base, experts, paths) for paths in (local, shown))
        plan = _Plan(run_config, shown_config, [{**i.describe(), "role": "base" if i is base else "expert"}
                                                for i in everyone],
                     Path(request.template_source) if request.template_source else base.tokenizer_dir)
        eos = _build(plan, handle.path, request.seed, timer)
        shutil.rmtree(scratch)
        record = _record("moe", plan, handle.path, request.out, eos, timer, {
            "experts_per_token": request.experts_per_token, "gate_mode": request.gate_mode, "seed": request.seed,
            "allow_base_mismatch": request.allow_base_mismatch, "template_source": request.template_source})
        handle.commit("merge.json", record)
    return request.out


def run_moe_config(path: Path, out: Path, overwrite: bool = False, seed: int | None = None) -> Path:
    """`merge moe-config FILE`: any mergekit-moe configuration, validated by mergekit's own model."""
    check_output_dir(out, overwrite)
    raw = load_yaml(path, "MoE config file", "expected a mergekit-moe configuration (a mapping with base_model and "
                                             "experts)")
    raw = resolve_moe_models(raw)
    config = validate_moe_config(raw, str(path))
    prompts = [list(e.positive_prompts or []) for e in config.experts]
    negatives = [list(e.negative_prompts or []) for e in config.experts]
    check_counts(config.gate_mode, config.experts_per_token, len(config.experts), prompts, where=f"{path}: ",
                 negatives=negatives, gate_modes=MERGEKIT_GATE_MODES)
    models = [config.base_model] + [e.source_model for e in config.experts] + [
        e.source_model for e in config.shared_experts or []]
    items = [_local_reference(m, path) for m in models]
    if all(e.source_model == config.experts[0].source_model for e in config.experts[1:]):
        raise AlignError(f"{path}: every expert is the same model: the mixture would compute what one expert does")
    if all(i is not None for i in items):
        checks.check_architectures(items)
        checks.check_shapes(items)
    timer = Timer()
    plan = _Plan(raw, raw, [{"spec": str(m), "role": "base" if k == 0 else "expert"} for k, m in enumerate(models)],
                 items[0].tokenizer_dir if items[0] is not None else None)
    with output_dir(out, overwrite=overwrite) as handle:
        eos = _build(plan, handle.path, seed, timer)
        record = _record("moe-config", plan, handle.path, out, eos, timer, {"config_file": str(path), "gate_mode": config.gate_mode,
                                                          "experts_per_token": config.experts_per_token, "seed": seed})
        handle.commit("merge.json", record)
    return out


# ---- checks -----------------------------------------------------------------------------------------------------


def check_counts(gate_mode: str, experts_per_token: int, experts: int, prompts: list[list[str]],
                 where: str = "", negatives: list[list[str]] | None = None,
                 gate_modes: tuple[str, ...] = GATE_MODES) -> None:
    """mergekit-moe's own `is_bad_config` rules as one-line errors (it logs them and exits 1), plus a prompt list
    per expert. `prompts` are each expert's positive prompts, `negatives` its negative ones (configurations only)."""
    if gate_mode not in gate_modes:
        raise AlignError(f"{where}gate mode {gate_mode!r}: expected one of {', '.join(gate_modes)}")
    if experts < 2:
        raise AlignError(f"{where}a mixture needs at least 2 experts, got {experts}")
    if experts_per_token < 1:
        raise AlignError(f"{where}experts per token {experts_per_token}: must be at least 1")
    if experts_per_token > experts:
        raise AlignError(f"{where}experts per token {experts_per_token} is more than the {experts} experts")
    if len(prompts) != experts:
        raise AlignError(f"{where}{len(prompts)} --prompts for {experts} experts: give one --prompts after each --expert")
    if gate_mode == "random":
        return
    for index, given in enumerate(prompts):
        if not given:
            raise AlignError(f"{where}expert {index + 1} has no prompts (gate mode {gate_mode} routes by them)")
    routed_by = [(p, n) for p, n in zip(prompts, negatives or [[] for _ in prompts])]
    if all(r == routed_by[0] for r in routed_by[1:]):
        raise AlignError(f"{where}every expert has the same prompts: the router could not tell them apart")


def validate_moe_config(raw: Any, where: str) -> Any:
    from mergekit.moe.config import MoEMergeConfig
    from pydantic import ValidationError

    try:
        return MoEMergeConfig.model_validate(raw)
    except ValidationError as exc:
        raise one_line_error(exc, where) from None
    except (RuntimeError, ValueError) as exc:
        raise AlignError(f"{where}: {str(exc).splitlines()[0]}") from None


def resolve_moe_models(raw: dict[str, Any]) -> dict[str, Any]:
    """Name models as `merge config` does (the embedded alias, .gguf files); mergekit-moe calls an expert's model
    `source_model`, which resolve_config_models does not know."""
    from merge.run import resolve_config_models

    def expert(e: Any) -> Any:
        if not isinstance(e, dict) or not isinstance(e.get("source_model"), str):
            return e
        return {**e, "source_model": resolve_config_models({"model": e["source_model"]})["model"]}

    resolved = resolve_config_models(raw)
    for key in ("experts", "shared_experts"):
        if isinstance(resolved.get(key), list):
            resolved[key] = [expert(e) for e in resolved[key]]
    return resolved


def _local_reference(reference: Any, path: Path) -> MergeInput | None:
    """A local model dir of the configuration as a MergeInput (for the shape checks); None for a hub model."""
    if reference.lora is not None:  # mergekit-moe loads every model as it is, with no LoRA merge
        raise AlignError(f"{path}: {reference}: mergekit-moe cannot read a MODEL+LORA reference; give the adapter dir "
                         "to `merge moe --expert`, which merges it into its base first")
    local = Path(reference.model.path).expanduser()
    looks_local = reference.model.path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise AlignError(f"{path}: model {reference.model.path} not found (no such directory)")
    return checks.resolve_inputs([str(local)])[0] if local.is_dir() else None


# ---- running mergekit-moe ---------------------------------------------------------------------------------------


def _config(request: MoERequest, base: MergeInput, experts: list[MergeInput], paths: dict[str, str]) -> dict[str, Any]:
    return {
        "base_model": paths[base.spec],
        "gate_mode": request.gate_mode,
        "experts_per_token": request.experts_per_token,
        "experts": [{"source_model": paths[e.spec], **({"positive_prompts": p} if p else {})}
                    for e, p in zip(experts, request.prompts)],
    }


def _build(plan: _Plan, out: Path, seed: int | None, timer: Timer) -> int | list[int] | None:
    """mergekit-moe's `build` (gate vectors, output architecture, weights, tokenizer), then our template."""
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build, select_output_arch
    from transformers.trainer_utils import set_seed

    from merge.run import _forget_mergekit_loaders, mergekit_bars_off

    config = validate_moe_config(plan.run_config, "the MoE configuration")
    options = MergeOptions(quiet=True, random_seed=seed, copy_tokenizer=True)
    try:
        select_output_arch(config, options)  # it logs why and exits 1 when no output architecture fits
    except SystemExit:
        raise AlignError("mergekit-moe has no output architecture for these models (Mixtral takes Llama or Mistral, "
                         "Qwen2-MoE Qwen2, DeepSeek-MoE Llama or Mistral with shared experts)") from None
    if seed is not None:
        set_seed(seed)  # what mergekit-moe's --random-seed does (MergeOptions.apply_global_options)
    with timer.phase("mergekit-moe"):
        try:
            logging.getLogger().disabled = True  # its progress logging is at INFO and WARNING on the root logger
            with mergekit_bars_off():
                build(config, str(out), options, device=options.device, allow_all_same=True)
        except SystemExit:
            raise AlignError("mergekit-moe refused the configuration") from None
        finally:
            logging.getLogger().disabled = False
            _forget_mergekit_loaders()
    header = "# reproduce with: merge moe-config mergekit_moe_config.yml -o OUT (or mergekit-moe)\n"
    (out / "mergekit_moe_config.yml").write_text(header + yaml.safe_dump(plan.shown_config, sort_keys=False))
    # mergekit-moe saved the base's tokenizer with left padding and PAD = BOS (for its prompts); restore it
    return write_template(out, plan.tokenizer_dir)


def _record(command: str, plan: _Plan, written: Path, out: Path, eos: Any, timer: Timer,
            parameters: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(written))
    return {
        "command": command,
        "method": "moe",
        "inputs": plan.inputs,
        "parameters": parameters,
        "output": {"kind": "model", "path": str(out), "architecture": (config.architectures or ["?"])[0],
                   "experts": getattr(config, "num_local_experts", None)},
        "eos_token_id": eos,
        **provenance(timer.timings()),
    }
