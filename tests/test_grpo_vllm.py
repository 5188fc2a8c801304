"""`align grpo --vllm colocate`: TRL's vLLM sampling, an optional extra. Neither vllm nor a GPU is on this project's
machines, so what is tested is what runs here: the refusals (one line, exit 2, before anything loads, nothing in -o)
and the GRPOConfig the recipe makes. A real vLLM run is untested."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from align.cli import main
from align.core.config import GRPORecipe, build_recipe
from align.core.errors import AlignError
from align.train import grpo
from align.train.grpo import generation_backend, plan_grpo_config


EXTRA = "the vllm extra (pip install -e '.[vllm]' in the alignmerge checkout)"


def grpo_args(out: Path, *extra: str) -> list[str]:
    """A model and data that do not exist: a refusal that names vllm came before anything was read."""
    return ["grpo", "--model", str(out.parent / "no-model"), "--data", str(out.parent / "no-data.jsonl"),
            "--batch-size", "4", "--num-generations", "2", "--report-to", "none", "-o", str(out), *extra]


def refused(result, out: Path) -> str:
    assert result.exit_code == 2, result.output
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def machine(monkeypatch):
    """Set what the check sees: whether vllm is importable and whether torch has a CUDA device."""
    def set_machine(vllm: bool, gpu: bool) -> None:
        monkeypatch.setattr(grpo, "vllm_installed", lambda: vllm)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    return set_machine


@pytest.mark.skipif(grpo.vllm_installed() or torch.cuda.is_available(), reason="checks this machine as it is")
def test_vllm_colocate_on_this_machine_is_refused_naming_both_needs(tmp_path):
    out = tmp_path / "out"
    line = refused(CliRunner().invoke(main, grpo_args(out, "--vllm", "colocate")), out)
    assert f"--vllm colocate needs a CUDA GPU and {EXTRA}, and this machine has neither; drop --vllm" in line


@pytest.mark.parametrize("vllm, gpu, message", [
    (False, True, f"--vllm colocate needs {EXTRA}, which is not installed"),
    (True, False, "--vllm colocate needs a CUDA GPU (TRL runs vLLM on the training GPUs), and torch sees none"),
    (False, False, "--vllm colocate needs a CUDA GPU and the vllm extra"),
])
def test_a_missing_extra_or_gpu_is_one_line_before_anything_loads(tmp_path, machine, vllm, gpu, message):
    machine(vllm=vllm, gpu=gpu)
    out = tmp_path / "out"
    assert message in refused(CliRunner().invoke(main, grpo_args(out, "--vllm", "colocate")), out)


def test_use_vllm_through_train_is_held_to_the_same_check(tmp_path, machine):
    """TRL's own field, given through `train:` (or --set), does not slip past: without the check it failed inside
    GRPOTrainer, after the model had loaded."""
    machine(vllm=False, gpu=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  use_vllm: true\n")
    out = tmp_path / "out"
    line = refused(CliRunner().invoke(main, [*grpo_args(out), str(recipe)]), out)
    assert line.endswith(f"train.use_vllm needs {EXTRA}, which is not installed")
    out2 = tmp_path / "out2"
    line = refused(CliRunner().invoke(main, [*grpo_args(out2), "--set", "train.use_vllm=yes"]), out2)
    assert "train.use_vllm needs the vllm extra" in line


def test_the_vllm_check_passes_where_both_are_there(tmp_path, machine):
    """With vllm and a GPU the run goes on to its next check (here: the model that does not exist)."""
    machine(vllm=True, gpu=True)
    out = tmp_path / "out"
    line = refused(CliRunner().invoke(main, grpo_args(out, "--vllm", "colocate")), out)
    assert "no-model (no such directory)" in line and ".[vllm]" not in line


def test_vllm_and_the_train_fields_it_sets_are_not_both_given():
    with pytest.raises(AlignError, match=r"vllm colocate sets train.use_vllm and train.vllm_mode: drop "
                                         r"train.vllm_mode"):
        build_recipe(GRPORecipe, None, {"vllm": "colocate", "train.vllm_mode": "server"})


def test_an_unknown_vllm_mode_is_refused_by_the_flag(tmp_path):
    result = CliRunner().invoke(main, grpo_args(tmp_path / "out", "--vllm", "server"))
    assert result.exit_code == 2 and "'server' is not 'colocate'" in result.output


def grpo_config_for(flags: dict, tiny_model_dir: Path, tmp_path: Path):
    from trl import GRPOConfig

    recipe = build_recipe(GRPORecipe, None, {"model.name": str(tiny_model_dir), **flags}, trl_config=GRPOConfig)
    return plan_grpo_config(recipe, None, tmp_path / "work")[2]


def test_vllm_colocate_sets_trls_fields_and_leaves_the_rest_at_trls_defaults(tiny_model_dir, tmp_path):
    """Through the run's own path (recipe -> train arguments -> machine plan -> GRPOConfig); TRL's dataclass
    defaults are the oracle for the fields not set."""
    from trl import GRPOConfig

    config = grpo_config_for({"vllm": "colocate", "train.vllm_gpu_memory_utilization": 0.5}, tiny_model_dir, tmp_path)
    assert config.use_vllm is True and config.vllm_mode == "colocate"
    assert config.vllm_gpu_memory_utilization == 0.5
    defaults = {f.name: f.default for f in GRPOConfig.__dataclass_fields__.values()}
    assert config.vllm_enable_sleep_mode == defaults["vllm_enable_sleep_mode"]
    assert generation_backend(config) == "vllm-colocate"

    plain = grpo_config_for({}, tiny_model_dir, tmp_path)
    assert plain.use_vllm is False and plain.use_vllm == defaults["use_vllm"]
    assert generation_backend(plain) == "transformers"
