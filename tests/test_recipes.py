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
