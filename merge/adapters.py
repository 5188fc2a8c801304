"""Merging LoRA adapters in adapter space: math on the low-rank factors, with no full model materialized.

mergekit merges full weight tensors; it has no notion of LoRA factors (its `model+lora` syntax merges each adapter
into its base first). So the factor math lives here, as pure functions on tensors: an adapter module is
ΔW = scale·B·A with A (r, in), B (out, r). Linear is exact by concatenating factors. Every other method needs the
dense deltas, so we compute ΔW per module, apply mergekit's own per-tensor functions (its `slerp`, its
sparsification and TIES sign election) to the deltas, and re-factorize the result to rank r with a truncated SVD.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.core.errors import AlignError

LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save", "rank_pattern": "rank_pattern",
               "alpha_pattern": "alpha_pattern"}


@dataclass(frozen=True)
class LoraFactors:
    """One module's low-rank update: ΔW = scale · B @ A."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B.double() @ self.A.double()).float()


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraFactors] = field(default_factory=dict)
    """Keyed by the module's full key prefix in the adapter file (`base_model.model.model.layers.0...q_proj`)."""

    @property
    def rank(self) -> int:
        return int(self.config["r"])


# ---- reading and writing ----------------------------------------------------------------------------------------


def lora_scale(config: dict[str, Any]) -> float:
    """PEFT's scaling: alpha/r, or alpha/√r with rsLoRA."""
    r, alpha = float(config["r"]), float(config.get("lora_alpha", config["r"]))
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r


