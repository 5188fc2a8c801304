"""Every recipe in recipes/ opens with a comment giving its command and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ACCELERATE = sorted((RECIPES / "accelerate").glob("*.yaml"))


def first_comment(path: Path) -> str:
    line = path.read_text().splitlines()[0]
    assert line.startswith("# "), f"{path.name} must open with a comment giving its command"
    return line[2:]


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_load_and_name_their_command(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    command = " ".join(line.removeprefix("# ") for line in path.read_text().splitlines()[:2])
    assert f"--config_file recipes/accelerate/{path.name}" in command
    assert "-m align.cli" in command
    assert config.num_processes >= 1


def test_all_accelerate_setups_are_there():
    names = {p.stem for p in ACCELERATE}
    assert {"single_gpu", "multi_gpu_ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multi_node"} <= names


def test_zero3_config_says_how_to_checkpoint_with_peft():
    text = (RECIPES / "accelerate" / "deepspeed_zero3.yaml").read_text()
    assert "use_reentrant=true" in first_comment(RECIPES / "accelerate" / "deepspeed_zero3.yaml")
    assert "zero3_init_flag: false" in text


PIPELINES = [RECIPES / f"{name}.yaml" for name in ("pig-latin", "two-skills", "depth-upscale", "zephyr-7b-qlora",
                                                    "methods", "pig-latin-grpo")]
TRAINING = {"zephyr-7b-qlora-sft.yaml": "sft", "zephyr-7b-qlora-dpo.yaml": "dpo"}
SUITES = sorted((RECIPES / "suites").glob("*.yaml"))


def test_every_recipe_file_is_covered_here():
    covered = {p.name for p in PIPELINES} | set(TRAINING)
    assert {p.name for p in RECIPES.glob("*.yaml")} == covered


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_recipes_validate_and_name_their_command(path):
    from align.pipeline.run import load_pipeline

    assert first_comment(path).startswith(f"align run recipes/{path.name}")
    recipe = load_pipeline(path)
    assert recipe.stages


def test_the_bake_off_runs_the_grpo_demo_stage_as_it_is():
    """methods.yaml's grpo row is the demo's GRPO stage: the two recipes carry the same stage, kept in step."""
    from align.core.config import load_yaml

    def grpo(name: str) -> dict:
        return next(s for s in load_yaml(RECIPES / name)["stages"] if s["name"] == "grpo")

    assert grpo("methods.yaml") == grpo("pig-latin-grpo.yaml")


@pytest.mark.parametrize("name, stage", sorted(TRAINING.items()))
def test_training_recipes_validate_against_trl(name, stage):
    from trl import DPOConfig, SFTConfig

    from align.core.config import DPORecipe, SFTRecipe, build_recipe

    path = RECIPES / name
    assert f"-m align.cli {stage} recipes/{name}" in first_comment(path)
    cls, config = (SFTRecipe, SFTConfig) if stage == "sft" else (DPORecipe, DPOConfig)
    recipe = build_recipe(cls, path, {}, trl_config=config)
    assert recipe.model.quantize == "4bit"


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_recipe_suites_load(path):
    from eval.suites import load_suite

    assert first_comment(path).startswith("align eval --suite recipes/suites/")
    assert load_suite(path).tasks


# Shortened enough to prove the wiring (every stage runs and hands its output on), not to learn anything.
SHORT = {
    "pig-latin": ["sft.train.max_steps=2", "sft.data.limit=16", "pairs.limit=3", "pairs.samples=1",
                  "pairs.max_new_tokens=12", "pairs.temperature=2.0", "dpo.train.max_steps=2", "merged.t=[0.5, 1.0]",
                  "merged.select.limit=1", "eval.limit=1", "eval.suites=[pig-latin, prefs]"],
    "two-skills": ["pig.train.max_steps=2", "pig.data.limit=16", "reverse.train.max_steps=2", "reverse.data.limit=16",
                   "moe-healed.train.max_steps=2", "moe-healed.data.limit=16", "eval.limit=1"],
    "depth-upscale": ["healed.train.max_steps=2", "healed.data.limit=16", "eval.limit=1"],
    # a reward model 2 steps in scores two samples apart by more than 1e-6, not necessarily by 0.1
    "methods": ["sft.train.max_steps=2", "sft.data.limit=16", "pairs.limit=3", "pairs.samples=1",
                "pairs.max_new_tokens=12", "pairs.temperature=2.0",
                *(f"{m}.train.max_steps=2" for m in ("dpo", "ipo", "kto", "orpo", "simpo", "rm", "dpo-rm")),
                "grpo.train.max_steps=2", "grpo.data.limit=4", "grpo.train.per_device_train_batch_size=4",
                "grpo.train.num_generations=2", "grpo.train.max_completion_length=8", "rm.data.limit=16",
                "pairs-rm.limit=3", "pairs-rm.max_new_tokens=12", "pairs-rm.temperature=2.0",
                "pairs-rm.min_margin=1e-6", "eval.limit=1", "eval.models=[sft, grpo, dpo-rm]"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHORT))
def test_small_recipes_run_end_to_end_in_short_form(name, tmp_path):
    from click.testing import CliRunner

    from align.cli import main

    sets = [arg for value in SHORT[name] for arg in ("--set", value)]
    result = CliRunner().invoke(main, ["run", str(RECIPES / f"{name}.yaml"), "-o", str(tmp_path / name), *sets])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (tmp_path / name / "report.md").is_file()
    assert (tmp_path / name / "eval" / "report.json").is_file()
    if name == "methods":
        check_methods_table(tmp_path / name)


def check_methods_table(rundir: Path) -> None:
    """benchmarks/methods_table.py on the run: a row per evaluated model, GRPO's and the RM-judged DPO's included,
    and the reward model and both pairs stages listed under the table."""
    from conftest import benchmark_script

    text = benchmark_script("methods_table").table(rundir)
    main, words = text.split("Words by kind")  # two tables: the methods', then each model's words by kind
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in main.splitlines() if line.startswith("| ")}
    assert {line.split(" | ")[0].removeprefix("| ") for line in words.splitlines()[4:]} == {"sft", "grpo", "dpo-rm"}
    assert {"sft", "grpo", "dpo-rm"} <= set(rows)  # the models the short form evaluates
    assert "grpo (dapo, reward pig-latin), ref adapter" in rows["grpo"] and rows["grpo"].endswith("| 1 |")
    assert "pairs judged by rm:rm" in rows["dpo-rm"]
    assert "`rm` (reward model, not a policy): held-out pair accuracy" in text
    assert "`pairs-rm` (pairs, judge rm:rm)" in text and "`pairs` (pairs, judge rule)" in text
