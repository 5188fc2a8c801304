"""Values addressed by a dotted path (`train.learning_rate`) in the nested dicts a recipe is read into: what `--set`,
flags and flat TRL configs write through."""

from __future__ import annotations

from typing import Any

from align.core.errors import AlignError


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
