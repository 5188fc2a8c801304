"""TRL-style and alignment-handbook-style flat configs, and dataset mixtures (data.mixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trl import DPOConfig, SFTConfig

from align.core.config import DPORecipe, MixtureSource, SFTRecipe, build_recipe
from align.core.data import DataError
from align.core.errors import AlignError
from align.core.mixture import take_indices
from conftest import write_jsonl


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_config_as_trls_cli_docs_write_one(tmp_path):
    # the shape of trl's examples/cli_configs/example_config.yaml, with a local file for the hub dataset
    data = write_jsonl(tmp_path / "imdb.jsonl", [{"text": "a fine film"}])
    path = write(tmp_path, f"""\
# trl sft --config config.yaml --output_dir test-sft
model_name_or_path:
  {tmp_path / "model"}
dataset_name:
  {data}
report_to:
  none
learning_rate:
  0.0001
lr_scheduler_type:
  cosine
output_dir: test-sft
""")
    recipe = build_recipe(SFTRecipe, path, {}, trl_config=SFTConfig)
    assert recipe.model.name == str(tmp_path / "model") and recipe.data.path == str(data)
    assert recipe.report_to == "none" and recipe.output == "test-sft"
    assert recipe.train == {"learning_rate": 0.0001, "lr_scheduler_type": "cosine"}


def test_a_qlora_config_as_the_alignment_handbook_writes_one(tmp_path):
    write_jsonl(tmp_path / "ultrachat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}] * 4)
    write_jsonl(tmp_path / "extra.jsonl", [{"instruction": "say hi", "output": "hi"}] * 4)
    path = write(tmp_path, f"""\
# Model arguments
model_name_or_path: mistralai/Mistral-7B-v0.1
model_revision: main
torch_dtype: bfloat16
attn_implementation: flash_attention_2

# LoRA arguments
load_in_4bit: true
use_peft: true
lora_r: 16
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
- q_proj
- k_proj
- v_proj
- o_proj

# Data training arguments
dataset_mixture:
  datasets:
    - id: {tmp_path / "ultrachat.jsonl"}
      split: train
      weight: 0.5
    - id: json
      data_files: {tmp_path / "extra.jsonl"}
      weight: 1.0
  seed: 42
  test_split_size: 0.1
preprocessing_num_workers: 12

# SFT trainer config
bf16: true
do_eval: true
eval_strategy: epoch
gradient_accumulation_steps: 2
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
learning_rate: 2.0e-04
log_level: info
logging_steps: 5
lr_scheduler_type: cosine
max_length: 2048
max_steps: -1
num_train_epochs: 1
output_dir: data/zephyr-7b-sft-qlora
overwrite_output_dir: true
per_device_train_batch_size: 4
push_to_hub: false
report_to:
- tensorboard
save_strategy: "steps"
save_steps: 100
save_total_limit: 1
seed: 42
""")
    recipe = build_recipe(SFTRecipe, path, {}, trl_config=SFTConfig)
    assert recipe.model.name == "mistralai/Mistral-7B-v0.1"
    assert (recipe.model.dtype, recipe.model.quantize, recipe.model.attn) == ("bfloat16", "4bit", "flash_attention_2")
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (16, 16, 0.05)
    assert recipe.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert recipe.data.mixture == [MixtureSource(path=str(tmp_path / "ultrachat.jsonl"), split="train", weight=0.5),
                                   MixtureSource(path=str(tmp_path / "extra.jsonl"))]
    assert recipe.data.eval_size == 0.1
    assert recipe.output == "data/zephyr-7b-sft-qlora" and recipe.overwrite
    assert recipe.train["seed"] == 42 and recipe.train["max_length"] == 2048
    assert recipe.train["gradient_checkpointing"] is True and recipe.report_to == "tensorboard"
    assert "preprocessing_num_workers" not in recipe.train


def test_older_handbook_names_are_mapped(tmp_path):
    path = write(tmp_path, """\
model_name_or_path: m
torch_dtype: auto
use_flash_attention_2: true
dataset_mixer:
  HuggingFaceH4/ultrachat_200k: 1.0
  local/other: 0.25
dataset_splits:
- train_sft
- test_sft
evaluation_strategy: "no"
max_seq_length: 512
""")
    recipe = build_recipe(SFTRecipe, path, {}, trl_config=SFTConfig)
    assert recipe.model.attn == "flash_attention_2" and recipe.model.dtype == "auto"
    assert [(s.path, s.split, s.weight) for s in recipe.data.mixture] == [
        ("HuggingFaceH4/ultrachat_200k", "train_sft", None), ("local/other", "train_sft", 0.25)]
    assert recipe.train == {"eval_strategy": "no", "max_length": 512}


def test_a_dpo_config_maps_dpo_fields_and_keeps_flags_on_top(tmp_path):
    path = write(tmp_path, """\
