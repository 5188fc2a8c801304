"""`align export`: a model, adapter or merged model as one GGUF file for llama.cpp / Ollama, and the round trip
that checks it.

Why a writer of our own: the `gguf` package writes the container (keys, tensor infos, Q8_0 blocks) but has no
Hugging Face -> GGUF converter, and llama.cpp's `convert_hf_to_gguf.py` is a script in its repository, not a PyPI
package. What llama.cpp's converter does for a Llama model, and what transformers' GGUF loader undoes, is small:
rename tensors (gguf's own `TensorNameMap`), permute the Q and K rows into llama.cpp's rotary layout, and write the
hyperparameters and a GPT-2-style byte-level BPE vocabulary under llama.cpp's key names. That is all this module does.

An adapter is merged into its base first, at full precision: the base is always loaded unquantized (fp32), and a
base saved quantized (bitsandbytes) is dequantized before the merge, never merged in 4 bits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from align.core.artifacts import clear_dir, lock_partial_dir, partial_dir
from align.core.errors import AlignError, MissingDependencyError
from align.core.models import (
    LoadOptions,
    ResolvedModel,
    load_model,
    resolve_model,
    tokenizer_source,
)
from align.core.template import end_of_turn_id, template_contract

log = logging.getLogger(__name__)

ExportType = Literal["f16", "q8_0"]
EXPORT_TYPES: tuple[str, ...] = ("f16", "q8_0")

# model_type (config.json) -> llama.cpp architecture name. Only what this writer's tensor layout is right for.
SUPPORTED_ARCHITECTURES = {"llama": "llama"}

# llama.cpp token types (llama_token_type); gguf.TokenType has the same values.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# llama.cpp picks its pre-tokenizer regex by name (`tokenizer.ggml.pre`); its converter finds the name by hashing a
# test string's tokens. We read the tokenizer.json's pre-tokenizer instead, for the layouts we know the regex of.
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+"
)

# A fixed prompt set for the round trip: plain text and chat turns (rendered with the model's own template).
ROUND_TRIP_TEXTS = (
    "The capital of France is",
    "Translate into Pig Latin: the quick brown fox jumps over the lazy dog",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "1 + 1 = 2, 12 * 12 = 144, and 2026 is a year.",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woman who kept bees. "
    "Every morning she walked to the hives and listened to them hum, and every evening she wrote down what she had "
    "heard in a thick leather book.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose and "
    "oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts.",
    "The train left the station ten minutes late. Most passengers did not notice; they were reading, sleeping or "
    "looking out at the fields, which were still white with frost. Only the conductor kept checking his watch, because "
    "he knew that the connection at the next town would not wait for them.",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a pan, add a chopped onion and cook it slowly "
    "until it is soft. Add two cloves of garlic, a tin of tomatoes and a pinch of salt, then let it simmer for twenty "
    "minutes, stirring from time to time.",
    "Dear Sam,\nThank you for your letter. I am sorry it took me so long to answer, but the last few weeks have been "
    "very busy at work. We are all well here. The children have started school again and the garden is full of "
    "apples.\nBest wishes,\nAnna",
    "The human heart has four chambers: two atria and two ventricles. Blood that has lost its oxygen returns to the "
    "right atrium, passes to the right ventricle and is pumped to the lungs. From the lungs it comes back to the left "
    "side of the heart, which pumps it to the rest of the body.",
    "import json\n\n\ndef load_rows(path):\n    with open(path) as f:\n        return [json.loads(line) for line "
    "in f if line.strip()]\n\n\nrows = load_rows(\"data.jsonl\")\nprint(len(rows), \"rows\")\n",
    "In 1969 two astronauts walked on the Moon for the first time. They collected rocks, took photographs and left "
    "instruments behind that measured moonquakes for years. The mission lasted eight days, and millions of people "
    "watched the landing on television.",
    "Q: If a shirt costs 20 dollars and is on sale for 25 percent off, what is the sale price?\nA: 25 percent of 20 "
    "is 5, so the sale price is 20 - 5 = 15 dollars.",
    "Rivers carry water from high ground to the sea. Along the way they cut valleys, carry sand and stones, and leave "
    "rich soil on their banks when they flood. Many of the oldest cities in the world were built beside rivers for "
    "that reason.",
    "The meeting is moved to Thursday at three o'clock in room 204. Please bring the budget figures for the second "
    "quarter and a short list of the problems your team has run into since March. If you cannot come, send your notes "
    "to Maria before Wednesday evening.",
    "A good password is long and hard to guess. Instead of a single word with a number at the end, use four or five "
    "random words, and never use the same password for two accounts. A password manager can remember them for you.",
    "Cats sleep for twelve to sixteen hours a day. They are most active at dawn and dusk, when their prey is most "
    "active too. A house cat that seems lazy is simply keeping the hours of its wild ancestors.",
    "The library opens at nine in the morning and closes at eight in the evening on weekdays. On Saturdays it closes "
    "at five, and on Sundays and public holidays it is closed. Books can be returned at any time through the slot "
    "beside the main door.",
)
# Positions where the source's two best logits are closer than this are near-ties: any rounding may swap them, so
# agreement is also reported on the positions the source decides clearly.
CLEAR_MARGIN = 0.1
ROUND_TRIP_CHATS = (
    [{"role": "user", "content": "Say hello in Pig Latin."}],
    [{"role": "user", "content": "What is the capital of Italy?"},
     {"role": "assistant", "content": "Rome."},
     {"role": "user", "content": "And of Spain?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "user", "content": "How many legs does a spider have?"},
     {"role": "assistant", "content": "A spider has eight legs."},
     {"role": "user", "content": "And an insect?"}],
)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    type: str
    bytes: int
    seconds: float
    tensors: int
    eos_token_id: int
    eos_token: str
    eot_token_id: int | None


@dataclass(frozen=True)
class RoundTrip:
    """How the exported file, loaded back through transformers' GGUF loader, compares with the source model."""

    prompts: int
    positions: int
    max_abs_diff: float
    top1_agreement: float
    top1_agreement_clear: float
    """Agreement on the positions where the source's top-1 logit leads the runner-up by CLEAR_MARGIN or more."""
    clear_positions: int
    mean_kl: float
    tokens_match: bool
    chat_template_match: bool
    eos_match: bool

    def describe(self) -> dict[str, Any]:
        return asdict(self)


