"""Running a merge: check inputs, build the mergekit configuration (or do adapter math), write OUT atomically.

Data flow: resolve inputs → check them → (materialize adapters) → mergekit `run_merge` → the chat template and a
generation config that stops at end of turn (align.core.template) → merge.json last. Adapter space skips mergekit:
read factors → merge → write an adapter.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from align.core.artifacts import Timer, check_output_dir, output_dir, provenance
from align.core.config import load_yaml, one_line_error
from align.core.errors import AlignError, did_you_mean, raise_write_error
from align.core.models import EMBEDDED_ALIAS, dir_fingerprint, resolve_model
from align.core.template import write_template
from merge import adapters as lora
from merge import inputs as checks
from merge.inputs import MergeInput
from merge.methods import METHODS, MergeParams, build_config, merge_adapters

Mode = Literal["auto", "materialize", "adapter"]
TOKENIZER_KEYWORDS = ("base", "union")


@dataclass
class MergeRequest:
    """One shortcut merge, as the CLI (or a test, or the pipeline) asks for it."""

    method: str
    models: list[str]
    out: Path
    base: str | None = None
    slices: list[str] = field(default_factory=list)
    """`--slice MODEL:START-END` for `stack`; `models` is then unused."""
    params: MergeParams = field(default_factory=MergeParams)
    mode: Mode = "auto"
    rank: int | None = None
    tokenizer_source: str | None = None
    dtype: str | None = None
    shard_size: str | None = None
    """Output shard size in bytes (`500M`, `2B`); mergekit holds one shard in memory before writing it."""
    overwrite: bool = False
    template_source: str | None = None
    """A model or adapter dir whose tokenizer (chat template, EOS/PAD) a merged model takes, instead of the one
    mergekit copied from an input (the pipeline passes its SFT stage). Adapter-space merges keep their first input's."""
    allow_base_mismatch: bool = False
    """Merge adapters against a base they were not trained on (refused otherwise; merge.json records it)."""


def run_merge_request(request: MergeRequest) -> Path:
    """Check everything, then merge into `request.out`; returns the output dir."""
    if request.method not in METHODS:
        raise AlignError(f"unknown merge method '{request.method}'{did_you_mean(request.method, list(METHODS))}")
    check_output_dir(request.out, request.overwrite)
    parse_shard_size(request.shard_size)
    timer = Timer()
    with timer.phase("checks"):
        slices = [checks.parse_slice(s) for s in request.slices]
        from_slices = METHODS[request.method].from_slices
        specs = list(dict.fromkeys(s.spec for s in slices)) if from_slices else request.models
        items = checks.resolve_inputs(specs)
        base = checks.resolve_inputs([request.base])[0] if request.base else None
        check_params(request, len(items))
        if not from_slices:  # a stack may take several slices of one model
            check_distinct(([base] if base else []) + items)
    if use_adapter_space(request, items):
        return _merge_in_adapter_space(request, items, base, timer)
    return _merge_models(request, items, base, slices, timer)


def check_params(request: MergeRequest, count: int) -> None:
    params, method = request.params, request.method
    if METHODS[method].from_slices:
        if not request.slices:
            raise AlignError(f"{method} needs at least one --slice MODEL:START-END")
        return
    METHODS[method].check_count(count)
    METHODS[method].check_params(params, count)
    if request.rank is not None and request.rank < 1:
        raise AlignError(f"--rank {request.rank}: must be at least 1")


def check_distinct(items: list[MergeInput]) -> None:
    seen: dict[tuple[str, str | None], str] = {}
    for item in items:
        key = (item.resolved.base, str(item.resolved.adapter) if item.resolved.adapter else None)
        if key in seen:
            raise AlignError(f"{item.spec} and {seen[key]} are the same model: each input (and --base) must differ")
        seen[key] = item.spec


