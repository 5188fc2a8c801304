"""The router heal: `align sft` on a mixture built by `merge moe`, training only the routers (lora.modules_to_save:
[gate], no LoRA matrices) on a mix of both experts' data. Only the routers may change; the adapter is a plain PEFT
adapter on the mixture's dir; a bad module name, and a top-1 mixture whose router gets no gradient, are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from align.cli import main as align_main
from conftest import write_jsonl
from merge.cli import main as merge_main

FLIPS = [("ab", "ba"), ("cd", "dc"), ("ef", "fe"), ("gh", "hg")]
DOUBLES = [("ab", "abab"), ("cd", "cdcd"), ("ef", "efef"), ("gh", "ghgh")]


def build_moe(base: Path, experts: list[Path], out: Path, per_token: int) -> Path:
    result = CliRunner().invoke(merge_main, [
        "moe", "--base", str(base), "--expert", str(experts[0]), "--prompts", "flip ab",
        "--expert", str(experts[1]), "--prompts", "double ab", "--gate-mode", "cheap_embed",
        "--experts-per-token", str(per_token), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def mix_data(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("heal-data")
    return (write_jsonl(tmp / "flip.jsonl", [{"prompt": f"flip {q}", "completion": a} for q, a in FLIPS] * 4),
            write_jsonl(tmp / "double.jsonl", [{"prompt": f"double {q}", "completion": a} for q, a in DOUBLES] * 4))


def heal_recipe(tmp: Path, moe: Path, data: tuple[Path, Path], lora: str) -> Path:
    path = tmp / "heal.yaml"
    path.write_text(f"""model: {{name: "{moe}", dtype: float32, compile: false}}
data:
  mixture:
    - {{path: "{data[0]}", rows: 8}}
    - {{path: "{data[1]}", rows: 8}}
lora: {lora}
train: {{max_steps: 4, per_device_train_batch_size: 4, learning_rate: 5.0e-2, warmup_steps: 0, save_steps: 100}}
""")
    return path


def run_sft(*args: object):
    return CliRunner().invoke(align_main, ["sft", *map(str, args)])


@pytest.fixture(scope="module")
def healed(tiny_model_dir, tiny_model_dir_b, tiny_base_model_dir, mix_data, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("heal")
    moe = build_moe(tiny_model_dir, [tiny_model_dir_b, tiny_base_model_dir], tmp / "moe", per_token=2)
    recipe = heal_recipe(tmp, moe, mix_data, "{target_modules: [], modules_to_save: [gate]}")
    result = run_sft(recipe, "-o", tmp / "healed")
    assert result.exit_code == 0, result.output + str(result.exception)
    return moe, tmp / "healed"


def test_heal_trains_only_the_routers_and_loads_as_a_plain_peft_adapter(healed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    moe, out = healed
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(saved) == [f"base_model.model.model.layers.{i}.mlp.gate.weight" for i in (0, 1)]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["gate"]

    original = AutoModelForCausalLM.from_pretrained(str(moe), dtype=torch.float32).state_dict()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(moe), dtype=torch.float32), str(out))
    merged = adapted.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(original)
    routers = {name for name in original if name.endswith("mlp.gate.weight")}
    assert len(routers) == 2
    for name, weight in original.items():
        if name in routers:
            assert not torch.equal(merged[name], weight), f"{name} did not train"
        else:  # experts, attention, norms, embeddings, head: the mixture's own
            assert torch.equal(merged[name], weight), name

    record = json.loads((out / "run.json").read_text())
    hidden = original["model.embed_tokens.weight"].shape[1]
    assert record["adapter"]["trained_parameters"] == {"lora": 0, "modules_to_save": 2 * 2 * hidden, "other": 0}
    assert record["parameters"]["trainable_parameters"] == 2 * 2 * hidden
    assert record["adapter"]["target_modules"] == [] and record["adapter"]["modules_to_save"] == ["gate"]
    assert record["data"]["mixture"] is not None and record["data"]["rows"] == 16


def test_eval_loads_the_healed_adapter_on_its_mixture(healed):
    from align.core.models import resolve_model
    from eval.generate import load_for_eval

    moe, out = healed
    resolved = resolve_model(str(out))
    assert Path(resolved.base).resolve() == moe.resolve()
    loaded = load_for_eval("healed", resolved, "float32")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(loaded.model(input_ids=ids).logits).all()


def test_cli_flags_set_the_lora_section_a_recipe_would():
    from test_cli_options import parse_flags

    from align.core.config import SFTRecipe

    flags = parse_flags(SFTRecipe, ["--target-modules", "", "--modules-to-save", "gate"])
    assert flags["lora.target_modules"] == [] and flags["lora.modules_to_save"] == ["gate"]
    spec = SFTRecipe.model_validate({"lora": {"target_modules": [], "modules_to_save": ["gate"]}}).lora
    from align.train.training import lora_config

    config = lora_config(spec)
    assert config.modules_to_save == ["gate"] and config.target_modules == "dummy-target-modules"


def test_a_module_that_does_not_exist_is_one_line_exit_2(healed, mix_data, tmp_path):
    moe, _ = healed
    recipe = heal_recipe(tmp_path, moe, mix_data, "{target_modules: [], modules_to_save: [router]}")
    result = run_sft(recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "lora.modules_to_save: no module named 'router'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_nothing_to_train_is_refused_before_anything_loads(healed, mix_data, tmp_path):
    moe, _ = healed
    result = run_sft(heal_recipe(tmp_path, moe, mix_data, "{target_modules: []}"), "-o", tmp_path / "out")
    assert result.exit_code == 2 and "nothing would be trained" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_top1_router_gets_no_gradient_and_is_refused(tiny_model_dir, tiny_model_dir_b, tiny_base_model_dir,
                                                       mix_data, tmp_path):
    """The premise, checked on the model itself: with one expert per token the loss does not move the router."""
    from transformers import AutoModelForCausalLM

    moe = build_moe(tiny_model_dir, [tiny_model_dir_b, tiny_base_model_dir], tmp_path / "moe1", per_token=1)
    model = AutoModelForCausalLM.from_pretrained(str(moe), dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model(input_ids=ids, labels=ids).loss.backward()
    gate = model.model.layers[0].mlp.gate.weight.grad
    attention = model.model.layers[0].self_attn.q_proj.weight.grad.abs().max()
    # zero but for rounding in x / x (about 1e-10), against an attention gradient many orders larger
    assert attention > 1e-4 and (gate is None or gate.abs().max() < 1e-6 * attention)

    recipe = heal_recipe(tmp_path, moe, mix_data, "{target_modules: [], modules_to_save: [gate]}")
    result = run_sft(recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "one expert per token, which gets no gradient" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_estimate_counts_a_built_mixture_exactly_and_plans_the_router_heal(healed):
    """The planner's shape of the MoE's config against the built model's own parameters; a router-only heal
    trains exactly the routers (experts x hidden per layer) and plans one expert MLP per routed expert."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from align.estimate_cli import estimate
    from align.train.estimate import layer_activation_bytes, load_shape

    moe, out = healed
    built = AutoModelForCausalLM.from_pretrained(str(moe))
    shape = load_shape(str(moe))
    assert shape.total_params == sum(p.numel() for p in built.parameters())
    assert shape.experts_per_token == 2
    plan = estimate(str(moe), device="cpu", dtype="float32", lora_targets=(), modules_to_save=("gate",))
    record = json.loads((out / "run.json").read_text())
    assert plan.trainable_params == record["parameters"]["trainable_parameters"]
    one = replace(shape, experts_per_token=1)
    setup = plan.setup
    mlp = 4 * 4 * shape.intermediate * setup.tokens  # 4 saved fp32 MLP tensors per routed expert per token
    assert layer_activation_bytes(shape, setup) - layer_activation_bytes(one, setup) == mlp