# ---- pre-flight ------------------------------------------------------------------------------------------------


def check_output_file(out: Path, overwrite: bool) -> None:
    """Refuse before any work, so a refusal writes nothing."""
    if out.suffix != ".gguf":
        raise AlignError(f"output {out}: the file name must end in .gguf")
    if out.is_dir():
        raise AlignError(f"output {out} is a directory")
    if out.exists() and not overwrite:
        raise AlignError(f"output {out} exists (pass --overwrite to replace it)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise AlignError(f"output {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise AlignError(f"output {out}: permission denied in {parent}")


def check_architecture(config: Any, spec: str) -> str:
    """The llama.cpp architecture name, or a one-line error naming what is not supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        names = ", ".join(getattr(config, "architectures", None) or [str(model_type)])
        raise AlignError(f"{spec}: architecture {names} is not supported by align export "
                         f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise AlignError(f"{spec}: Llama with attention or MLP biases is not supported by align export")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise AlignError(f"{spec}: rope scaling '{rope.get('rope_type', rope.get('type'))}' is not supported by "
                         "align export (only unscaled rope)")
    return SUPPORTED_ARCHITECTURES[model_type]


def load_export_tokenizer(resolved: ResolvedModel) -> Any:
    """The model's own tokenizer, as it is: unlike `load_tokenizer`, no ChatML or pad token is added, since the file
    must carry the template the model was trained with, not one invented at export time."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(resolved))
    except (OSError, ValueError) as exc:
        raise AlignError(f"{resolved.spec}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from None
    if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template:
        raise AlignError(f"{resolved.spec}: the tokenizer has no chat template; llama.cpp would not know how to render "
                         "chats or where a turn ends (train with align sft, which records one, or add one)")
    if tokenizer.eos_token_id is None:
        raise AlignError(f"{resolved.spec}: the tokenizer has no EOS token")
    return tokenizer


# ---- vocabulary ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFVocab:
    """A byte-level BPE vocabulary as llama.cpp's `gpt2` tokenizer model reads it."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str


def pre_tokenizer_name(tokenizer_json: dict[str, Any], spec: str) -> str:
    """llama.cpp's name for the tokenizer's split rule (it selects the regex llama.cpp applies before BPE)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # llama.cpp: "\p{N}" then the GPT-2 regex (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise AlignError(f"{spec}: tokenizer pre-tokenizer {kinds or 'none'} is not one align export can name for "
                     "llama.cpp (byte-level GPT-2, SmolLM or Llama-3 style)")


def build_vocab(tokenizer: Any, rows: int, spec: str) -> GGUFVocab:
    """Tokens by id, their llama.cpp types, merges and pre-tokenizer name, padded to the embedding's rows.

    llama.cpp's converter pads a vocabulary smaller than the embedding with `[PAD{id}]` tokens of type UNUSED; we do
    the same. A tokenizer with more tokens than embedding rows would emit ids the model has no row for: an error.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AlignError(f"{spec}: a slow (Python) tokenizer; align export needs a fast tokenizer (tokenizer.json)")
    tokenizer_json = json.loads(backend.to_str())
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise AlignError(f"{spec}: tokenizer model {model.get('type')} is not a byte-level BPE; align export writes "
                         "GPT-2-style BPE vocabularies only")
    pre = pre_tokenizer_name(tokenizer_json, spec)
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    if size > rows:
        raise AlignError(f"{spec}: the tokenizer has {size} tokens but the embedding has {rows} rows "
                         "(tokens without weights; resize the model's embeddings to the tokenizer)")
    added = {token.content: token.special for token in backend.get_added_tokens_decoder().values()}
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [UNUSED] * rows
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = NORMAL if token not in added else (CONTROL if added[token] else USER_DEFINED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    return GGUFVocab(tokens, types, merges, pre)


def adds_special_tokens(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding plain text adds BOS in front / EOS at the end (llama.cpp's add_bos_token/add_eos_token)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = len(full) > len(plain) and tokenizer.bos_token_id is not None and full[0] == tokenizer.bos_token_id
    add_eos = len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    return add_bos, add_eos


# ---- weights ---------------------------------------------------------------------------------------------------


def load_merged_model(resolved: ResolvedModel, tokenizer: Any) -> Any:
    """The model in fp32 with its adapter (if any) merged in. A quantized base is dequantized before the merge."""
    options = LoadOptions(dtype="float32", quantize=None)
    # An adapter may have grown the embeddings (ChatML tokens): its base is resized to its tokenizer first, as in
    # training. A plain model is loaded as it is, so a tokenizer/embedding mismatch shows instead of being patched.
    model = load_model(resolved, options, tokenizer=tokenizer if resolved.adapter else None, adapter="skip")
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize().float()
    if resolved.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resolved.adapter)).merge_and_unload()
    return model.eval()


def permute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout for Q/K rows: HF keeps each head's two rotary halves apart, llama.cpp interleaves
    them (`LlamaModel.permute` in convert_hf_to_gguf.py; transformers' `LlamaTensorProcessor` reverses it)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model: Any, arch: str, export_type: ExportType) -> list[tuple[str, np.ndarray, Any]]:
    """(gguf name, data, ggml type) per tensor, in the model's order."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent, and transformers reads that as tied
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise AlignError(f"tensor {name} has no GGUF name for architecture {arch}")
        data = tensor.detach().float()
        if name.endswith("q_proj.weight"):
            data = permute_for_rope(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = permute_for_rope(data, config.num_key_value_heads)
        out.append((gguf_name, *encode_tensor(data.numpy(), export_type)))
    return out


def encode_tensor(data: np.ndarray, export_type: ExportType) -> tuple[np.ndarray, Any]:
    """llama.cpp's choice per tensor: norms (1-D) stay F32; matrices are F16 or Q8_0, and a matrix whose rows do not
    split into 32-value Q8_0 blocks falls back to F16, as llama.cpp's converter does."""
    import gguf

    if data.ndim <= 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if export_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


# ---- the file --------------------------------------------------------------------------------------------------


def export_gguf(spec: str, out: Path, export_type: str = "f16", overwrite: bool = False) -> ExportResult:
    """Write `spec` (anything `--model` accepts) as one GGUF file at `out`, atomically: written inside the locked
    `OUT.partial/` dir (one writer per output, as for every command), then renamed into place."""
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("gguf", "align export") from None
    from transformers import AutoConfig

    started = time.perf_counter()
    out = Path(out)
    if export_type not in EXPORT_TYPES:
        raise AlignError(f"unknown --type '{export_type}' (choose {', '.join(EXPORT_TYPES)})")
    check_output_file(out, overwrite)
    resolved = resolve_model(spec)
    arch = check_architecture(AutoConfig.from_pretrained(resolved.base), spec)
    tokenizer = load_export_tokenizer(resolved)
    model = load_merged_model(resolved, tokenizer)
    config = model.config
    rows = model.get_input_embeddings().weight.shape[0]
    vocab = build_vocab(tokenizer, rows, spec)
    contract = template_contract(tokenizer, model)
    eos_id = tokenizer.convert_tokens_to_ids(contract["eos_token"])
    eot_id = end_of_turn_id(tokenizer)
    add_bos, add_eos = adds_special_tokens(tokenizer)
    tensors = gguf_tensors(model, arch, export_type)  # type: ignore[arg-type]

    work = partial_dir(out)
    lock = lock_partial_dir(work, out)
    partial = work / out.name
    try:
        check_output_file(out, overwrite)  # again under the lock: the run that held it may have written OUT
        clear_dir(work)
        writer = gguf.GGUFWriter(str(partial), arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(spec).stem if spec.endswith(".gguf") else Path(spec).name)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_vocab_size(rows)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // config.num_attention_heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_freq_base(float(_rope_theta(config)))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if export_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        writer.add_token_merges(vocab.merges)
        if tokenizer.bos_token_id is not None:
            writer.add_bos_token_id(tokenizer.bos_token_id)
        # EOS is the template contract's, EOT the token the chat template closes an assistant turn with (the same
        # <|im_end|> for ChatML): llama.cpp stops at either, so it stops where the SFT-trained model does.
        writer.add_eos_token_id(eos_id)
        if eot_id is not None:
            writer.add_eot_token_id(eot_id)
        if tokenizer.unk_token_id is not None:
            writer.add_unk_token_id(tokenizer.unk_token_id)
        if tokenizer.pad_token_id is not None:
            writer.add_pad_token_id(tokenizer.pad_token_id)
        writer.add_add_bos_token(add_bos)
        writer.add_add_eos_token(add_eos)
        writer.add_add_space_prefix(False)
        writer.add_chat_template(contract["chat_template"])

        for name, data, ggml_type in tensors:
            writer.add_tensor(name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock)
    return ExportResult(out, export_type, out.stat().st_size, time.perf_counter() - started, len(tensors), eos_id,
                        contract["eos_token"], eot_id)


def _rope_theta(config: Any) -> float:
    """transformers 5 keeps it in `rope_parameters`; 4.x on the config itself."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0


# ---- round trip ------------------------------------------------------------------------------------------------


def round_trip_prompts(tokenizer: Any) -> list[str]:
    """The fixed prompt set: plain texts, and chats rendered with the model's own template."""
    chats = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
             for chat in ROUND_TRIP_CHATS]
    return list(ROUND_TRIP_TEXTS) + chats


@dataclass
class LogitTally:
    """Running sums over positions of (positions, vocab) logits from the source and the exported model."""

    positions: int = 0
    agree: int = 0
    clear: int = 0
    clear_agree: int = 0
    kl: float = 0.0
    max_abs_diff: float = 0.0

    def add(self, source: torch.Tensor, exported: torch.Tensor) -> None:
        source, exported = source.double(), exported.double()
        log_p = torch.log_softmax(source, dim=-1)
        log_q = torch.log_softmax(exported, dim=-1)
        same = source.argmax(-1) == exported.argmax(-1)
        best = source.topk(2, dim=-1).values
        clear = (best[:, 0] - best[:, 1]) >= CLEAR_MARGIN
        self.positions += source.shape[0]
        self.agree += int(same.sum())
        self.clear += int(clear.sum())
        self.clear_agree += int((same & clear).sum())
        self.kl += float((log_p.exp() * (log_p - log_q)).sum(-1).sum())  # KL(source || exported) per position
        self.max_abs_diff = max(self.max_abs_diff, float((source - exported).abs().max()))


def verify_round_trip(spec: str, gguf_file: Path) -> RoundTrip:
    """Load `gguf_file` back through the project's own GGUF path (transformers' loader, via `resolve_model`, in a
    scratch cache) and compare its logits with the source model's on the fixed prompt set, token ids fed to both."""
    from transformers import AutoTokenizer

    resolved = resolve_model(spec)
    tokenizer = load_export_tokenizer(resolved)
    source = load_merged_model(resolved, tokenizer)
    with tempfile.TemporaryDirectory(prefix="align-export-") as scratch:
        reloaded = resolve_model(str(gguf_file), cache=Path(scratch))
        exported = load_model(reloaded, LoadOptions(dtype="float32")).eval()
        exported_tokenizer = AutoTokenizer.from_pretrained(reloaded.base)
    prompts = round_trip_prompts(tokenizer)
    tally, tokens_match = LogitTally(), True
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            tokens_match &= exported_tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids
            batch = torch.tensor([ids])
            tally.add(source(batch).logits[0], exported(batch).logits[0])
    contract = template_contract(tokenizer, source)
    return RoundTrip(
        prompts=len(prompts), positions=tally.positions, max_abs_diff=tally.max_abs_diff,
        top1_agreement=tally.agree / tally.positions,
        top1_agreement_clear=tally.clear_agree / max(tally.clear, 1), clear_positions=tally.clear,
        mean_kl=tally.kl / tally.positions, tokens_match=tokens_match,
        chat_template_match=exported_tokenizer.chat_template == contract["chat_template"],
        eos_match=exported_tokenizer.eos_token == contract["eos_token"],
    )