def use_adapter_space(request: MergeRequest, items: list[MergeInput]) -> bool:
    """Adapter space when asked (--as-adapter), and by default for linear over adapters on one base."""
    if request.mode == "adapter":
        if not METHODS[request.method].adapter_space:
            raise AlignError(f"{request.method} has no adapter-space form ({METHODS[request.method].no_adapter_space})")
        return True
    if request.mode == "materialize" or not METHODS[request.method].adapter_space_by_default:
        return False
    return all(i.is_adapter for i in items) and len({i.resolved.base for i in items}) == 1


# ---- full models through mergekit -------------------------------------------------------------------------------


def _merge_models(request: MergeRequest, items: list[MergeInput], base: MergeInput | None,
                  slices: list[checks.LayerSlice], timer: Timer) -> Path:
    if METHODS[request.method].needs_base and base is None:
        base = _implied_base(request, items)
    everyone = ([base] if base else []) + items
    with timer.phase("checks"):
        mismatches = checks.base_mismatches(items, base) if base else []
        checks.check_base_mismatches(mismatches, request.allow_base_mismatch)
        tokenizer_source = _tokenizer_source(request.tokenizer_source, items)
        _check_models(request, everyone, items, slices)
    with output_dir(request.out, overwrite=request.overwrite) as handle:
        # inside the partial dir: a kill leaves it where the next run's clean start (or --overwrite) removes it
        scratch = handle.path / ".materialized"
        scratch.mkdir()
        with timer.phase("materialize"):
            local = {item.spec: local_dir(item, scratch) for item in everyone}
        shown = {item.spec: mergekit_reference(item) for item in everyone}
        run_config = _config(request, items, base, slices, local, tokenizer_source)
        shown_config = _config(request, items, base, slices, shown, tokenizer_source)
        if any(i.is_adapter for i in everyone) and request.dtype is None:
            for config in (run_config, shown_config):  # materialized adapters are fp32: merge exactly, round once
                config.update(dtype="float32", out_dtype=_stored_dtype(everyone[0].base_dir))
        with timer.phase("mergekit"):
            run_mergekit(run_config, handle.path, seed=request.params.seed, shard_size=request.shard_size)
        shutil.rmtree(scratch)
        write_mergekit_yaml(handle.path, shown_config, request)
        _name_inputs_in_card(handle.path / "README.md", {local[s]: shown[s] for s in local})
        eos = write_template(handle.path, request.template_source)
        record = _record(request, everyone, timer, output_kind="model", extra={
            "mode": "materialize" if any(i.is_adapter for i in everyone) else "models",
            "mergekit_method": run_config["merge_method"], "eos_token_id": eos,
            "template_source": request.template_source,
            "allow_base_mismatch": request.allow_base_mismatch, "base_mismatches": mismatches}, base=base)
        handle.commit("merge.json", record)
    return request.out


def _name_inputs_in_card(card: Path, names: dict[str, str]) -> None:
    """mergekit's model card quotes the configuration it ran; show inputs as the user can find them again."""
    if not card.is_file():
        return
    text = card.read_text()
    for local, shown in names.items():
        if local != shown:
            text = text.replace(local, shown)
    card.write_text(text)


def _implied_base(request: MergeRequest, items: list[MergeInput]) -> MergeInput:
    bases = {i.resolved.base for i in items if i.is_adapter}
    if len(bases) == 1 and all(i.is_adapter for i in items):
        return checks.resolve_inputs([next(iter(bases))])[0]
    raise AlignError(f"{request.method} needs --base BASE (the model the others were fine-tuned from)")


def _check_models(request: MergeRequest, everyone: list[MergeInput], items: list[MergeInput],
                  slices: list[checks.LayerSlice]) -> None:
    checks.check_architectures(everyone)
    checks.check_vocabularies(everyone, request.tokenizer_source)
    checks.check_shapes(everyone, skip_vocab_axis=request.tokenizer_source is not None,
                        by_layer_kind=METHODS[request.method].from_slices)
    by_spec = {item.spec: item for item in items}
    for layer_slice in slices:
        checks.check_slice(layer_slice, by_spec[layer_slice.spec])


