"""The merge methods: one registry (`METHODS`) from a method's name (the CLI subcommand) to its object, which carries
its mergekit configuration, its adapter-space math and its defaults, as mergekit's `merge_methods/registry.py` does.

Each shortcut only builds a mergekit configuration dict; mergekit validates it (`MergeConfiguration`) and runs it.
Adapter space merges each module's LoRA delta with the same math (merge.adapters) and re-factorizes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from align.core.errors import AlignError
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


DEFAULT_DENSITY = 0.5
DEFAULT_T = [0.5]


class MergeMethod:
    """One merge method. Subclasses set the class attributes and override what differs."""

    name: str
    """The registry key and CLI subcommand."""
    needs_base: bool = False
    """Task vectors are relative to a base model (`--base`)."""
    min_models: int = 2
    max_models: int | None = None
    adapter_space: bool = True
    """Whether adapters can be merged as adapters (`--as-adapter`) with this method."""

    def mergekit_method(self, params: MergeParams) -> str:
        """The name mergekit knows the method by."""
        return self.name.replace("-", "_")

    def default_weight(self, count: int) -> float:
        return 1.0

    def weights(self, params: MergeParams, count: int) -> list[float]:
        return params.weights or [self.default_weight(count)] * count

    def check_count(self, count: int) -> None:
        minimum = 1 if self.needs_base else self.min_models
        if self.max_models is not None and count != self.max_models:
            raise AlignError(f"{self.name} merges exactly {self.max_models} models; {count} given")
        if count < minimum:
            raise AlignError(f"{self.name} needs at least {minimum} models; {count} given")

    def mergekit_config(self, models: list[str], base: str | None, params: MergeParams) -> dict[str, Any]:
        """The mergekit configuration; `models` and `base` are local model dirs."""
        raise NotImplementedError

    def adapter_deltas(self, params: MergeParams, count: int, num_layers: int) -> lora.DeltaMethod | None:
        """How one module's LoRA deltas combine in adapter space; None: the method has no adapter-space form."""
        return None

    def exact_adapter_merge(self, adapters: list[lora.LoraAdapter], params: MergeParams,
                            rank: int | None) -> lora.AdapterMerge | None:
        """A merge with no SVD, where the method allows one at the requested rank."""
        return None


class WeightedMethod(MergeMethod):
    """Methods whose configuration is a weight (and maybe a density) per model."""

    uses_density: bool = False
    default_normalize: bool | None = None
    """What mergekit gets for `normalize` when the user gives none (None: leave it to mergekit)."""

    def mergekit_config(self, models: list[str], base: str | None, params: MergeParams) -> dict[str, Any]:
        weights = self.weights(params, len(models))
        entries = []
        for i, model in enumerate(models):
            entry: dict[str, Any] = {"weight": weights[i]}
            if self.uses_density:
                entry["density"] = densities(params, len(models))[i]
            entries.append({"model": model, "parameters": entry})
        config: dict[str, Any] = {"merge_method": self.mergekit_method(params), "models": entries}
        if base is not None:
            config["base_model"] = base
        normalize = params.normalize if params.normalize is not None else self.default_normalize
        if normalize is not None:
            config["parameters"] = {"normalize": normalize}
        return config


class Linear(WeightedMethod):
    name = "linear"
    default_normalize = False

    def default_weight(self, count: int) -> float:
        return 1.0 / count

    def _adapter_weights(self, params: MergeParams, count: int) -> list[float]:
        weights = self.weights(params, count)
        return [w / sum(weights) for w in weights] if params.normalize else weights

    def exact_adapter_merge(self, adapters: list[lora.LoraAdapter], params: MergeParams,
                            rank: int | None) -> lora.AdapterMerge | None:
        exact_rank = lora.default_rank(adapters)
        if rank is not None and rank < exact_rank:
            return None
        # linear_lora concatenates the factors: the sum is exact, no SVD
        return lora.merge_linear(adapters, self._adapter_weights(params, len(adapters)), rank or exact_rank)

    def adapter_deltas(self, params: MergeParams, count: int, num_layers: int) -> lora.DeltaMethod | None:
        weights = self._adapter_weights(params, count)
        return lambda name, deltas: lora.task_arithmetic_deltas(deltas, weights)