def read_adapter(path: Path) -> LoraAdapter:
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AlignError(f"{path}: a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
    for key, label in UNSUPPORTED.items():
        if config.get(key):
            raise AlignError(f"{path}: adapters with {label} cannot be merged in adapter space (use --materialize)")
    if config.get("bias", "none") != "none":
        raise AlignError(f"{path}: adapters that train biases cannot be merged in adapter space (use --materialize)")
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AlignError(f"{path}: no adapter_model.safetensors")
    tensors = load_file(str(weights_file))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if not match:
            raise AlignError(f"{weights_file}: tensor {key} is not a LoRA A/B factor; use --materialize")
        factors.setdefault(match["module"], {})[match["factor"]] = tensor.float()
    scale = lora_scale(config)
    modules = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise AlignError(f"{weights_file}: module {module} lacks its lora_{'B' if 'A' in pair else 'A'} factor")
        modules[module] = LoraFactors(pair["A"], pair["B"], scale)
    return LoraAdapter(path, config, modules)


def write_adapter(out: Path, template: dict[str, Any], modules: dict[str, LoraFactors], rank: int) -> None:
    """Save factors as a PEFT adapter whose scale is 1 (lora_alpha = r): the factors carry every scale."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for module, factors in modules.items():
        assert factors.rank == rank and factors.scale == 1.0, module
        tensors[f"{module}.lora_A.weight"] = factors.A.contiguous()
        tensors[f"{module}.lora_B.weight"] = factors.B.contiguous()
    config = dict(template)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}), init_lora_weights=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---- pure math --------------------------------------------------------------------------------------------------


def linear_lora(inputs: list[LoraFactors | None], weights: list[float], rank: int) -> LoraFactors:
    """Exact: Σ wᵢ·scaleᵢ·BᵢAᵢ = [w₁s₁B₁ | w₂s₂B₂ | ...] @ [A₁; A₂; ...]; zero-padded to `rank`.

    A module absent from an input contributes nothing, so its block is left out.
    """
    present = [(f, w) for f, w in zip(inputs, weights) if f is not None]
    A = torch.cat([f.A for f, _ in present], dim=0)
    B = torch.cat([w * f.scale * f.B for f, w in present], dim=1)
    return _pad_rank(LoraFactors(A, B, 1.0), rank)


def svd_refactor(delta: torch.Tensor, rank: int) -> tuple[LoraFactors, float]:
    """Best rank-`rank` factors of `delta` (Eckart–Young) and the relative Frobenius error ‖Δ − BA‖/‖Δ‖.

    The singular values are split evenly (B = U√S, A = √S Vᵀ) so neither factor dwarfs the other.
    """
    work = delta.double()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    keep = min(rank, S.shape[0])
    root = S[:keep].sqrt()
    B = U[:, :keep] * root
    A = root[:, None] * Vh[:keep]
    norm = torch.linalg.matrix_norm(work)
    error = float(torch.linalg.matrix_norm(work - B @ A) / norm) if norm > 0 else 0.0
    return _pad_rank(LoraFactors(A.float(), B.float(), 1.0), rank), error


def _pad_rank(factors: LoraFactors, rank: int) -> LoraFactors:
    missing = rank - factors.rank
    if missing <= 0:
        return factors
    A = torch.cat([factors.A, factors.A.new_zeros(missing, factors.A.shape[1])], dim=0)
    B = torch.cat([factors.B, factors.B.new_zeros(factors.B.shape[0], missing)], dim=1)
    return LoraFactors(A, B, factors.scale)


def slerp_deltas(t: float, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """mergekit's SLERP (with its near-colinear fallback to linear) on one pair of deltas."""
    from mergekit.merge_methods.slerp import slerp

    return slerp(torch.tensor([t]), d0[None], d1[None])[0]


def task_arithmetic_deltas(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * d for w, d in zip(weights, deltas))


def sparse_consensus_deltas(
    deltas: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    sparsification: str,
    consensus: bool,
    normalize: bool,
    rescale: bool,
) -> torch.Tensor:
    """TIES and DARE on deltas, mirroring mergekit's GeneralizedTaskArithmeticMerge.merge_group.

    mergekit's version takes its own TensorGroup objects built by its planner, so we call its pure pieces
    (`sparsify`, `get_mask`) in the same order instead: sparsify each delta, weight, elect signs, sum, normalize.
    """
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    method = SparsificationMethod(sparsification)
    sparse = torch.stack([
        sparsify(d, density=p, method=method, rescale_norm=RescaleNorm.l1 if rescale else None)
        for d, p in zip(deltas, densities)
    ])
    w = torch.tensor(weights, dtype=sparse.dtype).reshape(-1, *([1] * (sparse.dim() - 1)))
    sparse = sparse * w
    if consensus:
        mask = get_mask(sparse, method="sum").to(sparse.dtype)
        mixed = (sparse * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = sparse.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    return mixed / divisor if normalize else mixed


# ---- the adapter-space merge ------------------------------------------------------------------------------------

DeltaMethod = Callable[[str, list[torch.Tensor]], torch.Tensor]


@dataclass
class AdapterMerge:
    """The result of an adapter-space merge: factors per module, and per-module SVD errors (empty for linear)."""

    modules: dict[str, LoraFactors]
    rank: int
    reconstruction_error: dict[str, float]


def default_rank(adapters: list[LoraAdapter]) -> int:
    """The sum of the input ranks: enough to hold linear and task-arithmetic results exactly."""
    return sum(a.rank for a in adapters)


def merge_linear(adapters: list[LoraAdapter], weights: list[float], rank: int) -> AdapterMerge:
    modules = {
        name: linear_lora([a.modules.get(name) for a in adapters], weights, rank) for name in _module_names(adapters)
    }
    return AdapterMerge(modules, rank, {})


def merge_deltas(adapters: list[LoraAdapter], method: DeltaMethod, rank: int) -> AdapterMerge:
    """Apply `method(module_name, deltas)` to each module's dense deltas and re-factorize to `rank`."""
    modules, errors = {}, {}
    for name in _module_names(adapters):
        deltas = [_delta_or_zeros(a, name, adapters) for a in adapters]
        merged = method(name, deltas)
        modules[name], errors[name] = svd_refactor(merged, rank)
    return AdapterMerge(modules, rank, errors)


def _module_names(adapters: list[LoraAdapter]) -> list[str]:
    return sorted({name for a in adapters for name in a.modules})


def _delta_or_zeros(adapter: LoraAdapter, name: str, adapters: list[LoraAdapter]) -> torch.Tensor:
    if name in adapter.modules:
        return adapter.modules[name].delta()
    shape_source = next(a.modules[name] for a in adapters if name in a.modules)
    return torch.zeros(shape_source.B.shape[0], shape_source.A.shape[1])


def check_module_shapes(adapters: list[LoraAdapter]) -> None:
    """Adapters on one base must agree on every module's (out, in); ranks may differ."""
    seen: dict[str, tuple[tuple[int, int], Path]] = {}
    for adapter in adapters:
        for name, f in adapter.modules.items():
            shape = (f.B.shape[0], f.A.shape[1])
            if name in seen and seen[name][0] != shape:
                raise AlignError(f"module {name} is {list(seen[name][0])} in {seen[name][1]} but {list(shape)} "
                                 f"in {adapter.path}")
            seen.setdefault(name, (shape, adapter.path))
