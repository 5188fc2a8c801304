"""The recipe's `train:` section checked value by value before anything loads.

`train` passes straight through to TRL's `SFTConfig` / `DPOConfig`. Their keys are checked in `config.py`; here their
values are coerced the way TRL's own parser (transformers' `HfArgumentParser`) reads a command line from the
dataclass field types (`"1e-4"` -> 1e-4, `"yes"` -> True, an enum field to one of its values), or refused with the
field, the value given and the type expected. Without this a wrong value surfaces only when torch trips over it,
after the model has loaded (`learning_rate: fast` failed inside Adam with a TypeError).

Then the ranges of the numeric fields we know (positive sizes and steps, a learning rate > 0, betas in [0, 1)), and
combinations no single field shows (a DPO prompt budget that leaves no room for the answer, packing with an
attention path that would let packed sequences see each other).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, Literal, Union

from align.core.errors import AlignError

# HfArgumentParser's string_to_bool, which is how TRL's scripts read `--packing yes`.
TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")

# Ranges of the numeric fields whose meaning we know: (low, low_open, high, high_open); None = unbounded.
Range = tuple[float | None, bool, float | None, bool]
POSITIVE: Range = (0, True, None, False)
NON_NEGATIVE: Range = (0, False, None, False)
UNIT_OPEN: Range = (0, False, 1, True)
# Only the TRL fields the recipe's TrainSettings does not declare: those it declares are range-checked there, once
# (align/core/config.py; tests/test_trl_fields.py keeps the two apart).
FIELD_RANGES: dict[str, Range] = {
    "per_device_eval_batch_size": POSITIVE,
    "eval_accumulation_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "adam_epsilon": POSITIVE,
    "dataset_num_proc": POSITIVE,
    "pad_to_multiple_of": POSITIVE,
    "max_grad_norm": NON_NEGATIVE,
    "adam_beta1": UNIT_OPEN,
    "adam_beta2": UNIT_OPEN,
    "warmup_ratio": UNIT_OPEN,
}

# Trainer fields that were renamed, as configs written for older TRL / transformers releases (every handbook recipe)
# still spell them: old name -> the name that replaced it. A key takes the new name only where the installed config
# class lacks the old one and has the new one, as `training.checkpointing_argument_names` does for checkpointing.
RENAMED_FIELDS: dict[str, str] = {
    "warmup_ratio": "warmup_steps",  # transformers 5.15 removed warmup_ratio; a warmup_steps below 1 is that share
    "evaluation_strategy": "eval_strategy",  # transformers 4.46
    "max_seq_length": "max_length",  # TRL 0.20
    "no_cuda": "use_cpu",  # transformers 4.37
    "push_to_hub_token": "hub_token",
    "push_to_hub_model_id": "hub_model_id",
}

# Attention paths that keep packed sequences apart, and how (the one list: the packing decision and the recipe check
# read it). Varlen kernels run each sequence alone (cu_seqlens). For sdpa and eager, transformers (5.17 to 5.25,
# `masking_utils.find_packed_sequence_indices`) builds a block-diagonal causal mask from position ids that restart at
# 0 when there is no attention mask and no cache (TRL's padding-free collator emits them, and SFTTrainer passes
# use_cache=False): tests/test_packing.py checks both against each sequence alone, and that the check catches a
# leaking path. flex_attention builds its block mask through the same utilities but is not listed: its backward does
# not run on a CPU, so nothing here has shown it exact.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn",
                    "kernels-community/flash-attn3")
MASKED_ATTENTION = ("sdpa", "eager")
PACKING_ATTENTION = VARLEN_ATTENTION + MASKED_ATTENTION


def installed_field_names(train: dict[str, Any], config_cls: type, where: str) -> dict[str, Any]:
    """`train` with each renamed field under the name the installed `config_cls` has (`RENAMED_FIELDS`).

    `warmup_ratio` becomes `warmup_steps` only as a share: transformers reads a warmup_steps of 1 or more as a step
    count, so a ratio outside [0, 1) is refused rather than turned into steps."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    renamed = dict(train)
    for old, value in train.items():
        new = RENAMED_FIELDS.get(old)
        if old in names or new is None or new not in names:
            continue
        problem = range_problem(old, value)
        if problem:
            raise AlignError(f"{where}: train.{old}: {problem}, got {_shown(value)}")
        if new in train and train[new] != value:
            raise AlignError(f"{where}: train.{old} ({_shown(value)}) and train.{new} ({_shown(train[new])}) both "
                             f"given: {old} is {new} in this version of {config_cls.__name__}, give one")
        del renamed[old]
        renamed[new] = value
    return renamed


