"""`merge` on full tiny models: every method checked tensor by tensor against math written here, and every
input error exits 2 with one line and leaves nothing behind."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_char_tokenizer, make_tiny_llama, save_tiny_model

from merge.cli import main

EXPECTED_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "generation_config.json", "mergekit_config.yml", "merge.json", "README.md"}


def run_cli(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def assert_loads_and_generates(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def assert_same_keys(out: dict, *inputs: dict) -> None:
    for source in inputs:
        assert set(out) == set(source)
    for name, tensor in out.items():
        assert torch.isfinite(tensor).all(), name


@pytest.fixture(scope="module")
def tiny_model_dir_c(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_c") / "model", seed=3)


# ---- methods ----------------------------------------------------------------------------------------------------


def test_linear_is_weighted_sum(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = tmp_path / "linear"
    result = run_cli("linear", tiny_model_dir, tiny_model_dir_b, "--weights", "0.7,0.3", "-o", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    a, b, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(out)
    assert_same_keys(merged, a, b)
    for name in merged:
        torch.testing.assert_close(merged[name], 0.7 * a[name] + 0.3 * b[name], rtol=1e-5, atol=1e-6)
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "linear" and record["output"]["kind"] == "model"
    assert [i["fingerprint"] for i in record["inputs"]] and record["timings_s"]["total"] > 0
    assert record["memory"]["peak_rss_bytes"] > 0 and record["versions"]["mergekit"] and record["command"]
    assert not (tmp_path / "linear.partial").exists()
    assert_loads_and_generates(out)


def test_linear_normalize_divides_by_weight_sum(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = tmp_path / "norm"
    assert run_cli("linear", tiny_model_dir, tiny_model_dir_b, "--weights", "2,1", "--normalize", "-o", out).exit_code == 0
    a, b, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(out)
    for name in merged:
        torch.testing.assert_close(merged[name], (2 * a[name] + b[name]) / 3, rtol=1e-5, atol=1e-6)


def reference_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Per tensor: angle between the flattened, normalized tensors; linear when nearly colinear."""
    x, y = v0.double().flatten(), v1.double().flatten()
    cos = float(torch.dot(x / x.norm(), y / y.norm()).clamp(-1, 1))
    if abs(cos) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    omega = math.acos(cos)
    return ((math.sin((1 - t) * omega) * v0.double() + math.sin(t * omega) * v1.double()) / math.sin(omega)).float()


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def test_slerp_scalar_t_per_tensor(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = tmp_path / "slerp"
    assert run_cli("slerp", tiny_model_dir, tiny_model_dir_b, "-t", "0.3", "-o", out).exit_code == 0
    a, b, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(out)
    assert_same_keys(merged, a, b)
    colinear = 0
    for name in merged:
        torch.testing.assert_close(merged[name], reference_slerp(0.3, a[name], b[name]), rtol=1e-4, atol=1e-5)
        if torch.equal(a[name], b[name]):  # RMSNorm weights are all ones in both: the linear fallback
            colinear += 1
            torch.testing.assert_close(merged[name], a[name])
    assert colinear > 0
    assert_loads_and_generates(out)


def test_slerp_gradient_and_attention_override(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = tmp_path / "slerp-grad"
    result = run_cli("slerp", tiny_model_dir, tiny_model_dir_b, "-t", "0.2,0.8", "--t-attn", "0.6", "-o", out)
    assert result.exit_code == 0, result.output
    a, b, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(out)
    layers = 2
    for name in merged:
        layer = layer_of(name)
        if "self_attn" in name:
            t = 0.6
        elif layer is not None:
            t = 0.2 + 0.6 * layer / (layers - 1)  # the gradient runs over layer index / (layers - 1)
        else:
            t = 0.2  # tensors outside the layers take the gradient's start
        torch.testing.assert_close(merged[name], reference_slerp(t, a[name], b[name]), rtol=1e-4, atol=1e-5)


def test_stack_has_expected_layers(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = tmp_path / "stack"
    result = run_cli("stack", "--slice", f"{tiny_model_dir}:0-2", "--slice", f"{tiny_model_dir_b}:1-2", "-o", out)
    assert result.exit_code == 0, result.output
    a, b, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    sources = {0: (a, 0), 1: (a, 1), 2: (b, 1)}
    for name, tensor in merged.items():
        layer = layer_of(name)
        if layer is None:  # mergekit: embeddings from the first slice's model, final norm and head from the last's
            torch.testing.assert_close(tensor, a[name] if "embed_tokens" in name else b[name])
        else:
            source, source_layer = sources[layer]
            torch.testing.assert_close(tensor, source[name.replace(f"layers.{layer}.", f"layers.{source_layer}.")])
    assert {layer_of(n) for n in merged} == {None, 0, 1, 2}
    assert_loads_and_generates(out)


def test_stack_depth_upscaling_of_one_model(tiny_model_dir, tmp_path):
    out = tmp_path / "dus"
    result = run_cli("stack", "--slice", f"{tiny_model_dir}:0-2", "--slice", f"{tiny_model_dir}:0-2", "-o", out)
    assert result.exit_code == 0, result.output
    a, merged = weights(tiny_model_dir), weights(out)
    for name, tensor in merged.items():
        layer = layer_of(name)
        source = name if layer is None else name.replace(f"layers.{layer}.", f"layers.{layer % 2}.")
        torch.testing.assert_close(tensor, a[source])
    assert_loads_and_generates(out)


def test_task_arithmetic(tiny_model_dir, tiny_model_dir_b, tiny_model_dir_c, tmp_path):
    out = tmp_path / "ta"
    result = run_cli("task-arithmetic", "--base", tiny_model_dir, tiny_model_dir_b, tiny_model_dir_c,
                     "--weights", "0.5,0.25", "-o", out)
    assert result.exit_code == 0, result.output
    base, b, c, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(tiny_model_dir_c), weights(out)
    for name in merged:
        expected = base[name] + 0.5 * (b[name] - base[name]) + 0.25 * (c[name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-5)
    assert_loads_and_generates(out)


def reference_ties(base, models, weights_, density):
    trimmed = []
    for model, w in zip(models, weights_):
        delta = (model - base).flatten()
        keep = torch.zeros_like(delta)
        keep[delta.abs().argsort(descending=True)[: max(1, int(density * delta.numel()))]] = 1
        trimmed.append(w * delta * keep)
    stacked = torch.stack(trimmed)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == elected).float()
    w = torch.tensor(weights_).unsqueeze(1)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base + ((stacked * agree).sum(0) / divisor).reshape(base.shape)


def test_ties(tiny_model_dir, tiny_model_dir_b, tiny_model_dir_c, tmp_path):
    out = tmp_path / "ties"
    result = run_cli("ties", "--base", tiny_model_dir, tiny_model_dir_b, tiny_model_dir_c,
                     "--weights", "0.6,0.4", "--density", "0.3", "-o", out)
    assert result.exit_code == 0, result.output
    base, b, c, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(tiny_model_dir_c), weights(out)
    for name in merged:
        expected = reference_ties(base[name], [b[name], c[name]], [0.6, 0.4], 0.3)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-5)
    assert_loads_and_generates(out)


def test_dare_drops_and_rescales(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = tmp_path / "dare"
    result = run_cli("dare", "--base", tiny_model_dir, tiny_model_dir_b, "--density", "0.5", "--seed", "1", "-o", out)
    assert result.exit_code == 0, result.output
    base, b, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(out)
    for name in merged:
        delta, got = b[name] - base[name], merged[name] - base[name]
        if delta.abs().sum() == 0:
            torch.testing.assert_close(got, delta)
            continue
        kept = got != 0
        share = kept.float().mean().item()
        if delta.numel() >= 1000:
            assert 0.4 < share < 0.6, (name, share)
        # survivors are rescaled by one factor per tensor, chosen so the L1 norm of the delta is kept
        factor = delta.abs().sum() / delta[kept].abs().sum()
        torch.testing.assert_close(got[kept], factor * delta[kept], rtol=1e-4, atol=1e-6)
    record = json.loads((out / "merge.json").read_text())
    assert record["mergekit_method"] == "dare_linear"
    assert_loads_and_generates(out)


def test_dare_density_one_is_task_arithmetic(tiny_model_dir, tiny_model_dir_b, tiny_model_dir_c, tmp_path):
    out = tmp_path / "dare1"
    result = run_cli("dare", "--base", tiny_model_dir, tiny_model_dir_b, tiny_model_dir_c, "--weights", "0.5,0.5",
                     "--density", "1", "-o", out)
    assert result.exit_code == 0, result.output
    base, b, c, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(tiny_model_dir_c), weights(out)
    for name in merged:
        expected = base[name] + 0.5 * (b[name] - base[name]) + 0.5 * (c[name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-5)


def test_config_file_runs_any_mergekit_config(tiny_model_dir, tiny_model_dir_b, tmp_path):
    config = tmp_path / "nuslerp.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_model_dir}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {tiny_model_dir_b}\n    parameters: {{weight: 3.0}}\n")
    out = tmp_path / "cfg"
    result = run_cli("config", config, "-o", out)
    assert result.exit_code == 0, result.output
    a, b, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(out)
    for name in merged:  # mergekit's linear normalizes by default
        torch.testing.assert_close(merged[name], 0.25 * a[name] + 0.75 * b[name], rtol=1e-5, atol=1e-6)
    assert "merge_method: linear" in (out / "mergekit_config.yml").read_text()
    inputs = json.loads((out / "merge.json").read_text())["inputs"]
    assert {i["model"] for i in inputs} == {str(tiny_model_dir), str(tiny_model_dir_b)}
    assert all(i["model_fingerprint"] for i in inputs)
    assert_loads_and_generates(out)


def test_shortcut_config_reruns_with_config_command(tiny_model_dir, tiny_model_dir_b, tmp_path):
    first = tmp_path / "first"
    assert run_cli("slerp", tiny_model_dir, tiny_model_dir_b, "-t", "0.4", "-o", first).exit_code == 0
    again = tmp_path / "again"
    assert run_cli("config", first / "mergekit_config.yml", "-o", again).exit_code == 0
    one, two = weights(first), weights(again)
    for name in one:
        torch.testing.assert_close(one[name], two[name])


def test_small_shards_still_load(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = tmp_path / "shards"
    assert run_cli("linear", tiny_model_dir, tiny_model_dir_b, "--shard-size", "40K", "-o", out).exit_code == 0
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    a, b, merged = weights(tiny_model_dir), weights(tiny_model_dir_b), weights(out)
    assert_same_keys(merged, a, b)
    assert_loads_and_generates(out)


def test_overwrite_replaces_output(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = tmp_path / "ow"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert run_cli("linear", tiny_model_dir, tiny_model_dir_b, "-o", out, "--overwrite").exit_code == 0
    assert not (out / "old.txt").exists() and (out / "merge.json").is_file()


def test_union_tokenizer_merges_different_vocabularies(tiny_model_dir, other_vocab_dir, tmp_path):
    out = tmp_path / "union"
    result = run_cli("linear", tiny_model_dir, other_vocab_dir, "--tokenizer-source", "union", "-o", out)
    assert result.exit_code == 0, result.output
    from transformers import AutoTokenizer

    assert "<|extra|>" in AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert_loads_and_generates(out)


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory) -> Path:
    """Same architecture, one extra token (and embedding row)."""
    path = tmp_path_factory.mktemp("vocab") / "model"
    tokenizer = make_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|extra|>"]})
    model = make_tiny_llama(len(tokenizer), seed=4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wide") / "model"
    tokenizer = make_char_tokenizer()
    make_tiny_llama(len(tokenizer), seed=5, hidden=32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mistral_dir(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mistral") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (path / "config.json").write_text(json.dumps(config))
    return path


ERROR_CASES = {
    "architectures": (lambda d: ["linear", d["a"], d["mistral"]], "different architectures"),
    "shapes": (lambda d: ["linear", d["a"], d["wide"]], "tensor lm_head.weight has shape ["),
    "vocabulary": (lambda d: ["linear", d["a"], d["vocab"]], "different vocabularies"),
    "t_range": (lambda d: ["slerp", d["a"], d["b"], "-t", "1.5"], "-t 1.5 is outside [0, 1]"),
    "t_attn_range": (lambda d: ["slerp", d["a"], d["b"], "--t-attn", "-0.1"], "--t-attn -0.1 is outside [0, 1]"),
    "weight_count": (lambda d: ["linear", d["a"], d["b"], "--weights", "0.2,0.3,0.5"], "--weights: 3 values given for 2"),
    "slice_range": (lambda d: ["stack", "--slice", f"{d['a']}:0-3"], "has layers 0-2"),
    "slice_syntax": (lambda d: ["stack", "--slice", f"{d['a']}"], "expected MODEL:START-END"),
    "missing_model": (lambda d: ["linear", d["a"], "/nonexistent/model"], "model not found: /nonexistent/model"),
    "density": (lambda d: ["ties", "--base", d["a"], d["b"], "--density", "0"], "--density 0 is outside (0, 1]"),
    "ties_no_base": (lambda d: ["ties", d["a"], d["b"]], "ties needs --base BASE"),
    "bad_tokenizer_source": (lambda d: ["linear", d["a"], d["b"], "--tokenizer-source", "x"], "--tokenizer-source 'x'"),
    "shard_size": (lambda d: ["linear", d["a"], d["b"], "--shard-size", "lots"], "--shard-size 'lots'"),
    "duplicate": (lambda d: ["linear", d["a"], d["a"]], "are the same model"),
    "base_is_input": (lambda d: ["ties", "--base", d["a"], d["a"], d["b"]], "are the same model"),
    "config_missing": (lambda d: ["config", d["tmp"] / "nope.yml"], "config file not found"),
    "config_invalid": (lambda d: ["config", d["bad_yaml"]], "merge_method"),
    "config_model_missing": (lambda d: ["config", d["missing_yaml"]], "/nonexistent/x not found"),
    # the shortcuts over mergekit's other methods: their parameters and model counts, checked before any merge
    "nearswap_no_t": (lambda d: ["nearswap", d["b"], "--base", d["a"]], "nearswap needs -t"),
    "della_band": (lambda d: ["della", d["b"], "--base", d["a"], "--density", "0.9"],
                   "--epsilon 0.15 with --density 0.9: density ± epsilon must lie inside (0, 1)"),
    "della_no_base": (lambda d: ["della", d["a"], d["b"]], "della needs --base BASE"),
    "gamma_range": (lambda d: ["breadcrumbs", d["b"], "--base", d["a"], "--gamma", "1"], "--gamma 1 is outside [0, 1)"),
    "per_model_count": (lambda d: ["breadcrumbs-ties", d["b"], d["vocab"], "--base", d["a"],
                                   "--density", "0.5,0.5,0.5"], "--density: 3 values given for 2 models (give 1 or 2)"),
    "nuslerp_count": (lambda d: ["nuslerp", d["a"], d["b"], d["vocab"]], "nuslerp merges exactly 2 models; 3 given"),
    "fusion_count": (lambda d: ["arcee-fusion", d["b"], d["vocab"], "--base", d["a"]],
                     "arcee-fusion merges exactly 1 model besides the base; 2 given"),
    "model_stock_count": (lambda d: ["model-stock", d["b"], "--base", d["a"]],
                          "model-stock needs at least 2 models besides the base; 1 given"),
    "topk_words": (lambda d: ["sce", d["b"], "--base", d["a"], "--select-topk", "most"],
                   "--select-topk 'most': expected comma-separated numbers"),
    "max_iter": (lambda d: ["karcher", d["a"], d["b"], "--max-iter", "0"], "--max-iter 0 is outside [1, inf)"),
    "lambda_list": (lambda d: ["della", d["b"], "--base", d["a"], "--lambda", "1,2"], "--lambda '1,2': expected one"),
    "shortcut_as_adapter": (lambda d: ["ram", d["b"], "--base", d["a"], "--as-adapter"],
                            "ram has no adapter-space form"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_exit_2_one_line_nothing_written(case, tiny_model_dir, tiny_model_dir_b, wide_model_dir, mistral_dir,
                                                other_vocab_dir, tmp_path):
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text(f"models:\n  - model: {tiny_model_dir}\n")
    missing_yaml = tmp_path / "missing.yml"
    missing_yaml.write_text("merge_method: linear\nmodels:\n  - model: /nonexistent/x\n    parameters: {weight: 1}\n")
    dirs = {"a": tiny_model_dir, "b": tiny_model_dir_b, "wide": wide_model_dir, "mistral": mistral_dir,
            "vocab": other_vocab_dir, "tmp": tmp_path, "bad_yaml": bad_yaml, "missing_yaml": missing_yaml}
    build, message = ERROR_CASES[case]
    out = tmp_path / "out"
    result = run_cli(*build(dirs), "-o", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert not list(tmp_path.glob(".materialized-*"))


def test_non_empty_output_refused(tiny_model_dir, tiny_model_dir_b, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("linear", tiny_model_dir, tiny_model_dir_b, "-o", out)
    assert result.exit_code == 2 and "is not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
