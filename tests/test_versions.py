"""Library versions and the GPU-side failures that must keep the one-line contract: a library too old, a 4-bit
request bitsandbytes cannot serve on this device, a CUDA out-of-memory during training (issue 12)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner
from conftest import write_jsonl

import align.core.versions as versions
from align.core.errors import AlignError
from align.train.training import checkpointing_argument_names


# ---- versions ----------------------------------------------------------------------------------------------------


def test_a_too_old_library_is_one_line_naming_package_installed_and_required(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", lambda p: "5.16.0" if p == "transformers" else "99.0")
    with pytest.raises(AlignError, match=r"^transformers 5.16.0 is installed; alignmerge needs transformers>=5.17 "):
        versions.check_library_versions({"torch": ">=2.11", "transformers": ">=5.17"})


def test_versions_at_their_bounds_and_local_builds_pass(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", {"torch": "2.11.0+cu130", "trl": "1.16.0"}.get)
    versions.check_library_versions({"torch": ">=2.11", "trl": ">=1.16"})


def test_the_installed_environment_passes_its_own_check():
    versions.check_library_versions()


def test_cli_refuses_a_too_old_library_with_exit_2(monkeypatch, tiny_model_dir):
    from align.cli import main

    monkeypatch.setattr(versions, "required_versions", lambda: {"peft": ">=0.21"})
    monkeypatch.setattr(versions, "installed_version", lambda p: "0.17.1")
    result = CliRunner().invoke(main, ["estimate", "--model", str(tiny_model_dir)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: peft 0.17.1 is installed; alignmerge needs peft>=0.21 (pip install -U 'peft>=0.21')"]


def test_checkpointing_argument_follows_the_installed_training_arguments(monkeypatch):
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    flag, kwargs = checkpointing_argument_names()
    assert flag in names and kwargs in names
    # transformers 5.17's TrainingArguments: only the old name
    old = dataclasses.make_dataclass("OldTrainingArguments", [("gradient_checkpointing", bool, False),
                                                              ("gradient_checkpointing_kwargs", dict, None)])
    monkeypatch.setattr("transformers.TrainingArguments", old)
    assert checkpointing_argument_names() == ("gradient_checkpointing", "gradient_checkpointing_kwargs")


def test_trainer_config_accepts_the_flag_under_the_installed_name(tmp_path):
    from trl import SFTConfig

    flag, kwargs = checkpointing_argument_names()
    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, **{flag: True, kwargs: {"use_reentrant": False}})
    assert getattr(config, flag) is True


# ---- 4-bit without a backend -------------------------------------------------------------------------------------


def test_four_bit_without_a_backend_for_the_device_is_one_line(monkeypatch, tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_functional

    from align.cli import main

    def no_backend(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device\nmore detail")

    monkeypatch.setattr(bnb_functional, "quantize_4bit", no_backend)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    result = CliRunner().invoke(main, ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                                       str(tmp_path / "out"), "--quantize", "4bit", "--max-steps", "1"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --quantize 4bit: bitsandbytes ")
    assert "no working backend for cpu (no kernel image is available" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---- CUDA out of memory ------------------------------------------------------------------------------------------


def test_out_of_memory_during_training_is_one_line_with_the_planners_fix(monkeypatch, tiny_model_dir, tmp_path):
    from trl import SFTTrainer

    from align.cli import main

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SFTTrainer, "train", out_of_memory)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    result = CliRunner().invoke(main, ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                                       str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "4",
                                       "--dtype", "float32", "--no-gradient-checkpointing"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: CUDA out of memory at step 0 (batch 4, no gradient checkpointing); "
                               "try --gradient-checkpointing")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
