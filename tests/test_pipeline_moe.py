"""`align run` with the merge stages that are their own commands: `method: moe` (merge/moe.py) and
`method: extract-lora` (merge/extract.py), on tiny models; bad stages refused when the recipe loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from align.cli import main

SUITE = """name: tiny
tasks:
  - name: seen
    kind: generate
    data: builtin:pig-latin
    split: seen
    limit: 2
    metrics: [exact_match]
    generation: {max_new_tokens: 4}
"""
TRAIN = "train: {max_steps: 2, per_device_train_batch_size: 4, learning_rate: 1.0e-2, save_steps: 100}"


def write_recipe(tmp_path: Path, model_dir: Path) -> Path:
    (tmp_path / "suite.yaml").write_text(SUITE)
    (tmp_path / "reverse-prompts.txt").write_text("Reverse the words: one two three\n\nReverse the words: a b\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""# align run recipe.yaml
model: {{name: "{model_dir}", dtype: float32, compile: false}}
stages:
  - name: pig
    kind: sft
    data: {{path: "builtin:pig-latin", limit: 8}}
    lora: {{r: 4, dropout: 0.0}}
    {TRAIN}
  - name: reverse
    kind: sft
    data: {{path: "builtin:reverse-words", limit: 8}}
    lora: {{r: 4, dropout: 0.0}}
    {TRAIN}
  - name: moe
    kind: merge
    method: moe
    experts:
      - {{model: pig, prompts_from_data: 3}}
      - {{model: reverse, prompts: reverse-prompts.txt}}
    gate_mode: hidden
    experts_per_token: 1
  - name: linear
    kind: merge
    method: linear
    models: [pig, reverse]
    weights: [1.0, 1.0]
  - name: extracted
    kind: merge
    method: extract-lora
    model: linear
    rank: 8
  - name: eval
    kind: eval
    suites: [suite.yaml]
    models: [moe, extracted]
    limit: 2
""")
    return path


def run_cli(*args: object):
    return CliRunner().invoke(main, ["run", *map(str, args)])


