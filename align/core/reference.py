"""The DPO reference, named once: what `--ref` accepts, what run.json records under "reference", what the memory
planner plans for, and what `align eval` reads back from a DPO adapter's run.json."""

from __future__ import annotations

from typing import Literal, get_args

ReferenceMode = Literal["auto", "adapter", "base", "precompute", "model"]
"""auto (the default): precompute where the data allows it, else adapter (base without an SFT adapter), chosen by
`align.train.reference.choose_reference` and recorded as the mode it chose, with the reason; adapter: the frozen SFT
adapter; base: the base with adapters off; precompute: the reference's log-probs computed once before training (from
the SFT adapter when there is one, else the base); model: a separate model (`model:PATH`)."""

REFERENCE_MODES: tuple[ReferenceMode, ...] = get_args(ReferenceMode)


def parse_reference(spec: str) -> tuple[ReferenceMode, str | None]:
    """`auto`, `adapter`, `base`, `precompute` or `model:PATH` as (mode, PATH); ValueError for anything else."""
    mode, sep, path = spec.partition(":")
    if mode == "model" and sep and path.strip():
        return "model", path
    if mode in REFERENCE_MODES and mode != "model" and not sep:
        return mode, None  # type: ignore[return-value]
    raise ValueError(f"expected {', '.join(REFERENCE_MODES[:-1])} or model:PATH")
