"""Two CPU processes (gloo DDP through `accelerate launch`) against one process with the same global batch.

Tolerance: DDP averages gradients across ranks with an all-reduce whose float summation order differs from one
process's batch reduction, so losses and weights agree to float32 rounding, not bit for bit; we allow 1e-5
(observed: ~1e-7 on the adapter after 4 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_sft import toy_data

ALIGN = str(Path(sys.executable).with_name("align"))


def sft(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [ALIGN, "sft", "--model", str(model), "--data", str(data), "-o", str(out), "--dtype", "float32",
            "--max-steps", "4", "--lr", "5e-3", "--warmup", "0", "--lora-r", "4", "--lora-dropout", "0",
            "--save-steps", "100", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MASTER_PORT": str(29600 + os.getpid() % 300)})


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "run.json").read_text())["log_history"] if "loss" in h]


def test_two_process_ddp_sft_matches_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    data = toy_data(tmp_path)
    one = sft(tiny_model_dir, data, tmp_path / "one", "--batch-size", "8")
    assert one.returncode == 0, one.stderr[-2000:]
    two = sft(tiny_model_dir, data, tmp_path / "two", "--batch-size", "4", "--num-processes", "2")
    assert two.returncode == 0, two.stderr[-2000:]

    assert two.stdout.count("adapter written to") == 1  # only the main process speaks
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["metrics"]["num_input_tokens_seen"] == json.loads(
        (tmp_path / "one" / "run.json").read_text())["metrics"]["num_input_tokens_seen"]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    assert not (tmp_path / "two.partial").exists()


def test_two_process_ddp_dpo_with_the_adapter_reference_matches_one_process(tiny_model_dir, tmp_path):
    data = toy_data(tmp_path)
    sft_run = sft(tiny_model_dir, data, tmp_path / "sft", "--batch-size", "8")
    assert sft_run.returncode == 0, sft_run.stderr[-2000:]

    def dpo(out: Path, *extra: str) -> subprocess.CompletedProcess:
        args = [ALIGN, "dpo", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "sft"),
                "--data", "builtin:pig-latin-prefs", "--limit", "16", "-o", str(out), "--dtype", "float32",
                "--max-steps", "3", "--lr", "1e-3", "--warmup", "0", "--ref", "adapter", "--save-steps", "100",
                "--set", "lora.dropout=0", *extra]
        return subprocess.run(args, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "MASTER_PORT": str(29600 + (os.getpid() + 7) % 300)})

    one = dpo(tmp_path / "one", "--batch-size", "4")
    assert one.returncode == 0, one.stderr[-2000:]
    two = dpo(tmp_path / "two", "--batch-size", "2", "--num-processes", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("adapter written to") == 1
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    for run in ("one", "two"):
        record = json.loads((tmp_path / run / "run.json").read_text())
        assert record["reference"]["mode"] == "adapter" and record["step0_check"]["passed"] is True
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