@pytest.fixture(scope="module")
def rundir(tiny_model_dir, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("moe-pipeline")
    out = tmp_path / "run"
    result = run_cli(write_recipe(tmp_path, tiny_model_dir), "-o", out)
    assert result.exit_code == 0, result.output + str(result.exception)
    return out


def test_moe_stage_builds_a_mixtral_that_plain_transformers_loads_and_runs(rundir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.core.data import load_sft_data

    model = AutoModelForCausalLM.from_pretrained(str(rundir / "moe"))
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 2
    assert model.config.num_experts_per_tok == 1
    tokenizer = AutoTokenizer.from_pretrained(str(rundir / "moe"))
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    # routed by the first 3 user messages of pig's training data, and by the lines of the prompts file
    rows, _, _ = load_sft_data("builtin:pig-latin", limit=3)
    ran = yaml.safe_load((rundir / "moe" / "mergekit_moe_config.yml").read_text())
    assert [e["positive_prompts"] for e in ran["experts"]] == [
        [r["messages"][0]["content"] for r in rows], ["Reverse the words: one two three", "Reverse the words: a b"]]
    record = json.loads((rundir / "moe" / "merge.json").read_text())
    assert record["method"] == "moe" and record["parameters"]["template_source"].endswith("reverse")
    assert [i["role"] for i in record["inputs"]] == ["base", "expert", "expert"]
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(rundir / "reverse")).chat_template


def test_extract_stage_is_an_adapter_that_reproduces_the_merged_model(rundir, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 20, 31, 40, 41, 60, 7]])
    merged = AutoModelForCausalLM.from_pretrained(str(rundir / "linear"), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(rundir / "extracted")).eval()
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
        with adapted.disable_adapter():
            plain = adapted(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-2  # the merge moved the logits far more than the bound below allows
    # two rank-4 adapters averaged: a delta of rank <= 8, so rank 8 holds all of it (float32 SVD: ~1e-6 off)
    assert (want - got).abs().max() < 1e-3
    record = json.loads((rundir / "extracted" / "merge.json").read_text())
    assert record["rank"] == 8 and record["logit_agreement"]["top1_agreement"] == 1.0
    report = (rundir / "report.md").read_text()
    assert "| moe |" in report and "| extracted |" in report


BAD = {
    "typo": ("  - {name: m, kind: merge, method: moe, gate_mod: hidden, experts: [{model: a, prompts: [x]}, "
             "{model: b, prompts: [y]}]}", "unknown key 'stages.2.merge/moe.gate_mod'"),
    "one-expert": ("  - {name: m, kind: merge, method: moe, experts: [{model: a, prompts: [x]}]}",
                   "a mixture needs at least 2 experts"),
    "no-prompts": ("  - {name: m, kind: merge, method: moe, experts: [{model: a, prompts: [x]}, {model: b}]}",
                   "expert 'b' has no `prompts` or `prompts_from_data`"),
    "missing-file": ("  - {name: m, kind: merge, method: moe, experts: [{model: a, prompts: nope.txt}, "
                     "{model: b, prompts: [y]}]}", "prompts file"),
    "gate-mode": ("  - {name: m, kind: merge, method: moe, gate_mode: smart, experts: [{model: a, prompts: [x]}, "
                  "{model: b, prompts: [y]}]}", "gate mode 'smart': expected one of hidden, cheap_embed, random"),
    "not-earlier": ("  - {name: m, kind: merge, method: moe, experts: [{model: a, prompts: [x]}, "
                    "{model: later, prompts: [y]}]}", "refers to 'later', which is not an earlier stage"),
    "rank0": ("  - {name: x, kind: merge, method: extract-lora, model: a, rank: 0}",
              "rank 0: must be a positive integer or auto"),
    "no-rank": ("  - {name: x, kind: merge, method: extract-lora, model: a}", "rank: Field required"),
    "method-typo": ("  - {name: x, kind: merge, method: extract-lor, model: a, rank: 2}",
                    "(did you mean 'extract-lora'?)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_stages_are_refused_when_the_recipe_loads(case, tiny_model_dir, tmp_path):
    stage, expected = BAD[case]
    (tmp_path / "recipe.yaml").write_text(f"""model: {{name: "{tiny_model_dir}"}}
stages:
  - {{name: a, kind: sft}}
  - {{name: b, kind: sft}}
{stage}
""")
    result = run_cli(tmp_path / "recipe.yaml", "-o", tmp_path / "run")
    assert result.exit_code == 2 and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before any stage ran


def test_prompts_from_data_needs_a_training_stage(tiny_model_dir, tmp_path):
    (tmp_path / "recipe.yaml").write_text(f"""model: {{name: "{tiny_model_dir}"}}
stages:
  - {{name: a, kind: sft}}
  - {{name: l, kind: merge, method: linear, models: [a, base]}}
  - {{name: m, kind: merge, method: moe, experts: [{{model: a, prompts: [x]}}, {{model: l, prompts_from_data: 4}}]}}
""")
    result = run_cli(tmp_path / "recipe.yaml", "-o", tmp_path / "run")
    assert result.exit_code == 2 and "prompts_from_data needs the expert to be an SFT-data training stage" in result.stderr


def test_two_skills_moe_routes_each_expert_by_its_own_training_prompts(tmp_path):
    """recipes/two-skills.yaml loads, and its MoE stage's prompts (read without running a stage) are each skill's
    first training prompts, capped at what the stage trains on."""
    from align.core.demo import builtin_dataset
    from align.pipeline.moe import expert_prompts
    from align.pipeline.run import load_pipeline
    from align.pipeline.stages import MoEStage, Pipeline

    recipe = load_pipeline(Path(__file__).resolve().parents[1] / "recipes" / "two-skills.yaml",
                           ["pig.data.limit=5"])
    stage = next(s for s in recipe.stages if isinstance(s, MoEStage))
    prompts = expert_prompts(stage, Pipeline(recipe, tmp_path, "", {}))
    expected = [[row["messages"][0]["content"] for row in builtin_dataset(name)[:n]]
                for name, n in (("pig-latin", 5), ("reverse-words", 32))]
    assert prompts == expected and "moe" in next(s for s in recipe.stages if s.name == "eval").models
