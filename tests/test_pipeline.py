"""`align run` on a tiny model: stages wired end to end, skipping what is up to date, `--from`, `--set`, the
template contract, merge sweeps and on-policy pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from align.cli import main
from align.core.errors import AlignError
from align.pipeline.run import load_pipeline, run_pipeline
from align.pipeline.sweep import selection_score

SUITE = """name: tiny
tasks:
  - name: seen
    kind: generate
    data: builtin:pig-latin
    split: seen
    limit: 3
    metrics: [exact_match, word_accuracy]
    generation: {max_new_tokens: 8}
"""


def write_recipe(tmp_path: Path, model_dir: Path) -> Path:
    (tmp_path / "suite.yaml").write_text(SUITE)
    recipe = f"""# align run recipe.yaml
model: {{name: "{model_dir}", dtype: float32, compile: false}}
stages:
  - name: sft
    kind: sft
    data: {{path: "builtin:pig-latin", limit: 16}}
    lora: {{r: 4, dropout: 0.0}}
    train: {{max_steps: 3, per_device_train_batch_size: 4, learning_rate: 1.0e-2, save_steps: 100}}
  - name: pairs
    kind: pairs
    adapter: sft
    data: builtin:pig-latin
    limit: 4
    samples: 2
    max_new_tokens: 8
  - name: dpo
    kind: dpo
    adapter: sft
    data: pairs
    ref: adapter
    train: {{max_steps: 2, per_device_train_batch_size: 2, learning_rate: 1.0e-3, save_steps: 100}}
  - name: merged
    kind: merge
    method: slerp
    models: [base, dpo]
    t: [0.5, 1.0]
    select: {{suite: suite.yaml, metric: "seen/word_accuracy", limit: 3}}
  - name: eval
    kind: eval
    suites: [suite.yaml]
    models: [base, sft, dpo, merged]
    limit: 3
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    return path


def run_cli(*args: str):
    return CliRunner().invoke(main, ["run", *args])


def stage_mtimes(rundir: Path) -> dict[str, float]:
    records = {"sft": "run.json", "pairs": "pairs.json", "dpo": "run.json", "merged": "merge.json", "eval": "report.json"}
    return {name: (rundir / name / record).stat().st_mtime for name, record in records.items()}