def eval_strategy(train: dict[str, Any]) -> str:
    """The eval strategy a `train` section asks for, as TrainingArguments reads it: "no" when unset (YAML 1.1 reads
    an unquoted `no` as false)."""
    value = train.get("eval_strategy", train.get("evaluation_strategy", "no"))
    value = getattr(value, "value", value)
    return "no" if value in (None, False, "no") else str(value)


class _Refused(Exception):
    """A value that does not fit a field type; `expected` says what would."""

    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def check_trl_values(recipe: Any, config_cls: type, where: str | None = None) -> dict[str, Any]:
    """The recipe's `train` values coerced to `config_cls`'s field types and checked for range and combination.
    Returns the coerced mapping (keys are already known to be fields, see `config.check_trl_keys`)."""
    hints = typing.get_type_hints(config_cls)
    prefix = f"{where}: " if where else ""
    train: dict[str, Any] = {}
    for key, value in recipe.train.items():
        try:
            train[key] = coerce(value, hints[key]) if key in hints else value
        except _Refused as refused:
            raise AlignError(f"{prefix}train.{key}: expected {refused.expected}, got {_shown(value)}") from None
        problem = range_problem(key, train[key]) or choice_problem(config_cls, key, train[key])
        if problem:
            raise AlignError(f"{prefix}train.{key}: {problem}, got {_shown(value)}")
    problem = combination_problem(recipe, train, config_cls)
    if problem:
        raise AlignError(f"{prefix}{problem}")
    return train


def field_choices(config_cls: type, key: str) -> list[str] | None:
    """The values a TRL config field accepts, as the installed TRL states them: the field's `choices` metadata, or
    the values its help lists after "Possible values are:" (DPOConfig.loss_type); None when it states none."""
    import re

    field = next((f for f in dataclasses.fields(config_cls) if f.name == key), None)
    if field is None:
        return None
    if field.metadata.get("choices"):
        return [str(c) for c in field.metadata["choices"]]
    listed = re.search(r"Possible values are:(.*?)(?:\.\s|\.$)", str(field.metadata.get("help", "")), re.S)
    values = re.findall(r"[`']+([A-Za-z0-9_-]+)[`']+", listed.group(1)) if listed else []
    return values or None


def choice_problem(config_cls: type, key: str, value: Any) -> str | None:
    """A value (or list of values) outside what the installed config lists for the field."""
    choices = field_choices(config_cls, key)
    if choices is None:
        return None
    wrong = [v for v in (value if isinstance(value, list) else [value]) if str(v) not in choices]
    return f"expected one of {', '.join(choices)}" if wrong else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- types ---------------------------------------------------------------------------------------------------------


def coerce(value: Any, hint: Any) -> Any:
    """`value` as HfArgumentParser would read it for a field of type `hint`; raises _Refused."""
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return _coerce_union(value, typing.get_args(hint))
    if hint is Any or hint is object:
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return value
        raise _Refused("one of " + ", ".join(map(str, choices)))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [member.value for member in hint]
        if isinstance(value, hint):
            return value.value
        if isinstance(value, str) and value in values:
            return value
        raise _Refused("one of " + ", ".join(map(str, values)))
    if hint is bool:
        return _to_bool(value)
    if hint is int:
        return _to_int(value)
    if hint is float:
        return _to_float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # the parser reads every command-line word as a string
        raise _Refused("a string")
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        items = value if isinstance(value, (list, tuple)) else [value]  # nargs="+": one word is a list of one
        if not args:
            return list(items)
        try:
            return [coerce(item, args[0]) for item in items]
        except _Refused as refused:
            raise _Refused(f"a list of {refused.expected.removeprefix('a ').removeprefix('an ')}") from None
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _Refused("a mapping")
    return value  # a type the parser cannot read from a command line either (ParallelismConfig): TRL checks it


