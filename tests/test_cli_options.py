"""Each option is defined once, in its recipe field: the flags of `align sft` / `align dpo`, their help and shown
defaults, `align estimate`'s defaults and the trainer's defaults all come from the recipe models."""

from __future__ import annotations

import inspect
import re

import click
import pytest
import torch
from click.testing import CliRunner

from align.cli import main
from align.core.config import DPORecipe, Flag, SFTRecipe, TrainRecipe, build_recipe
from align.core.options import flagged_fields, recipe_flags, recipe_options
from align.core.reference import REFERENCE_MODES
from align.estimate_cli import estimate_command


def help_text(command: str) -> str:
    result = CliRunner().invoke(main, [command, "-h"], terminal_width=1000)
    assert result.exit_code == 0, result.output
    return result.output


def shows(line: str, value, flag: Flag) -> bool:
    """Whether an option's help line shows `value` as its default: the `[default: ...]` text read back (numbers by
    value, lists item by item, None as what the flag says it means), not formatted again here."""
    shown = re.search(r"\[default: (.*?)\]", line)
    if shown is None:
        return False
    text = shown.group(1)
    if flag.note:
        if not text.endswith(f" ({flag.note})"):
            return False
        text = text[: -len(f" ({flag.note})")]
    if value is None:
        return text == (flag.unset or "none")
    if isinstance(value, bool):
        return text == ("on" if value else "off")
    if isinstance(value, list):
        return text.split(",") == [str(v) for v in value]
    if isinstance(value, (int, float)):
        return float(text) == value
    return text == str(value)


def option_lines(help_output: str) -> dict[str, str]:
    """First flag name -> its help entry (an entry whose names are long continues on the next lines)."""
    lines: dict[str, str] = {}
    current = None
    for line in help_output.splitlines():
        match = re.match(r"  (?:-\w, )?(--[\w-]+)", line)
        if match:
            current = match.group(1)
            lines[current] = line
        elif current and line.startswith("   "):
            lines[current] += " " + line.strip()
    return lines


@pytest.mark.parametrize("command, recipe", [("sft", SFTRecipe), ("dpo", DPORecipe)])
def test_help_shows_each_recipe_default_read_from_the_recipe_model(command, recipe):
    lines = option_lines(help_text(command))
    fields = list(flagged_fields(recipe))
    assert len(fields) >= 30  # every section is walked (model, data, lora, train, top level)
    for flagged in fields:
        default = flagged.field.get_default(call_default_factory=True)
        long_name = next(n for n in flagged.flag.names if n.startswith("--"))
        assert long_name in lines, f"{flagged.key}: {long_name} missing from `align {command} -h`"
        assert shows(lines[long_name], default, flagged.flag), (flagged.key, default, lines[long_name])


def test_dpo_help_tells_dpo_defaults_not_sft_ones():
    dpo, sft = option_lines(help_text("dpo")), option_lines(help_text("sft"))
    assert "[default: builtin:pig-latin-prefs]" in dpo["--data"]
    assert "[default: 5e-05]" in dpo["--lr"] and "[default: 0.0002]" in sft["--lr"]
    # DPOConfig.disable_dropout zeroes LoRA dropout: DPO shows what it runs with
    assert "[default: 0.0]" in dpo["--lora-dropout"] and "[default: 0.05]" in sft["--lora-dropout"]
    assert "--loss-on" in sft and "--loss-on" not in dpo  # DPO's loss is on the completions
    assert "--beta" in dpo and "--beta" not in sft


def test_defaults_print_without_parentheses():
    for command in ("sft", "dpo"):
        text = help_text(command)
        assert "[default: smollm2-135m]" in text
        assert "[default: (" not in text


