"""`merge` on the embedded SmolLM2-135M: real shapes (tied embeddings, GQA), the alias as an adapter's base,
and a merged model that stops at the chat template's end of turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from merge.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_adapters(tmp_path_factory) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.core.models import EMBEDDED_ALIAS, resolve_model

    base = resolve_model(EMBEDDED_ALIAS).base
    paths = []
    for rank, seed in ((4, 0), (2, 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        for name, param in peft.named_parameters():
            if "lora_B" in name:  # small updates, so the merged model still speaks
                param.data.mul_(0.01)
        path = tmp_path_factory.mktemp(f"smol_lora{rank}") / "adapter"
        peft.save_pretrained(str(path))
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = EMBEDDED_ALIAS  # the adapter names its base by the alias
        (path / "adapter_config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


def test_materialized_slerp_of_embedded_adapters_generates_and_stops(smol_adapters, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "slerp"
    result = CliRunner().invoke(main, ["slerp", *map(str, smol_adapters), "-t", "0.5", "-o", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=64, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert len(generated) > 0
    if len(generated) < 64:  # it stopped: on the end-of-turn token
        assert generated[-1].item() in (eos if isinstance(eos, list) else [eos])
    weights = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied embeddings stay tied
    assert json.loads((out / "merge.json").read_text())["mode"] == "materialize"


def test_adapter_space_linear_on_embedded_model(smol_adapters, tmp_path):
    out = tmp_path / "linear"
    result = CliRunner().invoke(main, ["linear", *map(str, smol_adapters), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "merge.json").read_text())
    assert record["mode"] == "adapter-space" and record["rank"] == 6
    factors = load_file(str(out / "adapter_model.safetensors"))
    inputs = [load_file(str(p / "adapter_model.safetensors")) for p in smol_adapters]
    key = "base_model.model.model.layers.7.self_attn.v_proj"
    merged = factors[f"{key}.lora_B.weight"] @ factors[f"{key}.lora_A.weight"]
    expected = sum(0.5 * f[f"{key}.lora_B.weight"] @ f[f"{key}.lora_A.weight"] for f in inputs)  # alpha = r: scale 1
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-6)


def test_config_file_may_name_the_embedded_alias(tmp_path):
    config = tmp_path / "self.yml"
    config.write_text("merge_method: passthrough\nslices:\n  - sources:\n"
                      "      - {model: smollm2-135m, layer_range: [0, 30]}\n")
    out = tmp_path / "same"
    result = CliRunner().invoke(main, ["config", str(config), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from align.core.models import EMBEDDED_ALIAS, resolve_model

    original = load_file(str(Path(resolve_model(EMBEDDED_ALIAS).base) / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(original)
    for name in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
        torch.testing.assert_close(merged[name], original[name])
