"""Recipes: typed, validated once at the edge. YAML sets defaults, CLI flags override, `--set` overrides both.

A recipe has sections `model`, `data`, `lora`, `train`. `train` passes straight through to TRL's `SFTConfig` /
`DPOConfig` field names, so every TRL option is reachable; its keys are checked against those dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from align.core.errors import AlignError, did_you_mean
from align.core.trl_fields import check_trl_values
from align.core.flat_config import flat_to_recipe, is_flat_config


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    name: str = "smollm2-135m"
    """What `--model` names: a model dir, hub id, .gguf file, adapter dir, or the alias `smollm2-135m`."""
    dtype: str = "auto"
    """auto (bf16 where the hardware runs it fast, else fp32), float32, bfloat16, bf16-autocast, float16."""
    attn: str = "sdpa"
    """Attention implementation: sdpa, eager, flash_attention_2."""
    quantize: Literal["4bit", "8bit"] | None = None
    """Load the base through bitsandbytes (QLoRA with 4bit)."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """auto: only when the planned peak does not fit the device's memory."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the model; auto means off (chat batches vary in shape and it recompiles every step)."""


class MixtureSource(Section):
    """One source of a dataset mixture: all its rows, `rows` of them, or a `weight` share of them."""

    path: str
    """A local jsonl/json/csv/parquet file, a hub dataset id, or `builtin:NAME` (as data.path)."""
    split: str | None = None
    format: str | None = None
    """Force this source's format (sources may differ in format; each is detected on its own)."""
    rows: int | None = Field(default=None, gt=0)
    """Take this many rows: a sample drawn with the seed, without replacement."""
    weight: float | None = Field(default=None, gt=0)
    """Take this share of the rows (a seeded sample); above 1 every row repeats floor(weight) times, plus a sample
    for the fraction."""

    @model_validator(mode="after")
    def _rows_or_weight(self) -> "MixtureSource":
        if self.rows is not None and self.weight is not None:
            raise ValueError("give rows or weight, not both")
        return self


class DataSpec(Section):
    path: str = "builtin:pig-latin"
    """A local jsonl/json/csv/parquet file, a hub dataset id, or `builtin:NAME`."""
    mixture: list[MixtureSource] | None = None
    """Several sources instead of `path`, e.g. [{path: a.jsonl, rows: 100}, {path: b.jsonl, weight: 0.5}]; sampled
    with train.seed, recorded per source in run.json's data record."""
    format: str | None = None
    """Force a format instead of detecting it."""
    split: str | None = None
    limit: int | None = Field(default=None, gt=0)
    eval_path: str | None = None
    """A separate evaluation file or dataset."""
    eval_split: str | None = None
    eval_size: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Hold out this share of the training rows for eval loss when no eval_path is given."""
    skip_invalid: bool = False
    """Drop invalid rows (and report how many) instead of stopping at the first."""
    loss_on: Literal["assistant", "last", "all"] = "assistant"
    """Which tokens carry loss: every assistant turn, the last assistant turn, or everything."""

    @model_validator(mode="after")
    def _path_or_mixture(self) -> "DataSpec":
        default = type(self).model_fields["path"].default
        if self.mixture is not None and self.path != default:
            raise ValueError("give data.path or data.mixture, not both")
        if self.mixture is not None and not self.mixture:
            raise ValueError("data.mixture is empty")
        return self


class LoraSpec(Section):
    r: int = Field(default=16, gt=0)
    alpha: float | None = None
    """Defaults to 2*r."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    rslora: bool = False
    dora: bool = False
    init: Literal["default", "gaussian", "pissa", "loftq"] = "default"

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


class TrainRecipe(Section):
    """What `align sft` and `align dpo` share."""

    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    lora: LoraSpec = LoraSpec()
    train: dict[str, Any] = {}
    """Passed to TRL's SFTConfig / DPOConfig (field names as TRL spells them)."""
    report_to: Literal["auto", "none", "tensorboard", "trackio", "wandb"] = "auto"
    """Experiment tracker. auto: TensorBoard event files under the output dir if tensorboard is installed, else
    trackio's local store if trackio is, else none. wandb is the only remote choice (the only one that makes network
    calls). Name the experiment with train.project and the run with train.run_name (`align run` sets both)."""
    output: str | None = None
    resume: bool = False
    overwrite: bool = False

    @field_validator("train")
    @classmethod
    def _train_is_mapping(cls, value: dict[str, Any]) -> dict[str, Any]:
        return dict(value)


class SFTRecipe(TrainRecipe):
    pass


class PreferenceDataSpec(DataSpec):
    path: str = "builtin:pig-latin-prefs"
    pairs: Literal["best_worst", "all"] = "best_worst"
    """Scored completions: best vs worst, or every pair whose scores differ by more than `score_margin`."""
    score_margin: float = Field(default=0.0, ge=0.0)


