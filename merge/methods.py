"""The merge methods: one registry from CLI name to the mergekit method and the adapter-space math.

Each shortcut only builds a mergekit configuration dict; mergekit validates it (`MergeConfiguration`) and runs it.
The CLI subcommand is the registry key; `mergekit_method` is the name mergekit knows it by.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from merge import adapters as lora


@dataclass(frozen=True)
class MergeParams:
    """Method parameters, as the user gave them (None: the method's default)."""

    weights: list[float] | None = None
    normalize: bool | None = None
    t: list[float] | None = None
    t_attn: list[float] | None = None
    t_mlp: list[float] | None = None
    density: list[float] | None = None
    consensus: bool = False
    seed: int | None = None
    slices: list[tuple[str, int, int]] = field(default_factory=list)
    """Layer stacking: (model path, start, end) with `end` exclusive, as in mergekit's `layer_range`."""


@dataclass(frozen=True)
class Method:
    mergekit_method: Callable[[MergeParams], str]
    default_weight: Callable[[int], float]
    needs_base: bool
    adapter_math: str | None
    """Which adapter-space function applies: 'linear', 'slerp', 'task_arithmetic', 'ties', 'dare'."""


METHODS: dict[str, Method] = {
    "linear": Method(lambda p: "linear", lambda n: 1.0 / n, False, "linear"),
    "slerp": Method(lambda p: "slerp", lambda n: 1.0, False, "slerp"),
    "stack": Method(lambda p: "passthrough", lambda n: 1.0, False, None),
    "task-arithmetic": Method(lambda p: "task_arithmetic", lambda n: 1.0, True, "task_arithmetic"),
    "ties": Method(lambda p: "ties", lambda n: 1.0, True, "ties"),
    "dare": Method(lambda p: "dare_ties" if p.consensus else "dare_linear", lambda n: 1.0, True, "dare"),
}
DEFAULT_DENSITY = 0.5
DEFAULT_T = [0.5]


# ---- mergekit configurations ------------------------------------------------------------------------------------


def build_config(method: str, models: list[str], base: str | None, params: MergeParams) -> dict[str, Any]:
    """The mergekit configuration for one shortcut; `models` and `base` are local model dirs."""
    spec = METHODS[method]
    name = spec.mergekit_method(params)
    if method == "stack":
        return {"merge_method": name,
                "slices": [{"sources": [{"model": m, "layer_range": [s, e]}]} for m, s, e in params.slices]}
    if method == "slerp":
        return {"merge_method": name, "base_model": models[0],
                "models": [{"model": m} for m in models], "parameters": {"t": t_setting(params)}}
    weights = params.weights or [spec.default_weight(len(models))] * len(models)
    entries = []
    for i, model in enumerate(models):
        entry: dict[str, Any] = {"weight": weights[i]}
        if method in ("ties", "dare"):
            entry["density"] = densities(params, len(models))[i]
        entries.append({"model": model, "parameters": entry})
    config: dict[str, Any] = {"merge_method": name, "models": entries}
    if base is not None:
        config["base_model"] = base
    normalize = params.normalize if params.normalize is not None else (False if method == "linear" else None)
    if normalize is not None:
        config["parameters"] = {"normalize": normalize}
    return config


def t_setting(params: MergeParams) -> Any:
    """`-t` as mergekit takes it: a scalar, a gradient across layers, or filtered per-module overrides."""
    def value(ts: list[float]) -> float | list[float]:
        return ts[0] if len(ts) == 1 else list(ts)

    t = value(params.t or DEFAULT_T)
    overrides = [{"filter": f, "value": value(ts)} for f, ts in (("self_attn", params.t_attn), ("mlp", params.t_mlp))
                 if ts]
    return overrides + [{"value": t}] if overrides else t


def densities(params: MergeParams, count: int) -> list[float]:
    if params.density is None:
        return [DEFAULT_DENSITY] * count
    return params.density if len(params.density) == count else params.density * count


# ---- adapter space ----------------------------------------------------------------------------------------------


def merge_adapters(method: str, adapters: list[lora.LoraAdapter], params: MergeParams, num_layers: int,
                   rank: int | None) -> lora.AdapterMerge:
    """Merge adapters without materializing a model: exact concatenation for linear, SVD otherwise."""
    spec = METHODS[method]
    count = len(adapters)
    weights = params.weights or [spec.default_weight(count)] * count
    exact_rank = lora.default_rank(adapters)
    if spec.adapter_math == "linear":
        weights = [w / sum(weights) for w in weights] if params.normalize else weights
        if rank is None or rank >= exact_rank:
            return lora.merge_linear(adapters, weights, rank or exact_rank)
    rank = rank or exact_rank
    if spec.adapter_math == "linear":
        delta_fn = lambda name, deltas: lora.task_arithmetic_deltas(deltas, weights)  # noqa: E731
    elif spec.adapter_math == "slerp":
        setting = t_setting(params)
        delta_fn = lambda name, deltas: lora.slerp_deltas(layer_t(name, setting, num_layers), *deltas)  # noqa: E731
    elif spec.adapter_math == "task_arithmetic":
        delta_fn = lambda name, deltas: lora.task_arithmetic_deltas(deltas, weights)  # noqa: E731
    else:
        ties = spec.adapter_math == "ties"
        normalize = params.normalize if params.normalize is not None else ties
        dens = densities(params, count)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        delta_fn = lambda name, deltas: lora.sparse_consensus_deltas(  # noqa: E731
            deltas, weights, dens, "magnitude" if ties else "random", consensus=ties or params.consensus,
            normalize=normalize, rescale=not ties)
    return lora.merge_deltas(adapters, delta_fn, rank)


def layer_t(module: str, setting: Any, num_layers: int) -> float:
    """t for one module as mergekit resolves it: gradients run over layer index / (layers - 1)."""
    from mergekit.config import ConditionalParameter, evaluate_setting

    from merge.inputs import LAYER_INDEX

    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        setting = [ConditionalParameter.model_validate(item) for item in setting]
    found = LAYER_INDEX.search(module + ".")
    position = int(found.group(1)) / (num_layers - 1) if found and num_layers > 1 else 0.0
    return float(evaluate_setting(module + ".weight", setting, position, validate=float))