def _tokenizer_source(value: str | None, items: list[MergeInput]) -> str | None:
    """`base`, `union`, or an input model (by its spec) as mergekit's tokenizer_source."""
    if value is None or value in TOKENIZER_KEYWORDS:
        return value
    for item in items:
        if item.spec == value:
            return value
    raise AlignError(f"--tokenizer-source {value!r}: give base, union or one of the inputs ({', '.join(i.spec for i in items)})")


def local_dir(item: MergeInput, scratch: Path) -> str:
    """A local model dir mergekit can read for one input: the model's own, or an adapter merged into its base in
    `scratch` (inside the output's partial dir)."""
    if not item.is_adapter:
        return str(item.base_dir)
    target = scratch / f"{len(list(scratch.iterdir()))}-{item.resolved.adapter.name}"
    materialize_adapter(item, target)
    return str(target)


def mergekit_reference(item: MergeInput) -> str:
    """How mergekit-yaml itself names the input: `base+adapter` for an adapter (it merges LoRAs on load)."""
    return f"{item.base_dir}+{item.resolved.adapter}" if item.is_adapter else str(item.base_dir)


def _config(request: MergeRequest, items: list[MergeInput], base: MergeInput | None, slices: list[checks.LayerSlice],
            paths: dict[str, str], tokenizer_source: str | None) -> dict[str, Any]:
    params = request.params
    if METHODS[request.method].from_slices:
        params = MergeParams(**{**params.__dict__, "slices": [(paths[s.spec], s.start, s.end) for s in slices]})
    config = build_config(request.method, [paths[i.spec] for i in items], paths[base.spec] if base else None, params)
    if request.dtype:
        config["dtype"] = request.dtype
    if tokenizer_source:
        config["tokenizer_source"] = paths.get(tokenizer_source, tokenizer_source)
        config["chat_template"] = "auto"
    return config


def _stored_dtype(model_dir: Path) -> str:
    config = checks.read_config(model_dir)
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def materialize_adapter(item: MergeInput, target: Path) -> None:
    """Merge a LoRA into its fp32 base (PEFT's merge_and_unload) and save model + the adapter's tokenizer.

    We do this rather than use mergekit's `base+adapter` references because mergekit merges in the base's stored
    dtype (bf16 rounding before the merge proper) and saves no tokenizer, so an adapter whose training added
    tokens or a chat template would lose them. fp32 here, then one rounding when mergekit writes the output.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = item.resolved.adapter
    tokenizer = AutoTokenizer.from_pretrained(str(item.tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(item.base_dir), dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    for extra in ("generation_config.json",):
        if (item.base_dir / extra).is_file() and not (target / extra).is_file():
            shutil.copy(item.base_dir / extra, target / extra)


def run_mergekit(config: dict[str, Any], out: Path, seed: int | None = None, shard_size: str | None = None) -> None:
    """Validate with mergekit's own model and run its lazy, tensor-by-tensor merge into `out`."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    merge_config = validate_mergekit_config(config, "the merge configuration")
    options = MergeOptions(copy_tokenizer=True, quiet=True, random_seed=seed, write_model_card=True,
                           lora_merge_cache=str(out / ".lora-cache"), lora_merge_dtype="float32",
                           out_shard_size=parse_shard_size(shard_size))
    assert isinstance(merge_config, MergeConfiguration)
    try:
        run_merge(merge_config, str(out), options)
    except Exception as exc:
        raise_write_error(exc, out)  # mergekit writes through safetensors: a full disk is its `os error 28`
        raise
    finally:
        _forget_mergekit_loaders()
        shutil.rmtree(out / ".lora-cache", ignore_errors=True)


