"""The GPU suite (benchmarks/gpu/, issue 23) kept ready between GPU runs: its tiny mode runs every step, flag and path
of the GPU command on a 2-layer model here, and the like-with-like rules are checked on what it recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The whole suite in its tiny mode takes ~4 minutes on CI's 2 cores: the tests that read it run once, in the full leg.
slow = pytest.mark.slow

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu-suite")
    out = tmp / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--tiny", "--out", str(out),
                           "--work", str(tmp / "work"), "--carry", str(tmp / "nothing-carried")],
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"data": json.loads((out / "results.json").read_text()), "summary": (out / "summary.md").read_text(),
            "log": (out / "log.txt").read_text()}


def result(data: dict, step: str, run: str) -> dict:
    found = [r for r in data["results"] if r["step"] == step and r["run"] == run]
    assert found, f"{step}/{run} did not run"
    assert "error" not in found[-1], found[-1]["error"]
    return found[-1]


@slow
def test_every_step_and_configuration_runs(suite):
    from suite import STEPS

    data = suite["data"]
    assert {name: s["status"] for name, s in data["steps"].items()} == {"prepare": "done",
                                                                         **{s.name: "done" for s in STEPS}}
    assert [r for r in data["results"] if "error" in r] == []
    expected = {"sft-1b": {"matmul-peak", "trl-defaults", "align-noliger", "trl-same-noliger", "align-defaults",
                           "trl-same", "align-packed", "trl-same-packed"},
                "qlora-1b": {"align-qlora", "trl-same-qlora"},
                "dpo-1b": {"dpo-auto#1", "dpo-model#1", "dpo-adapter#1", "dpo-auto-default"},
                "estimate": {"qlora-dpo-adapter", "align-defaults"},
                "memory-short": {"align-packed", "align-packed-split4"},
                "sft-3b": {"matmul-peak", "trl-defaults", "align-defaults"}}
    for step, runs in expected.items():
        assert {r["run"] for r in data["results"] if r["step"] == step} == runs, step


@slow
@pytest.mark.parametrize("ours,theirs,step", [("align-defaults", "trl-same", "sft-1b"),
                                              ("align-noliger", "trl-same-noliger", "sft-1b"),
                                              ("align-packed", "trl-same-packed", "sft-1b"),
                                              ("align-qlora", "trl-same-qlora", "qlora-1b")])
def test_trl_same_trains_with_the_settings_align_recorded(suite, ours, theirs, step):
    align, trl = result(suite["data"], step, ours)["settings"], result(suite["data"], step, theirs)["settings"]
    for key in ("gradient_checkpointing", "packing", "liger_kernel"):
        assert bool(trl[key]) == bool(align[key]), key
    assert trl["optim"] == align["optim"]
    assert tuple(trl["batch"]) == tuple(align["micro_batch"] or (result(suite["data"], step, ours)["bench"]["batch"], 1))


@slow
def test_trl_defaults_are_trl_own(suite):
    settings = result(suite["data"], "sft-1b", "trl-defaults")["settings"]
    assert settings["gradient_checkpointing"] and not settings["packing"] and not settings["liger_kernel"]


@slow
def test_dpo_modes_resolve_and_pass_step0(suite):
    data = suite["data"]
    assert result(data, "dpo-1b", "dpo-auto#1")["reference"]["mode"] == "precompute"
    assert result(data, "dpo-1b", "dpo-model#1")["reference"]["mode"] == "model"
    runs = [r for r in data["results"] if r["step"] in ("dpo-1b", "estimate") and "reference" in r]
    assert len(runs) == 5 and all(r["step0_check"] for r in runs)
    assert result(data, "estimate", "qlora-dpo-adapter")["bench"]["quantize"] == "4bit"


@slow
def test_split_layout_keeps_the_effective_batch(suite):
    split = result(suite["data"], "memory-short", "align-packed-split4")
    assert split["trainer_args"]["per_device_train_batch_size"] * 4 == split["bench"]["batch"]
    assert split["trainer_args"]["gradient_accumulation_steps"] == 4


@slow
def test_every_align_run_carries_the_planner_prediction(suite):
    align_runs = [r for r in suite["data"]["results"] if "trainer_args" in r or "reference" in r]
    assert align_runs and all(r["predicted_peak_bytes"] > 0 for r in align_runs)


@slow
def test_summary_has_every_goal_and_says_it_is_no_gpu_figure(suite):
    summary = suite["summary"]
    assert "TINY CPU MODE" in summary
    for heading in ("## 1. SFT", "## 2. QLoRA", "## 3. DPO", "## 4. `align estimate", "## 5. The memory-short",
                    "## 6. SFT defaults on the 3B"):
        assert heading in summary
    assert ">= 3.0x" in summary and "<= 0.8" in summary and "within +-15%" in summary


def test_summary_renders_a_run_cut_short():
    """Whatever results.json holds when a step is killed renders, with the missing figures 'not measured'."""
    from suite_report import render

    data = {"environment": {"device": "NVIDIA H200", "python": "3.12", "versions": {"torch": "2.11"}},
            "tiny": False, "steps": {"sft-1b": {"status": "timed out after 170 s"}},
            "results": [{"step": "sft-1b", "run": "trl-defaults", "steady_tok_s": 1000.0, "end_to_end_tok_s": 900.0,
                         "peak_cuda_bytes": 2**33, "bench": {"batch": 8}, "model_parameters": 10**9,
                         "settings": {"precision": "bfloat16", "gradient_checkpointing": True}},
                        {"step": "sft-1b", "run": "align-defaults", "error": "OutOfMemoryError: CUDA"}]}
    summary = render(data)
    assert "timed out after 170 s" in summary and "| trl-defaults |" in summary
    assert "`align-defaults` failed: OutOfMemoryError" in summary
    assert ">= 3.0x: not measured" in summary and "best MFU: not measured" in summary
