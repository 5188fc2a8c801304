"""`--ref auto`, the default: precompute where the data allows it, else the SFT adapter (the base without one),
recorded in run.json with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.core.config import DPORecipe
from align.train.dpo import run_dpo
from align.train.reference import ReferencePlan, choose_reference, rows_read

ADAPTER = ReferencePlan("adapter", Path("sft"), requested="auto")


def test_precompute_when_every_pair_is_read():
    chosen = choose_reference(ADAPTER, {"max_steps": 10, "per_device_train_batch_size": 4}, 40)
    assert chosen.mode == "precompute" and chosen.reason.startswith("precompute: a fixed dataset (40 pairs, 40 read")
    assert choose_reference(ADAPTER, {}, 40).mode == "precompute"  # epochs read every pair


def test_the_adapter_when_the_run_reads_fewer_pairs_than_precompute_would_score():
    kept = choose_reference(ADAPTER, {"max_steps": 2, "per_device_train_batch_size": 4}, 40)
    assert kept.mode == "adapter" and "reads 8 of 40 pairs" in kept.reason
    examples = choose_reference(ADAPTER, {"max_steps": 2, "per_device_train_batch_size": 4}, 40, unit="examples")
    assert "reads 8 of 40 examples" in examples.reason  # KTO's rows are labelled examples, not pairs
    base = choose_reference(ReferencePlan("base", None, requested="auto"), {"max_steps": 1}, 40)
    assert base.mode == "base" and base.reason.startswith("base (the frozen base)")


def test_a_moving_reference_is_never_precomputed():
    kept = choose_reference(ADAPTER, {"sync_ref_model": True}, 40)
    assert kept.mode == "adapter" and "sync_ref_model" in kept.reason


def test_an_explicit_reference_is_kept_as_asked():
    asked = ReferencePlan("adapter", Path("sft"), requested="adapter")
    assert choose_reference(asked, {}, 40) is asked


def test_pairs_read_counts_accumulation_and_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rows_read({"max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}, 100) == 48
    assert rows_read({"num_train_epochs": 2}, 100) == 200


def test_auto_is_accepted_and_is_the_default():
    assert DPORecipe.model_validate({"ref": "auto"}).ref == "auto"
    with pytest.raises(Exception, match="expected auto, adapter"):
        DPORecipe.model_validate({"ref": "bogus"})


def test_auto_run_precomputes_and_passes_the_step0_check(tiny_model_dir, tmp_path):
    from conftest import write_jsonl

    rows = [{"prompt": f"flip {a}{b}", "chosen": f"{b}{a}", "rejected": f"{a}{b}"} for a, b in ("ab", "cd", "ef", "gh")]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows * 2)
    out = run_dpo(DPORecipe.model_validate({
        "model": {"name": str(tiny_model_dir), "dtype": "float32"}, "data": {"path": str(data)},
        "lora": {"r": 4, "dropout": 0.0}, "output": str(tmp_path / "out"),
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 0},
    }), progress=False)
    record = json.loads((out / "run.json").read_text())
    assert record["reference"]["requested"] == "auto" and record["reference"]["mode"] == "precompute"
    assert record["reference"]["reason"].startswith("precompute:")
    assert record["trainer_args"]["precompute_ref_log_probs"] is True and record["step0_check"]["passed"]