@contextlib.contextmanager
def mergekit_bars_off() -> Iterator[None]:
    """mergekit-moe and mergekit-extract-lora draw tqdm bars with no option to stop them (run_merge has `quiet`);
    every mergekit module calls `tqdm.tqdm` or `tqdm.trange`, so the bars stay off while those names are quiet."""
    import tqdm

    original, original_trange = tqdm.tqdm, tqdm.trange

    class Quiet(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    tqdm.tqdm, tqdm.trange = Quiet, lambda *args, **kwargs: Quiet(range(*args), **kwargs)
    try:
        yield
    finally:
        tqdm.tqdm, tqdm.trange = original, original_trange


def parse_shard_size(value: str | None) -> int:
    from mergekit.common import parse_kmb

    if value is None:
        return parse_kmb("5B")  # mergekit's own default
    try:
        size = parse_kmb(value.strip())
    except (ValueError, IndexError):
        raise AlignError(f"--shard-size {value!r}: expected bytes such as 500M or 2B") from None
    if size <= 0:
        raise AlignError(f"--shard-size {value!r}: must be positive")
    return size


def _forget_mergekit_loaders() -> None:
    """mergekit keeps every input's loader (and its open safetensors file) in a process-wide cache; drop them so a
    second merge in the same process (tests, the pipeline) neither pins memory nor holds deleted temp files open."""
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    cache.flush_all()
    cache.loaders.clear()


def validate_mergekit_config(config: Any, where: str) -> Any:
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        return MergeConfiguration.model_validate(config)
    except ValidationError as exc:
        raise one_line_error(exc, where) from None
    except (RuntimeError, ValueError) as exc:
        raise AlignError(f"{where}: {str(exc).splitlines()[0]}") from None


def write_mergekit_yaml(out: Path, config: dict[str, Any], request: MergeRequest | None) -> None:
    """The configuration beside the weights, runnable as is with `merge config` or `mergekit-yaml`."""
    header = "# reproduce with: merge config mergekit_config.yml -o OUT\n"
    if request is not None:
        header = f"# written by `merge {request.method}`; " + header[2:]
    (out / "mergekit_config.yml").write_text(header + yaml.safe_dump(config, sort_keys=False))


# ---- adapters in adapter space ----------------------------------------------------------------------------------


def _merge_in_adapter_space(request: MergeRequest, items: list[MergeInput], base: MergeInput | None,
                            timer: Timer) -> Path:
    base_dir = checks.check_same_base(items)
    if base is not None and (base.is_adapter or base.base_dir.resolve() != base_dir.resolve()):
        raise AlignError(f"--base {base.spec} is not the adapters' base ({base_dir}); adapter-space merges are "
                         "relative to the adapters' own base (merge against another with --materialize "
                         "--allow-base-mismatch)")
    with timer.phase("read"):
        adapters = [lora.read_adapter(i.resolved.adapter) for i in items]
        lora.check_module_shapes(adapters)
    with output_dir(request.out, overwrite=request.overwrite) as handle:
        with timer.phase("merge"):
            result = merge_adapters(request.method, adapters, request.params, checks.num_layers(base_dir),
                                    request.rank)
        with timer.phase("write"):
            lora.write_adapter(handle.path, adapters[0].config, result.modules, result.rank)
            _copy_tokenizer(items[0], handle.path)
        errors = result.reconstruction_error
        record = _record(request, items, timer, output_kind="adapter", extra={
            "mode": "adapter-space", "rank": result.rank,
            "rank_rule": "sum of input ranks" if request.rank is None else "--rank",
            "input_ranks": [a.rank for a in adapters],
            "exact": not errors,
            "reconstruction_error": {"max": max(errors.values(), default=0.0), "per_module": errors},
        })
        handle.commit("merge.json", record)
    return request.out


def _copy_tokenizer(item: MergeInput, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(item.tokenizer_dir)).save_pretrained(str(out))


# ---- merge config FILE ------------------------------------------------------------------------------------------


def run_config_file(path: Path, out: Path, overwrite: bool = False, seed: int | None = None,
                    shard_size: str | None = None, allow_base_mismatch: bool = False) -> Path:
    """`merge config FILE.yaml`: any mergekit configuration, validated by mergekit, run by mergekit."""
    check_output_dir(out, overwrite)
    parse_shard_size(shard_size)
    raw = load_yaml(path, "config file", "expected a mergekit configuration (a mapping with merge_method)")
    raw = resolve_config_models(raw)
    merge_config = validate_mergekit_config(raw, str(path))
    _check_config_models(merge_config, path)
    mismatches = config_base_mismatches(merge_config)
    checks.check_base_mismatches(mismatches, allow_base_mismatch)
    timer = Timer()
    with output_dir(out, overwrite=overwrite) as handle:
        with timer.phase("mergekit"):
            try:
                run_mergekit(raw, handle.path, seed=seed, shard_size=shard_size)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise AlignError(f"{path}: mergekit failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        write_mergekit_yaml(handle.path, raw, None)
        eos = write_template(handle.path)
        record = {
            "command": "config", "method": merge_config.merge_method, "config_file": str(path),
            "inputs": [_describe_reference(m) for m in merge_config.referenced_models()],
            "parameters": raw, "output": {"kind": "model", "path": str(out)}, "eos_token_id": eos,
            "allow_base_mismatch": allow_base_mismatch, "base_mismatches": mismatches,
            **provenance(timer.timings()),
        }
        handle.commit("merge.json", record)
    return out


MODEL_KEYS = ("model", "base_model", "tokenizer_source")


def resolve_config_models(node: Any, key: str | None = None) -> Any:
    """Let a configuration name models as `merge` does: the embedded alias and .gguf files become their converted
    safetensors dirs (mergekit reads safetensors or pickles only). Other references pass through unchanged."""
    if isinstance(node, dict):
        return {k: resolve_config_models(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_config_models(v, key) for v in node]
    if key in MODEL_KEYS and isinstance(node, str):
        model, plus, adapter = node.partition("+")
        if model == EMBEDDED_ALIAS or model.endswith(".gguf"):
            return resolve_model(model).base + plus + adapter
    return node


def _describe_reference(reference: Any) -> dict[str, Any]:
    parts = {"model": reference.model, "adapter": reference.lora}
    described: dict[str, Any] = {"spec": str(reference)}
    for role, part in parts.items():
        if part is not None:
            local = Path(part.path)
            described[role] = part.path
            described[f"{role}_fingerprint"] = dir_fingerprint(local) if local.is_dir() else f"hub:{part.path}"
    return described


def config_base_mismatches(merge_config: Any) -> list[str]:
    """`MODEL+LORA` references whose LoRA was trained on another model than MODEL, or, with a base_model, another
    than the base (local adapter dirs; a hub LoRA's base cannot be read without downloading it)."""
    base = merge_config.base_model
    found = []
    for reference in merge_config.referenced_models():
        lora = reference.lora
        if lora is None or not (Path(lora.path) / "adapter_config.json").is_file():
            continue
        adapter = MergeInput(str(reference), resolve_model(lora.path))
        for target in [reference.model] + ([base.model] if base is not None and base.lora is None else []):
            if Path(target.path).is_dir():
                found += checks.base_mismatches([adapter], MergeInput(target.path, resolve_model(target.path)))
    return list(dict.fromkeys(found))


def _check_config_models(merge_config: Any, path: Path) -> None:
    for reference in merge_config.referenced_models():
        for part in (reference.model, reference.lora):
            if part is None:
                continue
            local = Path(part.path).expanduser()
            looks_local = part.path.startswith((".", "/", "~")) or local.exists()
            if looks_local and not local.is_dir():
                raise AlignError(f"{path}: model {part.path} not found (no such directory)")


# ---- the record -------------------------------------------------------------------------------------------------


def _record(request: MergeRequest, inputs: list[MergeInput], timer: Timer, output_kind: str,
            extra: dict[str, Any], base: MergeInput | None = None) -> dict[str, Any]:
    params = {k: v for k, v in request.params.__dict__.items() if v not in (None, [], False)}
    params.pop("slices", None)
    if request.slices:
        params["slices"] = request.slices
    return {
        "command": request.method,
        "method": request.method,
        "inputs": [{**i.describe(), "role": "base" if i is base else "input"} for i in inputs],
        "parameters": {**params, "rank": request.rank, "tokenizer_source": request.tokenizer_source,
                       "dtype": request.dtype},
        "output": {"kind": output_kind, "path": str(request.out)},
        **extra,
        **provenance(timer.timings()),
    }
