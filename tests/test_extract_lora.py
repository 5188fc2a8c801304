"""`merge extract-lora`: a tiny adapter merged into its base comes back out (PEFT's own outputs are the oracle), the
error falls with the rank, the output is a plain PEFT adapter, and bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import save_tiny_model
from merge.cli import main
from merge.extract import PROMPTS, rank_ladder

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4


def run_cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def lora(tiny_model_dir, tmp_path_factory) -> Path:
    """A rank-4 LoRA with random, non-zero A and B on every linear module."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(20)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
    out = tmp_path_factory.mktemp("extract") / "lora"
    get_peft_model(model, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def merged(tiny_model_dir, lora, tmp_path_factory) -> Path:
    """The LoRA merged into its base with PEFT: a full fine-tuned model to extract from."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("extract") / "merged"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(lora))
    model.merge_and_unload().save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def extracted(merged, tiny_model_dir, tmp_path_factory) -> dict[int, Path]:
    """The merged model extracted at ranks 1, 2 and 4 (its own)."""
    outs = {}
    for rank in (1, 2, RANK):
        outs[rank] = tmp_path_factory.mktemp("extract") / f"rank{rank}"
        result = run_cli("extract-lora", merged, "--base", tiny_model_dir, "--rank", rank, "-o", outs[rank])
        assert result.exit_code == 0, result.output
    return outs


@torch.no_grad()
def prompt_logits(base: Path, adapter: Path) -> torch.Tensor:
    """Logits of BASE + ADAPTER loaded with plain PEFT on the prompts merge.json measures."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    return torch.cat([model(**tokenizer(text, return_tensors="pt")).logits[0] for text in PROMPTS])


def test_extracting_at_the_adapters_own_rank_reproduces_its_outputs(lora, extracted, tiny_model_dir):
    original = prompt_logits(tiny_model_dir, lora)
    again = (prompt_logits(tiny_model_dir, extracted[RANK]) - original).abs().max()
    lower = (prompt_logits(tiny_model_dir, extracted[2]) - original).abs().max()
    # float32 SVD of a rank-4 delta: ~1e-6 off; one rank short, the fourth direction is missing
    assert again < 1e-4
    assert lower > 100 * 1e-4
    record = json.loads((extracted[RANK] / "merge.json").read_text())
    assert record["reconstruction_error"]["max"] < 1e-4
    assert record["logit_agreement"]["top1_agreement"] == 1.0
    assert record["logit_agreement"]["max_logit_diff"] < 1e-4


def test_an_adapter_as_model_is_merged_into_its_base_first(lora, tiny_model_dir, tmp_path):
    result = run_cli("extract-lora", lora, "--base", tiny_model_dir, "--rank", RANK, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    again = prompt_logits(tiny_model_dir, tmp_path / "out") - prompt_logits(tiny_model_dir, lora)
    assert again.abs().max() < 1e-4


def test_a_lower_rank_gives_a_larger_error(extracted):
    records = {r: json.loads((path / "merge.json").read_text()) for r, path in extracted.items()}
    errors = [records[r]["reconstruction_error"]["max"] for r in (1, 2, RANK)]
    diffs = [records[r]["logit_agreement"]["mean_logit_diff"] for r in (1, 2, RANK)]
    assert errors[0] > errors[1] > errors[2]
    assert diffs[0] > diffs[1] > diffs[2]
    per_module = records[1]["reconstruction_error"]["per_module"]
    assert sorted(m.rsplit(".", 1)[-1] for m in per_module) == sorted(TARGETS * 2)  # 2 layers, nothing else


def test_the_output_is_a_plain_peft_adapter(extracted, tiny_model_dir):
    from peft import AutoPeftModelForCausalLM

    out = extracted[RANK]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "merge.json",
        "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["modules_to_save"] == [] and Path(
        config["base_model_name_or_path"]) == Path(tiny_model_dir)
    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_rank_auto_takes_the_smallest_rank_that_keeps_the_agreement(merged, tiny_model_dir, extracted, tmp_path):
    result = run_cli("extract-lora", merged, "--base", tiny_model_dir, "--rank", "auto", "--min-agreement", 1.0,
                     "-o", tmp_path / "auto")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "auto" / "merge.json").read_text())
    # the top-1 agreement of each fixed-rank extraction above decides which rank auto must pick
    agreements = {r: json.loads((p / "merge.json").read_text())["logit_agreement"]["top1_agreement"]
                  for r, p in extracted.items()}
    expected = min(r for r, a in agreements.items() if a >= 1.0)
    assert record["rank"] == expected
    assert [t["rank"] for t in record["trials"]] == rank_ladder(64)[:rank_ladder(64).index(expected) + 1]


def test_rank_ladder():
    assert rank_ladder(32) == [1, 2, 4, 8, 16, 32]
    assert rank_ladder(48) == [1, 2, 4, 8, 16, 32, 48]


@pytest.fixture(scope="module")
def other_shape(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("extract") / "deeper", seed=3, layers=3)


@pytest.fixture(scope="module")
def other_architecture(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama's files, declared a Mistral: same tensors and shapes, another architecture."""
    import shutil

    out = tmp_path_factory.mktemp("extract") / "mistral"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("case", ["missing", "rank0", "shape", "architecture", "same", "bad-rank", "agreement",
                                  "agreement-with-fixed-rank"])
def test_bad_input_is_one_line(case, merged, tiny_model_dir, other_shape, other_architecture, tmp_path):
    out = tmp_path / "out"
    model, base, rank, extra = merged, tiny_model_dir, "2", []
    if case == "missing":
        model = tmp_path / "nowhere"
    elif case == "rank0":
        rank = "0"
    elif case == "shape":
        base = other_shape
    elif case == "architecture":
        base = other_architecture
    elif case == "same":
        model = tiny_model_dir
    elif case == "bad-rank":
        rank = "big"
    elif case == "agreement":
        rank, extra = "auto", ["--min-agreement", "1.5"]
    elif case == "agreement-with-fixed-rank":
        extra = ["--min-agreement", "0.9"]
    result = run_cli("extract-lora", model, "--base", base, "--rank", rank, *extra, "-o", out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert not out.exists() and not out.with_name("out.partial").exists()
