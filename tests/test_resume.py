"""Kill real `align sft` runs with SIGKILL at several points; `--resume` must end with the adapter and metrics of an
uninterrupted run (CPU, equal within 1e-6, data order included). Also SIGTERM's clean stop and its resume command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_sft import toy_data

HERE = Path(__file__).parent
ALIGN = [sys.executable, str(HERE / "park.py")]


def sft_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(data), "-o", str(out), "--dtype", "float32",
            "--max-steps", "8", "--save-steps", "2", "--batch-size", "4", "--lr", "5e-3", "--warmup", "0",
            "--lora-r", "4", "--seed", "3"]


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(ALIGN + args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def start_parked(args: list[str], park_at: str, park_dir: Path) -> subprocess.Popen:
    park_dir.mkdir(exist_ok=True)
    proc = subprocess.Popen(ALIGN + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PARK_AT": park_at, "PARK_DIR": str(park_dir)})
    deadline = time.time() + 240
    while not (park_dir / "parked").exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before parking: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("run never reached the park point")
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    data = toy_data(tmp)
    out = tmp / "ref"
    result = run(sft_args(tiny_model_dir, data, out))
    assert result.returncode == 0, result.stderr[-2000:]
    return data, out


def final_losses(out: Path) -> list[float]:
    record = json.loads((out / "run.json").read_text())
    return [h["loss"] for h in record["log_history"] if "loss" in h]


@pytest.mark.parametrize("park_at, resumed_from", [
    ("step:1", None),                 # before any checkpoint: starts again from scratch
    ("step:5", "checkpoint-4"),       # during a step
    ("save:6", "checkpoint-4"),       # during a checkpoint save: checkpoint-6 is half-written and skipped
])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, uninterrupted, tmp_path, park_at, resumed_from):
    data, reference = uninterrupted
    out = tmp_path / "run"
    args = sft_args(tiny_model_dir, data, out)
    proc = start_parked(args, park_at, tmp_path / "park")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()  # nothing that looks complete
    if park_at.startswith("save"):
        half = tmp_path / "run.partial" / "checkpoint-6"
        assert half.is_dir() and not (half / "trainer_state.json").exists()

    result = run(args + ["--resume"])
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "run.json").read_text())
    if resumed_from is None:
        assert record["resumed_from"] is None
    else:
        assert record["resumed_from"].endswith(resumed_from)
    want, got = load_file(str(reference / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    # the losses logged after the resume point are the uninterrupted run's
    resumed_losses = final_losses(out)
    assert resumed_losses == pytest.approx(final_losses(reference)[-len(resumed_losses):], abs=1e-6)


def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(tiny_model_dir, tmp_path):
    data = toy_data(tmp_path)
    out = tmp_path / "run"
    args = sft_args(tiny_model_dir, data, out)
    args[args.index("--max-steps") + 1] = "5000"
    args[args.index("--save-steps") + 1] = "10000"
    proc = subprocess.Popen(ALIGN + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "run.partial").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(8)  # the partial dir exists before the model loads: give it time to be training
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: SIGTERM at step ") and last.endswith("--resume"), last
    step = int(last.split("at step ")[1].split(":")[0])
    assert 0 < step < 5000
    assert (tmp_path / "run.partial" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not out.exists()
    command = last.split("resume with: ")[1].split()
    assert command[0] == "align" and command[1:] == args + ["--resume"]