class Slerp(MergeMethod):
    name = "slerp"
    max_models = 2

    def mergekit_config(self, models: list[str], base: str | None, params: MergeParams) -> dict[str, Any]:
        return {"merge_method": "slerp", "base_model": models[0],
                "models": [{"model": m} for m in models], "parameters": {"t": t_setting(params)}}

    def adapter_deltas(self, params: MergeParams, count: int, num_layers: int) -> lora.DeltaMethod | None:
        setting = t_setting(params)
        return lambda name, deltas: lora.slerp_deltas(layer_t(name, setting, num_layers), *deltas)


class Stack(MergeMethod):
    """Layer stacking (mergekit's passthrough over slices); it builds a new model, so it has no adapter form."""

    name = "stack"
    min_models = 0
    adapter_space = False

    def mergekit_method(self, params: MergeParams) -> str:
        return "passthrough"

    def mergekit_config(self, models: list[str], base: str | None, params: MergeParams) -> dict[str, Any]:
        return {"merge_method": "passthrough",
                "slices": [{"sources": [{"model": m, "layer_range": [s, e]}]} for m, s, e in params.slices]}


class TaskArithmetic(WeightedMethod):
    name = "task-arithmetic"
    needs_base = True

    def adapter_deltas(self, params: MergeParams, count: int, num_layers: int) -> lora.DeltaMethod | None:
        weights = self.weights(params, count)
        return lambda name, deltas: lora.task_arithmetic_deltas(deltas, weights)


class Ties(WeightedMethod):
    """Trim each task vector to its largest `density` share, elect a sign per parameter, average the agreeing."""

    name = "ties"
    needs_base = True
    uses_density = True
    adapter_normalize = True
    adapter_selection = "magnitude"

    def adapter_deltas(self, params: MergeParams, count: int, num_layers: int) -> lora.DeltaMethod | None:
        weights, dens = self.weights(params, count), densities(params, count)
        normalize = params.normalize if params.normalize is not None else self.adapter_normalize
        consensus, rescale = self.consensus(params), self.adapter_selection == "random"
        if params.seed is not None:
            torch.manual_seed(params.seed)
        return lambda name, deltas: lora.sparse_consensus_deltas(
            deltas, weights, dens, self.adapter_selection, consensus=consensus, normalize=normalize, rescale=rescale)

    def consensus(self, params: MergeParams) -> bool:
        return True


class Dare(Ties):
    """Drop a random `1 - density` share of each task vector and rescale the rest; sign consensus on request."""

    name = "dare"
    adapter_normalize = False
    adapter_selection = "random"

    def mergekit_method(self, params: MergeParams) -> str:
        return "dare_ties" if params.consensus else "dare_linear"

    def consensus(self, params: MergeParams) -> bool:
        return params.consensus


METHODS: dict[str, MergeMethod] = {m.name: m for m in (Linear(), Slerp(), Stack(), TaskArithmetic(), Ties(), Dare())}


# ---- mergekit configurations ------------------------------------------------------------------------------------


def build_config(method: str, models: list[str], base: str | None, params: MergeParams) -> dict[str, Any]:
    """The mergekit configuration for one shortcut; `models` and `base` are local model dirs."""
    return METHODS[method].mergekit_config(models, base, params)


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
    """Merge adapters without materializing a model: exactly where the method allows, else per module's delta,
    re-factorized by SVD to `rank` (default: the sum of the input ranks)."""
    spec = METHODS[method]
    exact = spec.exact_adapter_merge(adapters, params, rank)
    if exact is not None:
        return exact
    deltas = spec.adapter_deltas(params, len(adapters), num_layers)
    if deltas is None:
        raise AlignError(f"{method} has no adapter-space form")
    return lora.merge_deltas(adapters, deltas, rank or lora.default_rank(adapters))


def layer_t(module: str, setting: Any, num_layers: int) -> float:
    """t for one module as mergekit resolves it: gradients run over layer index / (layers - 1)."""
    from mergekit.config import ConditionalParameter, evaluate_setting

    from merge.inputs import LAYER_INDEX

    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        setting = [ConditionalParameter.model_validate(item) for item in setting]
    found = LAYER_INDEX.search(module + ".")
    position = int(found.group(1)) / (num_layers - 1) if found and num_layers > 1 else 0.0
    return float(evaluate_setting(module + ".weight", setting, position, validate=float))
