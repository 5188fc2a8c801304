"""The reference model for DPO implicit rewards: from `--reference`, or from the policy adapter's run.json.

The DPO stage writes `"reference": {"mode": "adapter"|"base"|"precompute"|"model", "adapter": ..., "model": ...}`
and `"beta"` into run.json. When the policy is an adapter on the same base as the reference, reference
log-probs come from the same loaded weights, by disabling the adapter (reference = base) or switching to the
SFT adapter loaded beside it (reference = SFT model), so no second copy of the base is held in memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.core.errors import AlignError
from align.core.models import ResolvedModel, resolve_model
from align.core.reference import REFERENCE_MODES, ReferenceMode

log = logging.getLogger(__name__)

DEFAULT_BETA = 0.1
REFERENCE_ADAPTER = "reference"


@dataclass(frozen=True)
class RewardReference:
    """Where `align eval` gets the reference log-probs of one policy's implicit DPO rewards. Not DPO's reference
    plan (align.train.reference.ReferencePlan): that one says what a DPO run trains against; this one how eval recomputes
    it with the least memory.

    mode `base`: the policy's adapter disabled; `adapter`: another adapter on the policy's base, switched in;
    `model`: a separately loaded model (computed before the policy loads, then freed).
    """

    mode: Literal["base", "adapter", "model"]
    source: Literal["argument", "run.json"]
    beta: float
    adapter: Path | None = None
    model: ResolvedModel | None = None

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "source": self.source, "beta": self.beta,
                "adapter": str(self.adapter) if self.adapter else None,
                "model": self.model.spec if self.model else None}

    @property
    def key(self) -> str:
        """Reference scores depend only on this (and the task), so models sharing a reference share them."""
        target = self.model.fingerprint if self.model else str(self.adapter)
        return f"{self.mode}:{target}"


def find_reward_reference(policy: ResolvedModel, reference: str | None, beta: float | None) -> RewardReference | None:
    """The reference for `policy`'s implicit rewards: `--reference` wins over the DPO run.json's "reference" (whose
    mode is a `ReferenceMode`); `--beta` wins over run.json's beta; None when there is no reference."""
    if reference is not None:
        return _plan_from_spec(policy, resolve_model(reference), "argument", beta if beta is not None else DEFAULT_BETA)
    if policy.adapter is None:
        return None
    record = _read_run_json(policy.adapter)
    if not isinstance(record.get("reference"), dict):
        return None
    entry = record["reference"]
    run_beta = record.get("beta", DEFAULT_BETA)
    chosen_beta = beta if beta is not None else float(run_beta)
    where = policy.adapter / "run.json"
    mode: ReferenceMode | None = entry.get("mode")
    if mode not in REFERENCE_MODES:
        raise AlignError(f"{where}: unknown reference.mode {mode!r} (expected adapter, base, precompute or model)")
    if mode in ("adapter", "precompute"):
        # `precompute` only says when TRL computed the reference; the reference itself is the SFT adapter or base
        if entry.get("adapter"):
            resolved = resolve_model(_relative_to(entry["adapter"], policy.adapter))
            return _plan_from_spec(policy, resolved, "run.json", chosen_beta)
        return RewardReference("base", "run.json", chosen_beta)
    if mode == "base":
        return RewardReference("base", "run.json", chosen_beta)
    if mode == "model":
        if not entry.get("model"):
            raise AlignError(f"{where}: reference.mode is 'model' but reference.model is empty")
        return _plan_from_spec(policy, resolve_model(entry["model"]), "run.json", chosen_beta)
    raise AlignError(f"{where}: reference.mode {mode!r} is chosen by the DPO run, never recorded")


def _read_run_json(adapter: Path) -> dict[str, Any]:
    path = adapter / "run.json"
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AlignError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    return record if isinstance(record, dict) else {}


def _relative_to(spec: str, adapter: Path) -> str:
    """A relative adapter path in run.json may be relative to the run's dir rather than to the current one."""
    if Path(spec).expanduser().exists():
        return spec
    beside = adapter / spec
    return str(beside) if beside.exists() else spec


def _plan_from_spec(policy: ResolvedModel, reference: ResolvedModel, source: Literal["argument", "run.json"],
                    beta: float) -> RewardReference:
    same_base = policy.adapter is not None and Path(reference.base).resolve() == Path(policy.base).resolve()
    if same_base and reference.adapter is None:
        return RewardReference("base", source, beta)
    if same_base:
        return RewardReference("adapter", source, beta, adapter=reference.adapter)
    return RewardReference("model", source, beta, model=reference)


def activate_reference(model: Any, plan: RewardReference) -> Any:
    """A context manager under which `model` computes as the reference (modes `base` and `adapter`)."""
    import contextlib

    if plan.mode == "base":
        return model.disable_adapter()

    @contextlib.contextmanager
    def switched() -> Any:
        active = model.active_adapter
        if REFERENCE_ADAPTER not in model.peft_config:
            model.load_adapter(str(plan.adapter), adapter_name=REFERENCE_ADAPTER)
        model.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            model.set_adapter(active)

    return switched()