def test_pipeline_runs_every_stage_then_skips_and_reruns_only_what_changed(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    rundir = tmp_path / "run"
    result = run_cli(str(recipe), "-o", str(rundir))
    assert result.exit_code == 0, result.output + str(result.exception)

    pairs = [json.loads(line) for line in (rundir / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    dpo = json.loads((rundir / "dpo" / "run.json").read_text())
    assert dpo["reference"]["mode"] == "adapter" and dpo["reference"]["adapter"].endswith("sft")
    merged = json.loads((rundir / "merged" / "merge.json").read_text())
    assert [c["candidate"]["t"] for c in merged["sweep"]["candidates"]] == [0.5, 1.0]
    assert (rundir / "merged" / "sweep.png").is_file()
    scores = [c["score"] for c in merged["sweep"]["candidates"]]
    assert merged["sweep"]["selected"]["t"] == [0.5, 1.0][scores.index(max(scores))]
    report = (rundir / "report.md").read_text()
    for name in ("base", "sft", "dpo", "merged"):
        assert f"| {name} |" in report
    assert "Wall time per stage" in report

    # the merged model renders and stops like the SFT model
    from transformers import AutoTokenizer, GenerationConfig

    sft_tokenizer = AutoTokenizer.from_pretrained(str(rundir / "sft"))
    merged_tokenizer = AutoTokenizer.from_pretrained(str(rundir / "merged"))
    assert merged_tokenizer.chat_template == sft_tokenizer.chat_template
    assert GenerationConfig.from_pretrained(str(rundir / "merged")).eos_token_id == sft_tokenizer.eos_token_id

    before = stage_mtimes(rundir)
    again = run_cli(str(recipe), "-o", str(rundir))
    assert again.exit_code == 0 and again.stderr.count("up to date, skipped") == 5
    assert stage_mtimes(rundir) == before

    changed = run_cli(str(recipe), "-o", str(rundir), "--set", "dpo.train.learning_rate=2e-3")
    assert changed.exit_code == 0, changed.output
    after = stage_mtimes(rundir)
    assert after["sft"] == before["sft"] and after["pairs"] == before["pairs"]
    assert all(after[s] > before[s] for s in ("dpo", "merged", "eval"))

    forced = run_cli(str(recipe), "-o", str(rundir), "--set", "dpo.train.learning_rate=2e-3", "--from", "eval")
    assert forced.exit_code == 0
    assert stage_mtimes(rundir)["eval"] > after["eval"] and stage_mtimes(rundir)["dpo"] == after["dpo"]


def test_template_contract_mismatch_names_both_values(tiny_model_dir, tmp_path):
    recipe = load_pipeline(write_recipe(tmp_path, tiny_model_dir))
    dpo = recipe.stages[2]
    recipe.stages = recipe.stages[:1] + [dpo.model_copy(update={"data": dpo.data.model_copy(
        update={"path": "builtin:pig-latin-prefs"})})]
    rundir = tmp_path / "run"
    run_pipeline(recipe, rundir, only="sft", progress=False)
    tokenizer_config = rundir / "sft" / "chat_template.jinja"
    tokenizer_config.write_text(tokenizer_config.read_text().replace("<|im_start|>assistant", "<|im_start|>bot"))
    with pytest.raises(AlignError, match=r"template contract broken at dpo: chat_template is .*bot.* recorded .*assistant"):
        run_pipeline(recipe, rundir, progress=False)


def test_only_needs_complete_upstream_and_names_are_checked(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    result = run_cli(str(recipe), "-o", str(tmp_path / "r"), "--only", "dpo")
    assert result.exit_code == 2 and "upstream stage 'sft' is not complete" in result.stderr
    result = run_cli(str(recipe), "-o", str(tmp_path / "r"), "--from", "nope")
    assert result.exit_code == 2 and "--from nope: no such stage" in result.stderr
    result = run_cli(str(recipe), "--set", "nostage.x=1")
    assert result.exit_code == 2 and "neither 'model' nor a stage" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {name: dpo, kind: dpo, adapter: sft, data: pairs}\n")
    result = run_cli(str(bad))
    assert result.exit_code == 2 and "refers to 'sft', which is not an earlier stage" in result.stderr


def test_selection_score_is_a_weighted_sum_and_names_missing_metrics():
    metrics = {"seen/exact_match": 0.5, "facts/accuracy": 0.25}
    assert selection_score("seen/exact_match", metrics) == 0.5
    assert selection_score({"seen/exact_match": 2.0, "facts/accuracy": 4.0}, metrics) == 2.0
    with pytest.raises(AlignError, match="selection metric unseen/x is not in the eval results"):
        selection_score({"unseen/x": 1.0}, metrics)


def test_a_failing_sweep_candidate_leaves_no_scratch_and_no_output(tiny_model_dir, tmp_path, monkeypatch):
    from align.pipeline import sweep
    from align.pipeline.stages import Pipeline

    recipe = load_pipeline(write_recipe(tmp_path, tiny_model_dir))
    stage = next(s for s in recipe.stages if s.name == "merged")
    run = Pipeline(recipe, tmp_path / "run", "fp", {})

    def merged_then_fail(stage, pipeline, candidate, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_text("half")
        raise AlignError("candidate failed")

    monkeypatch.setattr(sweep, "merge_candidate", merged_then_fail)
    with pytest.raises(AlignError, match="candidate failed"):
        sweep.run_merge_stage(stage, run)
    assert not (tmp_path / "run" / ".merged.sweep").exists() and not (tmp_path / "run" / "merged").exists()


def stage_recipes(recipe_path: Path, rundir: Path) -> dict[str, object]:
    """The SFT/DPO recipe each training stage hands its command (the commands are not run)."""
    from align.pipeline.run import stage_recipe
    from align.pipeline.stages import DPOStage, Pipeline, SFTStage

    from align.core.config import DPORecipe, SFTRecipe

    recipe = load_pipeline(recipe_path)
    pipeline = Pipeline(recipe, rundir, "fp", {})
    found = {}
    for stage in recipe.stages:
        if isinstance(stage, SFTStage):
            found[stage.name] = stage_recipe(SFTRecipe, stage, pipeline, {})
        elif isinstance(stage, DPOStage):
            found[stage.name] = stage_recipe(DPORecipe, stage, pipeline, {"data": {
                **stage.data.model_dump(), "path": pipeline.path(stage.data.path)}})
    return found


def test_a_dpo_stage_sets_what_align_dpo_takes(tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_model_dir)
    path.write_text(path.read_text().replace(
        "    data: pairs\n    ref: adapter\n",
        "    data: {path: pairs, format: explicit, pairs: all, eval_size: 0.25}\n"
        "    max_prompt_length: 24\n    ref: adapter\n"))
    dpo = stage_recipes(path, tmp_path / "run")["dpo"]
    assert dpo.max_prompt_length == 24 and dpo.data.eval_size == 0.25 and dpo.data.pairs == "all"
    assert dpo.data.format == "explicit"
    assert dpo.data.path == str(tmp_path / "run" / "pairs" / "pairs.jsonl")
    assert dpo.output == str(tmp_path / "run" / "dpo") and dpo.overwrite


def test_a_training_stage_has_its_command_s_defaults_and_checks(tiny_model_dir, tmp_path):
    from align.core.config import DPORecipe, SFTRecipe

    found = stage_recipes(write_recipe(tmp_path, tiny_model_dir), tmp_path / "run")
    assert found["sft"].data == SFTRecipe().data.model_copy(update={"limit": 16})
    assert found["dpo"].data.pairs == DPORecipe().data.pairs and found["dpo"].max_prompt_length is None
    path = write_recipe(tmp_path, tiny_model_dir)
    path.write_text(path.read_text().replace("    ref: adapter\n", "    ref: adaptor\n"))
    with pytest.raises(AlignError, match=r"stages\.2\.dpo\.ref"):
        load_pipeline(path)


def test_a_stage_cannot_set_the_output_the_pipeline_owns(tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_model_dir)
    path.write_text(path.read_text().replace("    ref: adapter\n", "    ref: adapter\n    output: elsewhere\n"))
    with pytest.raises(AlignError, match="'output' is set by the pipeline"):
        load_pipeline(path)


def test_a_merge_stage_takes_the_sft_template_before_its_record_is_written(tiny_model_dir, tmp_path):
    from transformers import GenerationConfig

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""model: {{name: "{tiny_model_dir}", dtype: float32, compile: false}}
stages:
  - name: sft
    kind: sft
    data: {{path: "builtin:pig-latin", limit: 8}}
    lora: {{r: 4, dropout: 0.0}}
    train: {{max_steps: 1, per_device_train_batch_size: 4, save_steps: 100}}
  - name: merged
    kind: merge
    method: slerp
    models: [base, sft]
    t: 0.5
""")
    rundir = tmp_path / "run"
    run_pipeline(load_pipeline(recipe), rundir, progress=False)
    merged = rundir / "merged"
    record_path = merged / "merge.json"
    others = [p for p in merged.rglob("*") if p.is_file() and p != record_path]
    assert record_path.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in others)  # the record is written last
    record = json.loads(record_path.read_text())
    assert record["template_source"] == str(rundir / "sft")
    assert record["eos_token_id"] == GenerationConfig.from_pretrained(str(merged)).eos_token_id