def test_every_earlier_flag_and_alias_is_still_there():
    sft = help_text("sft")
    for flag in ("-m", "--model", "--dtype", "--attn", "--quantize", "--gradient-checkpointing", "--compile", "-d",
                 "--data", "-o", "--output", "--format", "--split", "--limit", "--eval-data", "--eval-size",
                 "--skip-invalid", "--max-steps", "--epochs", "--lr", "--scheduler", "--warmup", "--batch-size",
                 "--grad-accum", "--max-length", "--seed", "--optim", "--lora-r", "--lora-alpha", "--lora-dropout",
                 "--target-modules", "--rslora", "--dora", "--lora-init", "--packing", "--save-steps", "--resume",
                 "--num-processes", "--overwrite", "--dry-run", "--set", "--debug", "--loss-on", "--neftune",
                 "--padding-free"):
        assert re.search(rf"(^|[\s,/]){re.escape(flag)}[\s,/\[]", sft, re.M), flag
    dpo = help_text("dpo")
    for flag in ("-a", "--adapter", "--ref", "--beta", "--loss-type", "--label-smoothing", "--max-prompt-length",
                 "--max-completion-length", "--pairs", "--score-margin"):
        assert re.search(rf"(^|[\s,/]){re.escape(flag)}[\s,/\[]", dpo, re.M), flag


def parse_flags(recipe: type[TrainRecipe], args: list[str]) -> dict:
    """The recipe keys a command generated from `recipe` sets for `args`."""
    seen = {}

    @click.command()
    @recipe_options(recipe)
    @click.pass_context
    def probe(ctx: click.Context, **_: object) -> None:
        seen.update(recipe_flags(ctx))

    result = CliRunner().invoke(probe, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen


def test_flags_set_their_recipe_keys_and_leave_the_rest_to_yaml(tmp_path):
    flags = parse_flags(DPORecipe, ["--lr", "0.5", "--batch-size", "2", "-d", "p.jsonl", "--target-modules",
                                    "q_proj,v_proj", "--loss-type", "sigmoid,sft", "--save-steps", "50",
                                    "--warmup", "0.1", "--resume", "-a", "sft"])
    assert {k: v for k, v in flags.items() if v is not None} == {
        "train.learning_rate": 0.5, "train.per_device_train_batch_size": 2, "data.path": "p.jsonl",
        "lora.target_modules": ["q_proj", "v_proj"], "train.loss_type": ["sigmoid", "sft"],
        "train.save_steps": 50, "train.warmup_steps": 0.1, "resume": True, "adapter": "sft"}
    assert isinstance(flags["train.save_steps"], int)  # a step count stays an integer
    assert parse_flags(SFTRecipe, ["--target-modules", "all-linear"])["lora.target_modules"] == "all-linear"
    assert parse_flags(SFTRecipe, ["--no-packing"])["train.packing"] is False

    path = tmp_path / "r.yaml"
    path.write_text("train: {learning_rate: 0.25, per_device_train_batch_size: 3}\n")
    built = build_recipe(SFTRecipe, path, parse_flags(SFTRecipe, ["--batch-size", "5"]), ["train.seed=4"])
    assert built.train == {"learning_rate": 0.25, "per_device_train_batch_size": 5, "seed": 4}


@pytest.mark.parametrize("args, named", [
    (["--lr", "-1"], r"train\.learning_rate: .*greater than 0 \(got -1\.0, flag --lr\)"),
    (["--batch-size", "0"], r"train\.per_device_train_batch_size: .*\(got 0, flag --batch-size\)"),
    (["--max-length", "0"], r"train\.max_length: .*\(got 0, flag --max-length\)"),
    (["--warmup", "2.5"], r"train\.warmup_steps: .*below 1, or a whole number of steps"),
    (["--lora-dropout", "1"], r"lora\.dropout: .*less than 1 \(got 1\.0, flag --lora-dropout\)"),
    (["--set", "train.learning_rate=fast"], r"train\.learning_rate: .*valid number.* \(got 'fast', flag --lr\)"),
])
def test_out_of_range_values_are_refused_before_the_model_loads(args, named, tmp_path):
    result = CliRunner().invoke(main, ["sft", "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "o"),
                                       *args])
    assert result.exit_code == 2, result.output
    assert re.search(named, result.output), result.output
    assert "model not found" not in result.output and not (tmp_path / "o").exists()


def test_dpo_beta_must_be_positive(tmp_path):
    result = CliRunner().invoke(main, ["dpo", "-o", str(tmp_path / "o"), "--beta", "0"])
    assert result.exit_code == 2 and "train.beta: Input should be greater than 0 (got 0.0, flag --beta)" in result.output


def test_estimate_defaults_are_the_training_commands_defaults():
    params = {p.name: p for p in estimate_command.params}
    settings = SFTRecipe.train_settings.model_fields
    assert params["batch_size"].default == settings["per_device_train_batch_size"].default == 8
    assert params["max_length"].default == settings["max_length"].default
    assert params["grad_accum"].default == settings["gradient_accumulation_steps"].default
    assert params["optim"].default == settings["optim"].default
    assert params["lora_r"].default == SFTRecipe.model_fields["lora"].default.r
    assert params["dtype"].default == SFTRecipe.model_fields["model"].default.dtype
    assert tuple(params["ref"].type.choices) == REFERENCE_MODES


def test_trainer_defaults_come_from_the_recipe_and_differ_by_stage(tmp_path):
    from align.train.training import plan_machine, trainer_arguments

    for recipe, lr in ((SFTRecipe(), 2e-4), (DPORecipe(), 5e-5)):
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"gradient_checkpointing": False})})
        args = trainer_arguments(recipe, plan_machine(recipe.model, recipe.train, recipe, "sft"), tmp_path)
        settings = recipe.train_settings.model_fields
        assert args["learning_rate"] == lr == settings["learning_rate"].default
        assert args["per_device_train_batch_size"] == settings["per_device_train_batch_size"].default
        assert args["seed"] == settings["seed"].default and args["save_steps"] == settings["save_steps"].default


