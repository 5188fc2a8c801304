"""Shared fixtures: tiny random Llama models and a character-level tokenizer, built locally (no downloads).

The tokenizer maps every character to one token and each ChatML marker to one special token, so expected token
positions in the mask tests can be counted by hand.
"""

from __future__ import annotations

import importlib.util
import os
import string
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ALIGNMERGE_QUIET", "1")

SPECIALS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
CHARS = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_char_tokenizer(chat_template: str | None = CHATML):
    """One token per character; special tokens first (ids 0-3)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    # WordLevel's decoder would join tokens with spaces; characters must concatenate as they are
    from tokenizers import decoders

    backend.decoder = decoders.Fuse()
    tokenizer._tokenizer.decoder = decoders.Fuse()
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=3, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(path: Path, seed: int = 0, layers: int = 2, chat_template: str | None = CHATML) -> Path:
    tokenizer = make_char_tokenizer(chat_template)
    model = make_tiny_llama(len(tokenizer), seed=seed, layers=layers)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer Llama (hidden 64) with the char tokenizer and a ChatML template."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory) -> Path:
    """A second tiny model, same architecture and vocabulary, different weights (for merges)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_b") / "model", seed=1)


@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory) -> Path:
    """A tiny model with no chat template (a 'base' model)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_base") / "model", seed=2, chat_template=None)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("ALIGNMERGE_CACHE", str(path))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_adapter_dropped(monkeypatch) -> None:
    """In adapter mode (DPO or KTO): TRL's frozen "ref" copy removed, so its reference forward disables adapters (the
    base): the wrong reference that the step-0 check must catch."""
    import align.train.reference as module

    prepare = module.prepare_reference

    def drop_reference_adapter(trainer, reference):
        prepare(trainer, reference)
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")

    monkeypatch.setattr(module, "prepare_reference", drop_reference_adapter)


def benchmark_script(name: str) -> ModuleType:
    """benchmarks/NAME.py imported as a module (the folder is scripts, not a package), for testing its functions."""
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
