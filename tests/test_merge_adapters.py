"""`merge` on LoRA adapters: adapter space (exact linear, SVD re-factorization with reported error) and
--materialize (adapters merged into their base first), checked against math written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from merge.adapters import LoraFactors, linear_lora, svd_refactor
from merge.cli import main

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def make_adapter(base_dir: Path, out: Path, r: int, seed: int, targets: list[str], rslora: bool = False) -> Path:
    """A LoRA with random, non-zero A and B (no training needed) on `base_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, use_rslora=rslora)
    get_peft_model(model, config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapter_a(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora_a") / "adapter", r=4, seed=10, targets=ALL_LINEAR)


@pytest.fixture(scope="module")
def adapter_b(tiny_model_dir, tmp_path_factory) -> Path:
    """Another rank, fewer target modules, rsLoRA scaling: everything that can differ between adapters."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora_b") / "adapter", r=2, seed=11,
                        targets=["q_proj", "v_proj", "down_proj"], rslora=True)


@pytest.fixture(scope="module")
def adapter_on_b(tiny_model_dir_b, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir_b, tmp_path_factory.mktemp("lora_c") / "adapter", r=4, seed=12, targets=ALL_LINEAR)


def read_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Module weight name (as in the base model) -> scale·B·A, computed from the files."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for key, A in tensors.items():
        if ".lora_A." in key:
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            deltas[module + ".weight"] = scale * B.double() @ A.double()
    return deltas


def base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def merged_adapter_weights(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Load base + adapter with PEFT and merge: the output must be loadable and usable by PEFT as it is."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    prompt = tokenizer("hi", return_tensors="pt")
    assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt["input_ids"].shape[1]
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def test_linear_lora_factors_are_exact():
    torch.manual_seed(0)
    f1 = LoraFactors(torch.randn(3, 8), torch.randn(5, 3), scale=2.0)
    f2 = LoraFactors(torch.randn(2, 8), torch.randn(5, 2), scale=0.5)
    merged = linear_lora([f1, f2, None], [0.7, 0.3, 1.0], rank=6)
    assert merged.rank == 6
    expected = 0.7 * 2.0 * f1.B @ f1.A + 0.3 * 0.5 * f2.B @ f2.A
    torch.testing.assert_close(merged.B @ merged.A, expected, rtol=1e-5, atol=1e-5)


def test_svd_refactor_error_is_the_dropped_spectrum():
    torch.manual_seed(0)
    delta = torch.randn(12, 9)
    factors, error = svd_refactor(delta, rank=4)
    singular = torch.linalg.svdvals(delta.double())
    expected = float(singular[4:].norm() / singular.norm())  # Eckart–Young
    assert error == pytest.approx(expected, rel=1e-6)
    assert float((delta - factors.B @ factors.A).norm() / delta.norm()) == pytest.approx(expected, rel=1e-4)
    assert svd_refactor(delta, rank=9)[1] < 1e-6


def test_adapter_space_linear_is_exact(tiny_model_dir, adapter_a, adapter_b, tmp_path):
    out = tmp_path / "lin"
    result = run_cli("linear", adapter_a, adapter_b, "--weights", "0.6,0.4", "-o", out)
    assert result.exit_code == 0, result.output
    assert {"adapter_config.json", "adapter_model.safetensors", "merge.json"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.endswith(".safetensors") and p.name.startswith("model") for p in out.iterdir())
    record = json.loads((out / "merge.json").read_text())
    assert record["mode"] == "adapter-space" and record["output"]["kind"] == "adapter"
    assert record["rank"] == 6 and record["exact"] is True
    base, d1, d2 = base_weights(tiny_model_dir), read_deltas(adapter_a), read_deltas(adapter_b)
    merged = merged_adapter_weights(tiny_model_dir, out)
    targets = set(d1) | set(d2)
    assert len(targets) == 2 * len(ALL_LINEAR)
    for name, tensor in merged.items():
        expected = base[name].double() + 0.6 * d1.get(name, 0) + 0.4 * d2.get(name, 0)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,extra", [("task-arithmetic", ["--weights", "1.0,0.5"]), ("slerp", ["-t", "0.3"]),
                                          ("ties", ["--weights", "1.0,0.5", "--density", "0.5"])])
def test_adapter_space_svd_error_matches_record(method, extra, tiny_model_dir, adapter_a, adapter_b, tmp_path):
    out = tmp_path / method
    result = run_cli(method, adapter_a, adapter_b, *extra, "--as-adapter", "--rank", "3", "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "merge.json").read_text())
    assert record["rank"] == 3 and record["output"]["kind"] == "adapter"
    d1, d2 = read_deltas(adapter_a), read_deltas(adapter_b)
    out_deltas = read_deltas(out)
    reported = record["reconstruction_error"]["per_module"]
    assert len(reported) == len(out_deltas)
    for key, error in reported.items():
        name = key.removeprefix("base_model.model.") + ".weight"
        a, b = d1[name], d2.get(name, torch.zeros_like(d1[name]))
        if method == "task-arithmetic":
            target = a + 0.5 * b
        elif method == "slerp":
            target = slerp_reference(0.3, a, b)
        else:
            target = ties_reference([a, b], [1.0, 0.5], 0.5)
        actual = float((target - out_deltas[name]).norm() / target.norm())
        assert actual == pytest.approx(error, rel=1e-3, abs=1e-6), name
    assert record["reconstruction_error"]["max"] > 0  # rank 3 < 6 cannot hold these deltas
    merged_adapter_weights(tiny_model_dir, out)


def slerp_reference(t, v0, v1):
    x, y = v0.flatten(), v1.flatten()
    # a zero vector (a module only one adapter targets) counts as orthogonal, as in mergekit
    cos = float(torch.dot(x / x.norm(), y / y.norm())) if x.norm() > 0 and y.norm() > 0 else 0.0
    if abs(cos) > 0.9995:
        return (1 - t) * v0 + t * v1
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


def ties_reference(deltas, weights, density):
    trimmed = []
    for delta, w in zip(deltas, weights):
        flat = delta.flatten()
        keep = torch.zeros_like(flat)
        keep[flat.abs().argsort(descending=True)[: max(1, int(density * flat.numel()))]] = 1
        trimmed.append(w * flat * keep)
    stacked = torch.stack(trimmed)
    agree = (stacked.sign() == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)).double()
    divisor = (torch.tensor(weights, dtype=torch.double).unsqueeze(1) * agree).sum(0)
    divisor[divisor == 0] = 1
    return ((stacked * agree).sum(0) / divisor).reshape(deltas[0].shape)


def test_adapter_space_slerp_follows_layer_gradient_and_mlp_override(adapter_a, adapter_b, tmp_path):
    out = tmp_path / "slerp-grad"
    result = run_cli("slerp", adapter_a, adapter_b, "-t", "0.2,0.8", "--t-mlp", "0.5", "--as-adapter", "-o", out)
    assert result.exit_code == 0, result.output
    d1, d2, merged = read_deltas(adapter_a), read_deltas(adapter_b), read_deltas(out)
    assert json.loads((out / "merge.json").read_text())["reconstruction_error"]["max"] < 1e-5  # rank 6 holds it
    for name, delta in merged.items():
        layer = int(name.split("layers.")[1].split(".")[0])
        t = 0.5 if ".mlp." in name else 0.2 + 0.6 * layer  # 2 layers: position = layer / (2 - 1)
        expected = slerp_reference(t, d1[name], d2.get(name, torch.zeros_like(d1[name])))
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)


def test_task_arithmetic_at_default_rank_is_exact(tiny_model_dir, adapter_a, adapter_b, tmp_path):
    out = tmp_path / "ta"
    result = run_cli("task-arithmetic", adapter_a, adapter_b, "--as-adapter", "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "merge.json").read_text())
    assert record["rank"] == 6 and record["rank_rule"] == "sum of input ranks"
    assert record["reconstruction_error"]["max"] < 1e-5


def test_adapter_space_dare_at_full_density_is_task_arithmetic(adapter_a, adapter_b, tmp_path):
    out = tmp_path / "dare"
    result = run_cli("dare", adapter_a, adapter_b, "--density", "1", "--weights", "0.5,1.5", "--as-adapter", "-o", out)
    assert result.exit_code == 0, result.output
    d1, d2, merged = read_deltas(adapter_a), read_deltas(adapter_b), read_deltas(out)
    for name, delta in merged.items():
        expected = 0.5 * d1[name] + 1.5 * d2.get(name, 0)
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)


def test_materialize_slerp_equals_slerp_of_merged_models(tiny_model_dir, adapter_a, adapter_b, tmp_path):
    out = tmp_path / "mat"
    result = run_cli("slerp", adapter_a, adapter_b, "-t", "0.4", "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "merge.json").read_text())
    assert record["mode"] == "materialize" and record["output"]["kind"] == "model"
    assert "+" in (out / "mergekit_config.yml").read_text()  # written as mergekit's base+adapter references
    base, d1, d2 = base_weights(tiny_model_dir), read_deltas(adapter_a), read_deltas(adapter_b)
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        v0 = base[name].double() + d1.get(name, 0)
        v1 = base[name].double() + d2.get(name, 0)
        torch.testing.assert_close(tensor.double(), slerp_reference(0.4, v0, v1), rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob(".materialized-*"))
    from test_merge import assert_loads_and_generates

    assert_loads_and_generates(out)


def test_linear_materialize_flag_gives_a_model(tiny_model_dir, adapter_a, adapter_b, tmp_path):
    out = tmp_path / "linmat"
    result = run_cli("linear", adapter_a, adapter_b, "--weights", "0.5,0.5", "--materialize", "-o", out)
    assert result.exit_code == 0, result.output
    base, d1, d2 = base_weights(tiny_model_dir), read_deltas(adapter_a), read_deltas(adapter_b)
    merged = load_file(str(out / "model.safetensors"))
    for name, tensor in merged.items():
        expected = base[name].double() + 0.5 * d1.get(name, 0) + 0.5 * d2.get(name, 0)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-5)


def test_ties_materialize_with_implied_base(tiny_model_dir, adapter_a, adapter_b, tmp_path):
    out = tmp_path / "tiesmat"
    result = run_cli("ties", adapter_a, adapter_b, "--density", "0.5", "-o", out)
    assert result.exit_code == 0, result.output
    base, d1, d2 = base_weights(tiny_model_dir), read_deltas(adapter_a), read_deltas(adapter_b)
    merged = load_file(str(out / "model.safetensors"))
    for name, tensor in merged.items():
        a = d1.get(name, torch.zeros_like(base[name], dtype=torch.double))
        b = d2.get(name, torch.zeros_like(base[name], dtype=torch.double))
        expected = base[name].double() + ties_reference([a, b], [1.0, 1.0], 0.5)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["different_bases", "stack_as_adapter", "wrong_base", "mixed"])
def test_adapter_errors(case, tiny_model_dir, tiny_model_dir_b, adapter_a, adapter_b, adapter_on_b, tmp_path):
    args, message = {
        "different_bases": (["linear", adapter_a, adapter_on_b, "--as-adapter"], "adapters on different bases"),
        "stack_as_adapter": (["stack", "--slice", f"{adapter_a}:0-1", "--as-adapter"], "no adapter-space form"),
        "wrong_base": (["task-arithmetic", "--base", tiny_model_dir_b, adapter_a, adapter_b, "--as-adapter"],
                       "is not the adapters' base"),
        "mixed": (["linear", adapter_a, tiny_model_dir, "--as-adapter"], "is a full model"),
    }[case]
    out = tmp_path / "out"
    result = run_cli(*args, "-o", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() and not (tmp_path / "out.partial").exists()
