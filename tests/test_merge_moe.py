"""`merge moe` and `merge moe-config` on tiny Llama models: tensors identical to mergekit-moe run directly on the same
YAML (the oracle), a Mixtral that loads in plain transformers and generates, adapters as experts, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import save_tiny_model
from merge.cli import main

PROMPTS = ["Translate to Pig Latin: hello", "def add(a, b): return a + b"]


def run_cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def run_mergekit_moe(config: dict, tmp_path: Path, *options: str) -> Path:
    """mergekit-moe itself, on the same configuration: the oracle."""
    from mergekit.scripts.moe import main as mergekit_moe

    path, out = tmp_path / "oracle.yaml", tmp_path / "oracle"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(mergekit_moe, [str(path), str(out), *options])
    assert result.exit_code == 0, result.output
    return out


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        found.update(load_file(str(file)))
    return found


def assert_same_tensors(a: Path, b: Path) -> None:
    mine, theirs = tensors(a), tensors(b)
    assert "model.layers.1.mlp.gate.weight" in mine  # a Mixtral's router: the comparison is not of two empty dirs
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def moe_config(base: Path, experts: list[Path], gate_mode: str) -> dict:
    return {"base_model": str(base), "gate_mode": gate_mode, "experts_per_token": 2,
            "experts": [{"source_model": str(e), "positive_prompts": [p]} for e, p in zip(experts, PROMPTS)]}


@pytest.fixture(scope="module")
def experts(tiny_model_dir_b, tiny_base_model_dir) -> list[Path]:
    return [tiny_model_dir_b, tiny_base_model_dir]


@pytest.fixture(scope="module")
def shortcut_cheap(tiny_model_dir, experts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "cheap"
    result = run_cli("moe", "--base", tiny_model_dir, "--expert", experts[0], "--prompts", PROMPTS[0],
                     "--expert", experts[1], "--prompts", PROMPTS[1], "--gate-mode", "cheap_embed",
                     "--experts-per-token", 2, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_shortcut_and_config_give_mergekit_moes_tensors(tiny_model_dir, experts, shortcut_cheap, tmp_path):
    config = moe_config(tiny_model_dir, experts, "cheap_embed")
    oracle = run_mergekit_moe(config, tmp_path)
    assert_same_tensors(shortcut_cheap, oracle)
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("moe-config", tmp_path / "moe.yaml", "-o", tmp_path / "from-config")
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "from-config", oracle)
    written = yaml.safe_load((shortcut_cheap / "mergekit_moe_config.yml").read_text())
    assert written == config  # runnable as is: the configuration that ran


@pytest.mark.parametrize("gate_mode", ["hidden", "random"])
def test_hidden_and_random_gates_match_mergekit_moe(gate_mode, tiny_model_dir, experts, tmp_path):
    oracle = run_mergekit_moe(moe_config(tiny_model_dir, experts, gate_mode), tmp_path, "--random-seed", "7")
    result = run_cli("moe", "--base", tiny_model_dir, "--expert", experts[0], "--prompts", PROMPTS[0],
                     "--expert", experts[1], "--prompts", PROMPTS[1], "--gate-mode", gate_mode, "--seed", 7,
                     "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "out", oracle)


def test_prompts_are_a_files_lines_or_one_text(tmp_path):
    from merge.moe import read_prompts

    (tmp_path / "p.txt").write_bytes("\ufeffone\r\n\r\n  two  \n".encode())
    assert read_prompts(str(tmp_path / "p.txt")) == ["one", "two"]
    assert read_prompts("just this") == ["just this"]


def test_output_is_a_mixtral_that_loads_and_generates(shortcut_cheap, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(shortcut_cheap))
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2
    tokenizer = AutoTokenizer.from_pretrained(str(shortcut_cheap))
    base_tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert tokenizer.chat_template == base_tokenizer.chat_template
    assert (tokenizer.pad_token, tokenizer.padding_side) == (base_tokenizer.pad_token, base_tokenizer.padding_side)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    record = json.loads((shortcut_cheap / "merge.json").read_text())
    assert record["output"]["architecture"] == "MixtralForCausalLM" and record["output"]["experts"] == 2
    assert [i["role"] for i in record["inputs"]] == ["base", "expert", "expert"]
    assert record["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def test_an_adapter_expert_is_merged_into_its_base_first(tiny_model_dir, tiny_model_dir_b, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_model_dir, tmp_path / "sft", seed=30)
    merged = tmp_path / "sft-merged"  # the oracle's expert: the adapter merged by PEFT
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter)
                              ).merge_and_unload().save_pretrained(str(merged))
    oracle = run_mergekit_moe(moe_config(tiny_model_dir, [merged, tiny_model_dir_b], "cheap_embed"), tmp_path)
    result = run_cli("moe", "--base", tiny_model_dir, "--expert", adapter, "--prompts", PROMPTS[0],
                     "--expert", tiny_model_dir_b, "--prompts", PROMPTS[1], "--gate-mode", "cheap_embed",
                     "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "out", oracle)
    assert not (tmp_path / "out" / ".materialized").exists()


@pytest.fixture(scope="module")
def deeper(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("moe") / "deeper", seed=4, layers=3)


@pytest.fixture(scope="module")
def adapter_on_b(tiny_model_dir_b, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir_b, tmp_path_factory.mktemp("moe") / "on-b", seed=31)


@pytest.mark.parametrize("case", ["shape", "other-base", "empty-prompt", "empty-file", "too-many-per-token",
                                  "prompt-count", "config-per-token", "config-lora"])
def test_bad_input_is_one_line_and_leaves_nothing(case, tiny_model_dir, experts, deeper, adapter_on_b, tmp_path):
    out = tmp_path / "out"
    second, prompts, extra = experts[1], [PROMPTS[0], PROMPTS[1]], []
    if case == "shape":
        second = deeper
    elif case == "other-base":
        second = adapter_on_b
    elif case == "empty-prompt":
        prompts[1] = ""
    elif case == "empty-file":
        (tmp_path / "empty.txt").write_text("\n  \n")
        prompts[1] = tmp_path / "empty.txt"
    elif case == "too-many-per-token":
        extra = ["--experts-per-token", 3]
    elif case == "prompt-count":
        prompts = prompts[:1]
    args = ["moe", "--base", tiny_model_dir, "--expert", experts[0], "--expert", second,
            *[a for p in prompts for a in ("--prompts", p)], "--gate-mode", "cheap_embed", *extra, "-o", out]
    if case == "config-per-token":
        config = {**moe_config(tiny_model_dir, experts, "cheap_embed"), "experts_per_token": 3}
        (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
        args = ["moe-config", tmp_path / "moe.yaml", "-o", out]
    if case == "config-lora":
        config = moe_config(tiny_model_dir, [experts[0], f"{tiny_model_dir}+{adapter_on_b}"], "cheap_embed")
        (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
        args = ["moe-config", tmp_path / "moe.yaml", "-o", out]
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert not out.exists() and not out.with_name("out.partial").exists()
