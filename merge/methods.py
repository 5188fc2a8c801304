"""The merge methods: one registry (`METHODS`) from a method's name (the CLI subcommand) to its object, which carries
its mergekit configuration, its adapter-space math and its defaults, as mergekit's `merge_methods/registry.py` does.

Each shortcut only builds a mergekit configuration dict; mergekit validates it (`MergeConfiguration`) and runs it.
Adapter space merges each module's LoRA delta with the same math (merge.adapters) and re-factorizes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    options: dict[str, Any] = field(default_factory=dict)
    """The parameters of a MergekitMethod shortcut, by mergekit's name: a list (one value or one per model) for a
    per-model parameter, one value for a shared one (`t`: a list, a gradient across layers when longer than 1)."""


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
    no_adapter_space: str = ""
    """Why not, where it cannot."""
    adapter_space_by_default: bool = False
    """Adapters of one base merge in adapter space unless `--materialize` (where that is exact)."""
    from_slices: bool = False
    """The inputs are layer slices (`--slice MODEL:START-END`), not whole models; one model may give several."""
    consensus_option: bool = False
    """The shortcut takes `--consensus` (TIES sign election on top of the method)."""

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

    def check_params(self, params: MergeParams, count: int) -> None:
        """Refuse values mergekit would fail on (or silently clamp), before anything loads."""
        from merge import inputs as checks

        checks.check_count("--weights", params.weights, count, "models")
        if params.density is not None and len(params.density) not in (1, count):
            raise AlignError(f"--density: {len(params.density)} values given for {count} models (give 1 or {count})")
        checks.check_density(params.density)
        for name, values in (("-t", params.t), ("--t-attn", params.t_attn), ("--t-mlp", params.t_mlp)):
            checks.check_unit_interval(name, values)

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
    adapter_space_by_default = True  # a weighted sum of LoRA deltas is exact as an adapter (concatenated factors)

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
    no_adapter_space = "layer stacking builds a new model"
    from_slices = True

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
        stream = SeededStream(params.seed) if params.seed is not None else None

        def merge_module(name: str, deltas: list[torch.Tensor]) -> torch.Tensor:
            with stream.active() if stream else contextlib.nullcontext():
                return lora.sparse_consensus_deltas(deltas, weights, dens, self.adapter_selection,
                                                    consensus=consensus, normalize=normalize, rescale=rescale)

        return merge_module

    def consensus(self, params: MergeParams) -> bool:
        return True


class SeededStream:
    """A seeded random stream for code that draws from torch's global RNG (mergekit's `sparsify`), without touching
    the caller's: each use runs on the stream's own state inside `fork_rng` and keeps where it got to, so successive
    modules continue one seeded sequence, as a single `--seed` promises, and the global state is as it was."""

    def __init__(self, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.state = torch.get_rng_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.state)
            yield
            self.state = torch.get_rng_state()


class Dare(Ties):
    """Drop a random `1 - density` share of each task vector and rescale the rest; sign consensus on request."""

    name = "dare"
    adapter_normalize = False
    adapter_selection = "random"
    consensus_option = True

    def mergekit_method(self, params: MergeParams) -> str:
        return "dare_ties" if params.consensus else "dare_linear"

    def consensus(self, params: MergeParams) -> bool:
        return params.consensus


# ---- every other mergekit method, its options read from mergekit ------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    """What mergekit does not record about one of its method parameters: the help and the values that make sense.
    Its type, scope (per model or shared) and default are read from each method's mergekit spec."""

    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    """`low` itself is refused."""
    open_high: bool = False
    flag: str | None = None
    """The CLI flag, where it is not mergekit's name with - for _ (`--weights` and `-t`, the older shortcuts')."""

    def flag_for(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")

    def check(self, flag: str, value: float) -> None:
        too_low = self.low is not None and (value < self.low or (self.open_low and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.open_high and value == self.high))
        if too_low or too_high:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            interval = f"{'(' if self.open_low or self.low is None else '['}{low}, {high}" \
                       f"{')' if self.open_high or self.high is None else ']'}"
            raise AlignError(f"{flag} {value:g} is outside {interval}")


# Every parameter of the mergekit 0.1.5 methods below, by mergekit's name (the YAML key and, with - for _, the flag).
PARAMETERS: dict[str, Parameter] = {
    "weight": Parameter("Each model's weight, comma-separated, one per model, e.g. 0.7,0.3.", flag="--weights"),
    "density": Parameter("Share of each task vector kept, one value or one per model.", 0, 1, open_low=True),
    "gamma": Parameter("Share of each task vector's largest entries dropped as outliers before --density is kept, "
                       "one value or one per model.", 0, 1, open_high=True),
    "epsilon": Parameter("Spread of the keep probability around --density (smallest entries density - epsilon, "
                         "largest density + epsilon), one value or one per model.", 0),
    "lambda": Parameter("Scale of the merged task vector before it is added to the base."),
    "normalize": Parameter("Divide the merged task vector by the sum of the weights."),
    "rescale": Parameter("Rescale the kept entries so each task vector keeps its L1 norm."),
    "int8_mask": Parameter("Hold sign-election masks in int8 (less memory, the same result)."),
    "select_topk": Parameter("Share of task-vector entries kept: those that vary most across the models.", 0, 1,
                             open_low=True),
    "t": Parameter("Interpolation factor; a list such as 0,0.5,1 is a gradient across layers.", 0, flag="-t"),
    "filter_wise": Parameter("Compute the ratio per row of each matrix instead of per tensor."),
    "nuslerp_flatten": Parameter("Interpolate each tensor as one flat vector (--no-nuslerp-flatten: row by row or "
                                 "column by column)."),
    "nuslerp_row_wise": Parameter("Without flattening, interpolate rows instead of columns."),
    "normalize_weights": Parameter("Divide the weights by their sum."),
    "eps": Parameter("Floor for norms, against division by zero.", 0, open_low=True),
    "max_iter": Parameter("Most iterations of the mean.", 1),
    "tol": Parameter("Stop once an iteration moves the mean less than this.", 0, open_low=True),
    "r": Parameter("Extra strength for entries only one model changed, scaled by the overlap ratio.", 0),
    "alpha": Parameter("Cap on the overlap ratio that scales --r.", 0),
}



def parameter(name: str) -> Parameter:
    """What PARAMETERS knows of a mergekit parameter; one it does not know (a newer mergekit's) is offered with
    mergekit's name, type and default and no range, instead of failing every `merge` command at import."""
    return PARAMETERS.get(name) or Parameter(f"mergekit's `{name}` (see its documentation for this method).")


REQUIRED = object()
"""The default of a parameter mergekit requires and the shortcut sets no default for: the user must give it."""


@dataclass(frozen=True)
class Option:
    """One parameter of one method as the CLI shows and parses it."""

    name: str
    """mergekit's name."""
    flag: str
    help: str
    kind: type
    """float, int or bool."""
    per_model: bool
    default: Any

    def describe_default(self) -> str:
        if self.default is REQUIRED:
            return "required"
        if self.kind is bool:
            return f"default {'on' if self.default else 'off'}"
        return f"default {self.default:g}{' each' if self.per_model else ''}"

    def parse(self, raw: str | bool) -> Any:
        """The value from the command line: bools as given, numbers from text (a list where they are per model)."""
        if self.kind is bool:
            return bool(raw)
        values = _numbers(str(raw), self.flag, self.kind)
        if self.per_model or self.name == "t":
            return values
        if len(values) != 1:
            raise AlignError(f"{self.flag} {raw!r}: expected one number")
        return values[0]


def _numbers(text: str, flag: str, kind: type) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise AlignError(f"{flag} {text!r}: expected comma-separated {what}") from None
    if not values:
        raise AlignError(f"{flag} {text!r}: expected a number")
    return values


class MergekitMethod(MergeMethod):
    """A shortcut for one mergekit method that adds nothing to it: its options are the method's own parameters as
    mergekit names them, with the type, scope (per model or shared) and default of mergekit's spec, and the number of
    models and whether a base is taken from the spec's input contract. It has no adapter-space form: adapters are
    merged into their base first."""

    adapter_space = False
    no_adapter_space = "mergekit merges full models; --materialize merges each adapter into its base first"
    defaults: dict[str, Any] = {}
    """The shortcut's own default, where mergekit has none or where mergekit's makes the method a no-op."""
    helps: dict[str, str] = {}
    """What a parameter means for this method, where PARAMETERS' help says something else."""
    randomized = False
    """The method draws at random: `--seed` makes it repeatable."""

    def spec(self) -> Any:
        from mergekit.merge_methods import registry

        return registry.get(self.mergekit_method(MergeParams())).spec

    @property
    def base_policy(self) -> str:
        """`required`, `optional` or `ignored` (mergekit's BasePolicy)."""
        return str(self.spec().contract.base.value)

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        return self.base_policy == "required"

    def model_counts(self) -> tuple[int, int | None]:
        """(fewest, most) models besides the base. mergekit counts the base among its inputs; a merge of one model
        without a base would be a copy, so that takes two."""
        contract = self.spec().contract
        if self.needs_base:
            low = max(contract.min_non_base or 0, contract.min_inputs - 1, 1)
            high = contract.max_non_base if contract.max_non_base is not None else (
                contract.max_inputs - 1 if contract.max_inputs is not None else None)
        else:
            low, high = max(contract.min_non_base or 0, contract.min_inputs, 2), contract.max_non_base
        return low, high

    def check_count(self, count: int) -> None:
        low, high = self.model_counts()
        besides = " besides the base" if self.needs_base else ""
        noun = "model" if low == 1 else "models"
        if low == high and count != low:
            raise AlignError(f"{self.name} merges exactly {low} {noun}{besides}; {count} given")
        if count < low:
            raise AlignError(f"{self.name} needs at least {low} {noun}{besides}; {count} given")
        if high is not None and count > high:
            raise AlignError(f"{self.name} merges at most {high} models{besides}; {count} given")

    def options(self) -> list[Option]:
        """The CLI shape: one option per mergekit parameter, in mergekit's order."""
        from mergekit.merge_methods.base import ParameterScope

        options = []
        for spec in self.spec().parameters:
            known = parameter(spec.name)
            default = self.defaults.get(spec.name, REQUIRED if spec.required else spec.default)
            kind = spec.value_type if spec.value_type in (bool, int) else float
            options.append(Option(spec.name, known.flag_for(spec.name), self.helps.get(spec.name, known.help), kind,
                                  spec.scope != ParameterScope.SHARED, default))
        return options

    @staticmethod
    def given(params: MergeParams, name: str) -> Any:
        """The user's value of a parameter, or None. The older shortcuts' fields count too, so a pipeline merge stage
        (which sets weights, density and t) drives these methods as well."""
        fields = {"weight": params.weights, "density": params.density, "t": params.t, "normalize": params.normalize}
        value = params.options.get(name)
        return fields.get(name) if value is None else value

    def check_params(self, params: MergeParams, count: int) -> None:
        for option in self.options():
            value = self.given(params, option.name)
            if value is None:
                if option.default is REQUIRED:
                    raise AlignError(f"{self.name} needs {option.flag} (mergekit has no default for {option.name})")
                continue
            if option.per_model:
                allowed = (count,) if option.name == "weight" else (1, count)
                if len(value) not in allowed:
                    give = f"1 or {count}" if len(allowed) == 2 else str(count)
                    raise AlignError(f"{option.flag}: {len(value)} values given for {count} models (give {give})")
            for number in value if isinstance(value, list) else [value]:
                if option.kind is not bool:
                    parameter(option.name).check(option.flag, number)

    def resolve(self, params: MergeParams, count: int) -> tuple[dict[str, list[Any]], dict[str, Any]]:
        """Every parameter's value, the user's or the default: (per model, one value per model; shared)."""
        per_model: dict[str, list[Any]] = {}
        shared: dict[str, Any] = {}
        for option in self.options():
            value = self.given(params, option.name)
            if value is None:
                value = option.default
            if option.per_model:
                values = value if isinstance(value, list) else [value]
                per_model[option.name] = values if len(values) == count else values * count
            elif option.name == "t":
                shared["t"] = t_setting(MergeParams(t=value))
            else:
                shared[option.name] = value
        return per_model, shared

    def mergekit_config(self, models: list[str], base: str | None, params: MergeParams) -> dict[str, Any]:
        """Every parameter written out, defaults included, so mergekit_config.yml says what ran."""
        per_model, shared = self.resolve(params, len(models))
        entries = []
        for i, model in enumerate(models):
            entry: dict[str, Any] = {"model": model}
            if per_model:
                entry["parameters"] = {name: values[i] for name, values in per_model.items()}
            entries.append(entry)
        config: dict[str, Any] = {"merge_method": self.mergekit_method(params), "models": entries}
        if base is not None:
            config["base_model"] = base
        if shared:
            config["parameters"] = shared
        return config


# The default density of a sparsifying shortcut: mergekit's is 1.0, which keeps every entry and leaves task arithmetic
TASK_VECTOR_DEFAULTS = {"weight": 1.0, "density": DEFAULT_DENSITY}


class ModelStock(MergekitMethod):
    """Model Stock: the average of the models, moved toward --base by how much their task vectors agree."""

    name = "model-stock"


class Della(MergekitMethod):
    """DELLA: drop task-vector entries at random, keeping large ones likelier (--density ± --epsilon), rescale, elect
    signs as TIES does, add --lambda times the sum to --base."""

    name = "della"
    defaults = TASK_VECTOR_DEFAULTS
    randomized = True

    def check_params(self, params: MergeParams, count: int) -> None:
        super().check_params(params, count)
        per_model, _ = self.resolve(params, count)
        for density, epsilon in zip(per_model["density"], per_model["epsilon"]):
            # mergekit raises mid-merge otherwise; density 1 keeps everything and ignores epsilon
            if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
                raise AlignError(f"--epsilon {epsilon:g} with --density {density:g}: density ± epsilon must lie "
                                 "inside (0, 1)")


class DellaLinear(Della):
    """DELLA's pruning and rescaling, then a weighted sum of the task vectors (no sign election)."""

    name = "della-linear"


class Breadcrumbs(MergekitMethod):
    """Model Breadcrumbs: per tensor, drop each task vector's largest --gamma share and its smallest entries, keeping
    --density, then add the weighted sum to --base."""

    name = "breadcrumbs"
    defaults = TASK_VECTOR_DEFAULTS


class BreadcrumbsTies(Breadcrumbs):
    """Breadcrumbs pruning, then TIES sign election: only entries that agree with the elected sign are summed."""

    name = "breadcrumbs-ties"


class NuSlerp(MergekitMethod):
    """NuSLERP: spherical interpolation of exactly two models by their relative --weights (of their task vectors
    when --base is given)."""

    name = "nuslerp"
    defaults = {"weight": 1.0}


class MultiSlerp(MergekitMethod):
    """Multi-SLERP: spherical interpolation of any number of models by --weights (of their task vectors when --base
    is given)."""

    name = "multislerp"
    defaults = {"weight": 1.0}


class Karcher(MergekitMethod):
    """Karcher mean: the Riemannian mean of the models' weights, found iteratively, equal weights."""

    name = "karcher"


class Sce(MergekitMethod):
    """SCE: keep the task-vector entries that vary most across models (--select-topk), weight each model by its
    squared magnitude, erase entries against the majority sign."""

    name = "sce"


class ArceeFusion(MergekitMethod):
    """Arcee Fusion: take from MODEL only the entries that differ most from --base (a KL-based threshold)."""

    name = "arcee-fusion"


class NearSwap(MergekitMethod):
    """NearSwap: move from --base toward MODEL only where the two are already close (by t / |difference|, at most
    all the way)."""

    name = "nearswap"
    helps = {"t": "Distance scale: an entry moves fully to MODEL where |MODEL - base| <= t, less beyond (e.g. "
                  "0.001); a list such as 0,0.001 is a gradient across layers."}


class Ram(MergekitMethod):
    """RAM: average each task-vector entry over only the models that changed it, so an update one model alone made
    keeps its full strength."""

    name = "ram"
    helps = {"epsilon": "A model changed an entry when |its delta| > epsilon."}


class RamPlusTl(Ram):
    """RAM+ (tensor-local): RAM, with updates unique to one model scaled up by how much the models overlap."""

    name = "ramplus-tl"


METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    Linear(), Slerp(), Stack(), TaskArithmetic(), Ties(), Dare(),
    ModelStock(), Della(), DellaLinear(), Breadcrumbs(), BreadcrumbsTies(), NuSlerp(), MultiSlerp(), Karcher(), Sce(),
    ArceeFusion(), NearSwap(), Ram(), RamPlusTl())}


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