def _coerce_union(value: Any, args: tuple[Any, ...]) -> Any:
    none_allowed = type(None) in args
    members = [a for a in args if a is not type(None)]
    if value is None:
        if none_allowed:
            return None
        raise _Refused(_describe(members))
    # As HfArgumentParser does, `X | str` with an enum X is read as the enum (its values are the choices).
    enums = [a for a in members if isinstance(a, type) and issubclass(a, enum.Enum)]
    if enums and str in members:
        return coerce(value, enums[0])
    # Otherwise the first member type that takes the value as it is, then the first that converts it.
    for member in members:
        if _fits_exactly(value, member):
            return coerce(value, member)
    for member in members:
        try:
            return coerce(value, member)
        except _Refused:
            continue
    raise _Refused(_describe(members) + (" or null" if none_allowed else ""))


def _fits_exactly(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, hint) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if hint is str:
        return isinstance(value, str)
    return False


def _describe(members: list[Any]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    parts = []
    for member in members:
        origin = typing.get_origin(member) or member
        if isinstance(member, type) and issubclass(member, enum.Enum):
            parts.append("one of " + ", ".join(str(m.value) for m in member))
        elif origin in (list, tuple):
            parts.append("a list")
        else:
            parts.append(names.get(origin, getattr(member, "__name__", str(member))))
    return " or ".join(dict.fromkeys(parts))


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, int)) and str(value).lower() in TRUE_WORDS:
        return True
    if isinstance(value, (str, int)) and str(value).lower() in FALSE_WORDS:
        return False
    raise _Refused("true or false")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Refused("an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)  # YAML 1.2 reads `1e3` as a float
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _Refused("an integer")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Refused("a number")
    number: float | None = None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            number = None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise _Refused("a finite number" if number is not None else "a number")
    return number


# ---- ranges and combinations ----------------------------------------------------------------------------------------


def range_problem(key: str, value: Any) -> str | None:
    """What is wrong with a known numeric field's value, or None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if key == "max_steps":
        return None if value == -1 or value > 0 else "must be a positive number of steps (or -1: use epochs)"
    if key == "warmup_steps" and value >= 1 and not float(value).is_integer():
        return "must be a share of the steps below 1, or a whole number of steps"
    bounds = FIELD_RANGES.get(key)
    if bounds is None:
        return None
    low, low_open, high, high_open = bounds
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return None
    lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    upper = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    return "must be " + " and ".join(part for part in (lower, upper) if part)


def combination_problem(recipe: Any, train: dict[str, Any], config_cls: type) -> str | None:
    """A problem no single value shows, or None."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls) if f.default is not dataclasses.MISSING}

    def setting(key: str) -> Any:
        return train.get(key, defaults.get(key))

    max_length = setting("max_length")
    max_prompt = getattr(recipe, "max_prompt_length", None)
    if max_prompt is not None and max_length is not None and max_prompt >= max_length:
        return (f"max_prompt_length {max_prompt} >= train.max_length {max_length}: no token left for the completion "
                "(lower max_prompt_length or raise max_length)")
    packed = bool(setting("packing")) and setting("packing_strategy") in ("bfd", "bfd_split")
    padding_free = bool(setting("padding_free")) or packed
    attn = getattr(getattr(recipe, "model", None), "attn", None)
    if padding_free and attn is not None and attn not in PACKING_ATTENTION:
        what = "train.packing" if packed else "train.padding_free"
        return (f"{what} with model.attn {attn!r}: that attention path cannot keep packed sequences apart "
                f"(use one of {', '.join(PACKING_ATTENTION)}, or turn packing off)")
    if setting("bf16") is True and setting("fp16") is True:
        return "train.bf16 and train.fp16 are both true: pick one"
    return None