def test_attach_lora_takes_the_run_seed_with_no_default_to_fall_back_on():
    from align.train.training import attach_lora

    seed = inspect.signature(attach_lora).parameters["seed"]
    assert seed.default is inspect.Parameter.empty
    assert "resolved" not in inspect.signature(attach_lora).parameters


def test_dpo_policy_loading_leaves_the_global_rng_at_the_users_seed(tiny_model_dir, char_tokenizer, tmp_path):
    """With an SFT adapter, load_policy re-seeds (LoRA init draws from the global RNG); it must re-seed with the
    run's seed, not 0, or the data order and dropout of the run are those of seed 0."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from align.core.config import LoraSpec
    from align.core.models import resolve_model
    from align.train.preference import load_policy
    from align.train.training import lora_config

    adapter = tmp_path / "sft"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(LoraSpec(r=2))).save_pretrained(adapter)
    char_tokenizer.save_pretrained(adapter)
    recipe = DPORecipe.model_validate({"model": {"name": str(tiny_model_dir), "dtype": "float32"},
                                       "adapter": str(adapter), "train": {"seed": 7}})
    load_policy(resolve_model(str(adapter)), recipe, char_tokenizer, False, 7)
    after_load = torch.rand(4)
    set_seed(7)
    assert torch.equal(after_load, torch.rand(4))


def test_lora_init_error_names_the_flag_as_it_is_spelled(tmp_path):
    result = CliRunner().invoke(main, ["sft", "-o", str(tmp_path / "o"), "--lora-init", "loftq", "--quantize", "4bit"])
    assert result.exit_code == 2 and "--lora-init loftq" in result.output, result.output


def test_merge_takes_h_as_align_does():
    from merge.cli import main as merge_main

    for command, args in ((main, ["-h"]), (merge_main, ["-h"]), (merge_main, ["slerp", "-h"])):
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 0 and "Usage:" in result.output, result.output


def test_dry_run_plans_the_reference_the_run_uses(tiny_model_dir, tmp_path):
    """`--ref model:PATH` is parsed once (align.core.reference) and planned as the run runs it: a second weight copy;
    the raw string used to reach the planner and leave that copy out of `--dry-run`."""
    from align.core import reference

    def plan(ref: str) -> str:
        result = CliRunner().invoke(main, ["dpo", "--model", str(tiny_model_dir), "--ref", ref, "--dry-run",
                                           "-o", str(tmp_path / "o")], terminal_width=200)
        assert result.exit_code == 0, result.output
        return result.output

    assert "reference model" in plan(f"model:{tiny_model_dir}") and "reference model" not in plan("base")
    with pytest.raises(ValueError, match="model:PATH"):
        reference.parse_reference("modle:x")
    assert reference.parse_reference("model:/m") == ("model", "/m")