model_name_or_path: runs/sft
dataset_name: prefs.jsonl
beta: 0.01
loss_type: sigmoid
max_prompt_length: 512
use_peft: true
lora_r: 8
""")
    recipe = build_recipe(DPORecipe, path, {"train.beta": 0.2}, trl_config=DPOConfig)
    assert recipe.model.name == "runs/sft" and recipe.data.path == "prefs.jsonl"
    assert set(recipe.train) == {"beta", "loss_type"} and recipe.train["beta"] == 0.2
    assert recipe.max_prompt_length == 512 and recipe.lora.r == 8


@pytest.mark.parametrize("line, message", [
    ("learnin_rate: 0.1", r"config.yaml: unknown key 'learnin_rate' \(did you mean 'learning_rate'\?\)"),
    ("use_peft: false", r"config.yaml: use_peft: False is not supported \(alignmerge trains LoRA adapters only"),
    ("trust_remote_code: true", r"trust_remote_code: True is not supported"),
    ("dataset_streaming: true", r"dataset_streaming: True is not supported \(datasets are read whole"),
])
def test_what_cannot_be_honoured_is_a_one_line_error_naming_the_file(tmp_path, line, message):
    path = write(tmp_path, f"model_name_or_path: m\n{line}\n")
    with pytest.raises(AlignError, match=message):
        build_recipe(SFTRecipe, path, {}, trl_config=SFTConfig)


def test_a_sectioned_recipe_is_not_taken_for_a_flat_one(tmp_path):
    path = write(tmp_path, "lora: {alpah: 4}\n")
    with pytest.raises(AlignError, match=r"unknown key 'lora.alpah' \(did you mean 'alpha'\?\)"):
        build_recipe(SFTRecipe, path, {}, trl_config=SFTConfig)


# ---- mixtures ---------------------------------------------------------------------------------------------------


ROWS = list(range(10))


def take(source: MixtureSource, seed: int = 0) -> list[int]:
    return take_indices(len(ROWS), source, seed, where=source.path)


def test_rows_and_weights_take_seeded_samples_in_source_order():
    five = take(MixtureSource(path="a", rows=5))
    assert len(five) == 5 and five == sorted(five)
    assert five == take(MixtureSource(path="a", rows=5))
    draws = {tuple(take(MixtureSource(path="a", rows=5), seed=s)) for s in range(5)}
    assert len(draws) > 1  # the seed matters
    assert len(take(MixtureSource(path="a", weight=0.3))) == 3
    upsampled = take(MixtureSource(path="a", weight=1.5))
    assert len(upsampled) == 15 and upsampled[:10] == ROWS
    assert take(MixtureSource(path="a")) == ROWS


def test_asking_for_more_rows_than_a_source_has_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"b.jsonl: rows 11 asked, but the source has only 10"):
        take(MixtureSource(path="b.jsonl", rows=11))
    both = write(tmp_path, "data: {mixture: [{path: a, rows: 1, weight: 0.5}]}\n")
    with pytest.raises(AlignError, match=r"data.mixture.0: Value error, give rows or weight, not both"):
        build_recipe(SFTRecipe, both, {})


def sft_sources(tmp_path: Path) -> tuple[Path, Path]:
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                               {"role": "assistant", "content": f"a{i}"}]}
                                                 for i in range(8)])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"say {i}", "output": str(i)} for i in range(6)])
    return chat, alpaca


def test_a_mixture_of_two_formats_is_recorded_per_source_and_fixed_by_the_seed(tmp_path, char_tokenizer):
    from align.train.sft import prepare_sft_data

    chat, alpaca = sft_sources(tmp_path)

    def prepared(seed: int):
        recipe = SFTRecipe.model_validate({"data": {"mixture": [{"path": str(chat), "rows": 3},
                                                                {"path": str(alpaca), "weight": 0.5}]},
                                           "train": {"seed": seed}})
        return prepare_sft_data(recipe, char_tokenizer).record

    record = prepared(0)
    assert record["rows"] == 6 and record["format"] == "messages+alpaca"
    assert [(s["available"], s["taken"]) for s in record["mixture"]] == [(8, 3), (6, 3)]
    assert prepared(0)["fingerprint"] == record["fingerprint"]
    assert any(prepared(seed)["fingerprint"] != record["fingerprint"] for seed in (1, 2, 3))


def test_sft_from_a_flat_config_with_a_mixture_end_to_end(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from align.cli import main

    chat, alpaca = sft_sources(tmp_path)
    config = write(tmp_path, f"""\
model_name_or_path: {tiny_model_dir}
torch_dtype: float32
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_modules: [q_proj, v_proj]
dataset_mixture:
  datasets:
    - path: json
      data_files: {chat}
      fraction: 0.5
    - path: {alpaca}
report_to: none
max_steps: 2
per_device_train_batch_size: 4
learning_rate: 1.0e-3
output_dir: {tmp_path / "out"}
""")
    result = CliRunner().invoke(main, ["sft", *config_args(config)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["data"]["rows"] == 10 and record["data"]["source"] == "data.mixture"
    assert [s["taken"] for s in record["data"]["mixture"]] == [4, 6]
    assert record["recipe"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert record["trainer_args"]["max_steps"] == 2


def config_args(path: Path) -> list[str]:
    """`--config FILE` where the CLI has it, else the positional recipe argument (the same loader)."""
    from align.cli import main

    sft = main.commands["sft"]
    return ["--config", str(path)] if any("--config" in p.opts for p in sft.params) else [str(path)]


def test_a_preference_mixture_samples_pairs_per_source(tmp_path):
    from align.core.config import DPORecipe
    from align.train.preference import prepare_preference_data

    explicit = write_jsonl(tmp_path / "explicit.jsonl", [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}
                                                         for i in range(6)])
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good",
                                              "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad"} for i in range(4)])
    recipe = DPORecipe.model_validate({"data": {"mixture": [{"path": str(explicit), "rows": 2},
                                                            {"path": str(hh), "weight": 2.0}]}})
    record = prepare_preference_data(recipe).record
    assert record["pairs"] == 10 and record["source"] == "data.mixture"
    assert [(s["format"], s["available"], s["taken"]) for s in record["mixture"]] == [("explicit", 6, 2), ("hh", 4, 8)]
