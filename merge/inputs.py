"""Merge inputs: what each argument names, and the checks that must pass before any weight is read.

Every check here reads only small files (config.json, safetensors headers, tokenizer vocabularies), so a bad
combination of inputs fails in well under a second and before the output dir is created.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.core.errors import AlignError
from align.core.models import ResolvedModel, resolve_model, tokenizer_source

LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class MergeInput:
    """One positional argument (or --base): a full model or a LoRA adapter on a base."""

    spec: str
    resolved: ResolvedModel

    @property
    def is_adapter(self) -> bool:
        return self.resolved.adapter is not None

    @property
    def base_dir(self) -> Path:
        base = Path(self.resolved.base)
        if not base.is_dir():
            raise AlignError(
                f"{self.spec}: merging needs local weights, but {self.resolved.base} is not a local dir "
                "(download it first, or give a model dir, .gguf file or the embedded alias)"
            )
        return base

    @property
    def tokenizer_dir(self) -> Path:
        """An adapter's own tokenizer, else its base's (the rule loading follows: models.tokenizer_source)."""
        source = tokenizer_source(self.resolved)
        return Path(source) if source != self.resolved.base else self.base_dir

    def describe(self) -> dict[str, Any]:
        return self.resolved.describe()


def resolve_inputs(specs: list[str]) -> list[MergeInput]:
    return [MergeInput(spec, resolve_model(spec)) for spec in specs]


# ---- small-file readers -----------------------------------------------------------------------------------------


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers only (no weights are read)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise AlignError(f"{model_dir}: no .safetensors weights (merging reads safetensors only)")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def num_layers(model_dir: Path) -> int:
    config = read_config(model_dir)
    config = config.get("text_config", config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise AlignError(f"{model_dir / 'config.json'}: cannot tell the number of layers")


def vocabulary(item: MergeInput) -> dict[str, int]:
    """The token -> id map an input uses (an adapter's own tokenizer wins over its base's, as in training)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(item.tokenizer_dir)).get_vocab()
    except (OSError, ValueError) as exc:
        raise AlignError(f"{item.spec}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from None


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


# ---- checks -----------------------------------------------------------------------------------------------------


def check_count(name: str, values: list[float] | None, expected: int, what: str) -> None:
    if values is not None and len(values) != expected:
        raise AlignError(f"{name}: {len(values)} values given for {expected} {what}")


def check_unit_interval(name: str, values: list[float] | None) -> None:
    for value in values or []:
        if not 0.0 <= value <= 1.0:
            raise AlignError(f"{name} {value:g} is outside [0, 1]")


def check_density(values: list[float] | None) -> None:
    for value in values or []:
        if not 0.0 < value <= 1.0:
            raise AlignError(f"--density {value:g} is outside (0, 1]")


def check_architectures(items: list[MergeInput]) -> None:
    """Same architecture class and model type for every input."""
    first = items[0]
    first_arch = _architecture(first)
    for item in items[1:]:
        arch = _architecture(item)
        if arch != first_arch:
            raise AlignError(f"different architectures: {first.spec} is {first_arch[0]}, {item.spec} is {arch[0]}")


def _architecture(item: MergeInput) -> tuple[str, str]:
    config = read_config(item.base_dir)
    return ",".join(config.get("architectures") or ["?"]), str(config.get("model_type"))


def check_shapes(items: list[MergeInput], skip_vocab_axis: bool = False, by_layer_kind: bool = False) -> None:
    """Every input has the same tensors with the same shapes; the error names the first mismatching tensor.

    `by_layer_kind` compares `layers.N.x` across any N (for layer stacking, where layer counts may differ).
    `skip_vocab_axis` ignores embedding rows when mergekit rebuilds the vocabulary (--tokenizer-source).
    """
    first = items[0]
    reference = _comparable_shapes(first, by_layer_kind)
    for item in items[1:]:
        shapes = _comparable_shapes(item, by_layer_kind)
        for name in sorted(set(reference) | set(shapes)):
            if name not in shapes or name not in reference:
                missing_in = item.spec if name not in shapes else first.spec
                raise AlignError(f"tensor {name} is missing in {missing_in}: the models have different tensors")
            a, b = reference[name], shapes[name]
            if a == b or (skip_vocab_axis and a[1:] == b[1:] and _is_vocab_tensor(name)):
                continue
            raise AlignError(f"tensor {name} has shape {list(a)} in {first.spec} but {list(b)} in {item.spec}")


def _comparable_shapes(item: MergeInput, by_layer_kind: bool) -> dict[str, tuple[int, ...]]:
    shapes = tensor_shapes(item.base_dir)
    if not by_layer_kind:
        return shapes
    return {LAYER_INDEX.sub(".layers.*.", name): shape for name, shape in shapes.items()}


def _is_vocab_tensor(name: str) -> bool:
    return any(key in name for key in ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings"))


def check_vocabularies(items: list[MergeInput], tokenizer_source: str | None) -> None:
    """Token ids must mean the same thing in every input, unless mergekit is asked to reconcile them."""
    if tokenizer_source is not None:
        return
    first = vocabulary(items[0])
    for item in items[1:]:
        other = vocabulary(item)
        if other != first:
            extra = sorted(set(other) - set(first))[:3] or sorted(set(first) - set(other))[:3]
            raise AlignError(
                f"different vocabularies: {items[0].spec} has {len(first)} tokens, {item.spec} has {len(other)} "
                f"(e.g. {', '.join(map(repr, extra)) or 'ids differ'}); pass --tokenizer-source base|MODEL|union"
            )


def check_same_base(adapters: list[MergeInput]) -> Path:
    """Adapter-space merges add factors on one base; returns that base."""
    first = adapters[0]
    for item in adapters[1:]:
        if not item.is_adapter:
            raise AlignError(f"{item.spec} is a full model: adapter-space merging needs adapters only (use --materialize)")
        if Path(item.resolved.base) != Path(first.resolved.base):
            raise AlignError(
                f"adapters on different bases: {first.spec} is on {first.resolved.base}, "
                f"{item.spec} is on {item.resolved.base}"
            )
    if not first.is_adapter:
        raise AlignError(f"{first.spec} is a full model: adapter-space merging needs adapters only (use --materialize)")
    return first.base_dir


def base_fingerprint(resolved: ResolvedModel) -> str:
    """The fingerprint of the base weights alone (an adapter's is its base's, `+`, its own)."""
    return resolved.fingerprint.rpartition("+")[0] if resolved.adapter is not None else resolved.fingerprint


def same_base(a: ResolvedModel, b: ResolvedModel) -> bool:
    """Whether two models sit on the same base weights: the same dir, or a copy of it (the same fingerprint)."""
    return Path(a.base).resolve() == Path(b.base).resolve() or base_fingerprint(a) == base_fingerprint(b)


def base_mismatches(items: list[MergeInput], base: MergeInput) -> list[str]:
    """The adapters among `items` trained on another model than `base`, each as one phrase. Merged against `base`,
    such an adapter's task vector is its own delta plus the difference between the two bases, and with bases of the
    same shapes nothing else would notice."""
    return [f"{item.spec} was trained on {item.resolved.base}, not on {base.spec}" for item in items
            if item.is_adapter and not same_base(item.resolved, base.resolved)]


def check_base_mismatches(mismatches: list[str], allowed: bool) -> None:
    if mismatches and not allowed:
        raise AlignError(f"{mismatches[0]}, the base it would be merged against (its task vector would carry the "
                         "difference between the two bases); pass --allow-base-mismatch to merge anyway")


@dataclass(frozen=True)
class LayerSlice:
    """`--slice A:0-20`: layers [start, end) of one input."""

    spec: str
    start: int
    end: int


def parse_slice(text: str) -> LayerSlice:
    spec, sep, span = text.rpartition(":")
    match = re.fullmatch(r"(\d+)-(\d+)", span)
    if not sep or not spec or not match:
        raise AlignError(f"--slice {text!r}: expected MODEL:START-END (layers START to END-1), e.g. A:0-20")
    return LayerSlice(spec, int(match.group(1)), int(match.group(2)))


def check_slice(layer_slice: LayerSlice, item: MergeInput) -> None:
    layers = num_layers(item.base_dir)
    if not 0 <= layer_slice.start < layer_slice.end <= layers:
        raise AlignError(
            f"--slice {layer_slice.spec}:{layer_slice.start}-{layer_slice.end}: {item.spec} has layers 0-{layers} "
            f"(START < END <= {layers})"
        )