class DPORecipe(TrainRecipe):
    """`align dpo`. beta, loss_type, label_smoothing and every other DPOConfig field go through `train`."""

    data: PreferenceDataSpec = PreferenceDataSpec()
    adapter: str | None = None
    """The SFT adapter dir: the policy starts as a copy of it, and (with ref=adapter) it is the reference."""
    ref: str | None = None
    """auto | adapter | base | precompute | model:PATH. Default (auto): precompute where the data allows it, else
    adapter when `adapter` is set, else base (align.train.dpo.choose_reference)."""
    max_prompt_length: int | None = Field(default=None, gt=0)
    """Keep the last N prompt tokens (the ones nearest the answer). TRL 1.16's DPOConfig has only max_length."""
    max_completion_length: int | None = Field(default=None, gt=0)
    """Keep the first N tokens of each completion."""

    @field_validator("ref")
    @classmethod
    def _known_reference(cls, value: str | None) -> str | None:
        if value is None or value in ("auto", "adapter", "base", "precompute"):
            return value
        if value.startswith("model:") and value.removeprefix("model:").strip():
            return value
        raise ValueError("expected auto, adapter, base, precompute or model:PATH")


# ---- loading and overriding --------------------------------------------------------------------------------------


class RecipeLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; every recipe writes learning rates that way,
    so floats are resolved as YAML 1.2 does."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path, what: str = "recipe", expected: str = "a recipe must be a mapping of sections"
              ) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every problem is one line naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise AlignError(f"{what} not found: {path}")
    try:
        data = yaml_load(path.read_bytes().decode("utf-8-sig")) or {}
    except UnicodeDecodeError as exc:
        raise AlignError(f"{path}: not UTF-8 text (byte at offset {exc.start}; save the file as UTF-8)") from None
    except OSError as exc:
        raise AlignError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    except RecursionError:
        raise AlignError(f"{path}: nested too deeply to read") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise AlignError(f"{where}: invalid YAML ({_first_line(getattr(exc, 'problem', None) or exc)})") from None
    if not isinstance(data, dict):
        raise AlignError(f"{path}: {expected}")
    return data


def _first_line(problem: Any) -> str:
    """PyYAML's reader errors run over several lines; the first says what was wrong."""
    return (str(problem).strip().splitlines() or [type(problem).__name__])[0]


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c = value` in nested dicts, creating levels as needed."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {} if child is None else _fail_scalar(dotted, key)
        node = child
    node[keys[-1]] = value


def _fail_scalar(dotted: str, key: str) -> dict[str, Any]:
    raise AlignError(f"--set {dotted}: '{key}' is a value, not a section")


def parse_set(items: tuple[str, ...] | list[str]) -> list[tuple[str, Any]]:
    """`--set train.learning_rate=1e-4` pairs; values are parsed as YAML scalars (numbers, bools, lists)."""
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise AlignError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def build_recipe(
    cls: type[TrainRecipe],
    recipe_path: str | Path | None,
    flags: dict[str, Any],
    sets: tuple[str, ...] | list[str] = (),
    trl_config: type | None = None,
) -> TrainRecipe:
    """Merge YAML < flags < --set, then validate. `flags` maps dotted keys to values (None = not given).
    The YAML may also be a TRL / alignment-handbook flat config (align.core.flat_config)."""
    data = load_yaml(recipe_path) if recipe_path else {}
    if trl_config is not None and is_flat_config(data, set(cls.model_fields), trl_config):
        data = flat_to_recipe(data, set(cls.model_fields), trl_config, str(recipe_path))
    for key, value in flags.items():
        if value is not None:
            set_path(data, key, value)
    for key, value in parse_set(sets):
        set_path(data, key, value)
    recipe = validate(cls, data, str(recipe_path or "recipe"))
    if trl_config is not None:
        check_trl_keys(recipe.train, trl_config, str(recipe_path or "train"))
        recipe.train = check_trl_values(recipe, trl_config, str(recipe_path) if recipe_path else None)
    return recipe


def validate(cls: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """Validate with pydantic; the first error becomes one line (`one_line_error`)."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise one_line_error(exc, where, cls) from None


def one_line_error(exc: ValidationError, where: str, cls: type[BaseModel] | None = None) -> AlignError:
    """A pydantic ValidationError as one line: where, the field's dotted path, pydantic's message and the value
    given (when short), with a did-you-mean for an unknown key of `cls`. Recipes, suites and mergekit
    configurations all report through it."""
    error = exc.errors()[0]
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden" and cls is not None:
        section = _section_model(cls, error["loc"][:-1])
        hint = did_you_mean(str(error["loc"][-1]), list(section.model_fields)) if section else ""
        return AlignError(f"{where}: unknown key {loc!r}{hint}")
    got = repr(error.get("input"))
    got = f" (got {got})" if len(got) <= 80 else ""
    return AlignError(f"{where}: {loc or 'top level'}: {error['msg']}{got}")


def _section_model(cls: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = cls
    for part in path:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def check_trl_keys(train: dict[str, Any], config_cls: type, where: str) -> None:
    names = {f.name for f in dataclasses.fields(config_cls)}
    for key in train:
        if key not in names:
            raise AlignError(
                f"{where}: unknown key {'train.' + str(key)!r}{did_you_mean(key, sorted(names))} "
                f"(train keys are {config_cls.__name__} fields)"
            )


def recipe_dict(recipe: BaseModel) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