def test_a_lora_section_without_modules_to_save_dumps_as_before():
    """Stage fingerprints hash the dumped recipe: the new field, unset, must not make `align run` redo earlier runs."""
    from align.core.config import LoraSpec

    assert "modules_to_save" not in LoraSpec().model_dump(mode="json")
    assert LoraSpec(modules_to_save=["gate"]).model_dump()["modules_to_save"] == ["gate"]


def test_routing_study_forces_and_records_the_gate_choice(tiny_model_dir, tiny_model_dir_b, tiny_base_model_dir,
                                                           tmp_path):
    """benchmarks/moe_routing.py's hook: forced to expert k, a top-1 mixture computes what the same mixture computes
    with every expert replaced by expert k (where any routing picks k's weights); it records one choice per token and
    layer, the router's own (before forcing)."""
    from transformers import AutoModelForCausalLM

    from conftest import benchmark_script

    study = benchmark_script("moe_routing")
    moe = build_moe(tiny_model_dir, [tiny_model_dir_b, tiny_base_model_dir], tmp_path / "moe", per_token=1)
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    ids = torch.arange(3, 15).unsqueeze(0)
    with torch.no_grad():
        free = model(input_ids=ids).logits
        outputs = {}
        for expert in (0, 1):
            with study.recorded_and_forced(model, expert) as choices:
                outputs[expert] = model(input_ids=ids).logits
            assert len(choices) == model.config.num_hidden_layers
            assert all(c.shape == (ids.shape[1],) for c in choices)
        with study.recorded_and_forced(model, None) as choices:
            assert torch.equal(model(input_ids=ids).logits, free)
        router_choice = choices[0]
        same = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
        for layer in same.model.layers:
            for tensor in layer.mlp.experts.parameters():
                tensor.copy_(tensor[1:2].expand_as(tensor))
        assert torch.allclose(outputs[1], same(input_ids=ids).logits, atol=1e-5)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)
    first = model.model.layers[0]
    hidden = model.model.embed_tokens(ids)
    rotary = model.model.rotary_emb(hidden, torch.arange(ids.shape[1]).unsqueeze(0))
    attended = first.self_attn(first.input_layernorm(hidden), position_embeddings=rotary, attention_mask=None)[0]
    normed = first.post_attention_layernorm(attended + hidden)
    assert torch.equal(router_choice, (normed[0] @ first.mlp.gate.weight.T).argmax(-1))
