"""Click options generated from the recipe models, the way TRL's `TrlParser` and litgpt's jsonargparse derive a
command line from dataclasses: each recipe field that carries a `Flag` becomes one option, its docstring the help and
its default the shown default. Adding a flag is adding one described field to align/core/config.py.

Every generated option defaults to None (not given), so a recipe's YAML value survives unless the flag is given:
YAML < flags < `--set`, merged by `config.build_recipe`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from align.core.config import Flag, SFTRecipe, TrainRecipe


@dataclass(frozen=True)
class FlaggedField:
    """A recipe field offered as a flag: its dotted recipe key, the field, its flag, and the model declaring it."""

    key: str
    field: FieldInfo
    flag: Flag
    owner: type[BaseModel]

    @property
    def help(self) -> str:
        """The field's docstring; an override without one keeps its parent's."""
        name = self.key.rpartition(".")[2]
        for model in self.owner.__mro__:
            field = getattr(model, "model_fields", {}).get(name)
            if field is not None and field.description:
                return " ".join(field.description.split())
        return ""

    @property
    def shown_default(self) -> str:
        return show_value(self.field.get_default(call_default_factory=True), self.flag)


def show_value(value: Any, flag: Flag) -> str:
    """How `--help` shows a default: None as what it means, bools as on/off, lists comma-separated."""
    if value is None:
        text = flag.unset or "none"
    elif isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    return f"{text} ({flag.note})" if flag.note else text


def flagged_fields(model: type[BaseModel], prefix: str = "") -> Iterator[FlaggedField]:
    """The fields of `model` that carry a Flag, sections and `train` settings included, in declaration order."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            yield from flagged_fields(section, f"{key}.")
        elif name == "train" and isinstance(model, type) and issubclass(model, TrainRecipe):
            yield from flagged_fields(model.train_settings, "train.")
        flag = next((m for m in field.metadata if isinstance(m, Flag)), None)
        if flag is not None:
            yield FlaggedField(key, field, flag, model)


def find_field(model: type[BaseModel], key: str) -> FlaggedField:
    for found in flagged_fields(model):
        if found.key == key:
            return found
    raise KeyError(f"{model.__name__} has no flagged field {key}")


def recipe_default(model: type[BaseModel], key: str) -> Any:
    """A recipe field's default, for commands that plan a run without a recipe (`align estimate`)."""
    return find_field(model, key).field.get_default(call_default_factory=True)


def recipe_option(key: str, *names: str, **kwargs: Any) -> Any:
    """An option of a command that is not a training command (`align estimate`, `align data inspect`) with the
    default and help of the `align sft` recipe field `key`, so it looks at the run the training command would do
    when neither is given a flag."""
    field = find_field(SFTRecipe, key)
    kwargs.setdefault("help", field.help)
    return click.option(*names, default=field.field.get_default(call_default_factory=True), show_default=True,
                        **kwargs)


class ShownDefaultOption(click.Option):
    """An option whose value is None unless given, showing the default it stands for as `[default: 8]`; click
    would print a string `show_default` in parentheses (`[default: (8)]`)."""

    def __init__(self, decls: list[str], shown: str, **kwargs: Any) -> None:
        super().__init__(decls, default=None, show_default=True, **kwargs)
        self.shown = shown

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        extra["default"] = self.shown
        return extra


class RecipeOption(ShownDefaultOption):
    """An option generated from a recipe field: it knows the recipe key it sets."""

    def __init__(self, decls: list[str], flagged: FlaggedField, **kwargs: Any) -> None:
        super().__init__(decls, flagged.shown_default, **kwargs)
        self.flagged = flagged

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None or not self.flagged.flag.trl_choices:
            return record
        return record[0], f"{record[1]} Installed: {', '.join(installed_choices(self.flagged))}."

    def to_recipe(self, value: Any) -> Any:
        flag = self.flagged.flag
        if flag.multiple:
            return list(value) if value else None
        if flag.comma_list and isinstance(value, str) and value not in flag.keep:
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


def installed_choices(flagged: FlaggedField) -> list[str]:
    """What the installed TRL config lists for the field (read when `--help` is shown, not at import)."""
    import importlib

    from align.core.trl_fields import field_choices

    module, _, name = str(flagged.flag.trl_choices).partition(":")
    return field_choices(getattr(importlib.import_module(module), name), flagged.key.rpartition(".")[2]) or ["?"]


class Number(click.ParamType):
    """An int when written as one, else a float: `--save-steps 50` stays a step count, `--warmup 0.05` a share."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float:
        if isinstance(value, (int, float)):
            return value
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number", param, ctx)


NUMBER = Number()


def _members(annotation: Any) -> list[Any]:
    """The non-None members of a (possibly optional, possibly union) annotation."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def click_settings(flagged: FlaggedField) -> tuple[list[str], dict[str, Any]]:
    """The option's declarations and keyword arguments, from the field's type and flag."""
    flag = flagged.flag
    name = flagged.key.replace(".", "__")
    members = _members(flagged.field.annotation)
    literals = [v for m in members if get_origin(m) is Literal for v in get_args(m)]
    kwargs: dict[str, Any] = {"help": flagged.help}
    if bool in members:
        long, *short = flag.names
        decls = [f"{long}/--no-{long.removeprefix('--')}", *short] if flag.negatable else list(flag.names)
        return [*decls, name], kwargs if flag.negatable else {**kwargs, "is_flag": True}
    if flag.choices or (literals and len(literals) == sum(len(get_args(m)) for m in members)):
        kwargs["type"] = click.Choice(list(flag.choices or literals))
    elif members == [int]:
        kwargs["type"] = click.INT
    elif members == [float]:
        kwargs["type"] = click.FLOAT
    elif set(members) == {int, float}:
        kwargs["type"] = NUMBER
    if flag.metavar:
        kwargs["metavar"] = flag.metavar
    if flag.multiple:
        kwargs["multiple"] = True
    return [*flag.names, name], kwargs


def recipe_options(model: type[TrainRecipe]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding one option per flagged field of `model`, in the order the fields are declared."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for flagged in reversed(list(flagged_fields(model))):
            decls, kwargs = click_settings(flagged)
            fn = click.option(*decls, cls=RecipeOption, flagged=flagged, **kwargs)(fn)
        return fn

    return decorate


def recipe_flags(ctx: click.Context) -> dict[str, Any]:
    """The recipe keys the command line set, as build_recipe takes them (None = not given)."""
    return {p.flagged.key: p.to_recipe(ctx.params.get(p.name)) for p in ctx.command.params
            if isinstance(p, RecipeOption)}
