"""`align dpo` on tiny models: each reference mode, the step-0 reference check both ways, loss types, length
limits, artifacts and errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import reference_adapter_dropped, write_jsonl
from safetensors.torch import load_file

import align.train.dpo  # noqa: F401
from align.cli import main
from align.core.config import DPORecipe, SFTRecipe
from align.train.dpo import run_dpo, step0_loss
from align.train.preference import LengthLimitedCollator
from align.core.errors import AlignError
from align.train.sft import run_sft

PAIRS = [("flip ab", "ba", "ab"), ("flip cd", "dc", "cd"), ("flip ef", "fe", "ef"), ("flip gh", "hg", "gh")]


def prefs(tmp_path: Path, repeat: int = 4) -> Path:
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS] * repeat
    return write_jsonl(tmp_path / "prefs.jsonl", rows)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A trained SFT adapter with clearly non-zero deltas (high learning rate), so that the base and the SFT model
    give different log-probs."""
    out = tmp_path_factory.mktemp("sft") / "sft"
    return run_sft(SFTRecipe.model_validate({
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"path": "builtin:pig-latin", "limit": 48},
        "lora": {"r": 4, "dropout": 0.0},
        "train": {"max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 0},
        "output": str(out),
    }), progress=False)


def recipe(model_dir: Path, data: Path, out: Path, adapter: Path | None = None, ref: str | None = None,
           dtype: str = "float32", **train) -> DPORecipe:
    settings = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 0,
                "save_steps": 100, **train}
    return DPORecipe.model_validate({
        "model": {"name": str(model_dir), "dtype": dtype},
        "data": {"path": str(data)},
        "lora": {"r": 4, "dropout": 0.0},
        "train": settings,
        "adapter": str(adapter) if adapter else None,
        "ref": ref,
        "output": str(out),
    })


def record_of(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("ref", ["adapter", "precompute", "model"])
def test_reference_modes_with_an_sft_adapter(ref, tiny_model_dir, sft_adapter, tmp_path):
    ref_arg = f"model:{sft_adapter}" if ref == "model" else ref
    out = run_dpo(recipe(tiny_model_dir, prefs(tmp_path), tmp_path / "out", sft_adapter, ref_arg), progress=False)
    record = record_of(out)

    assert record["reference"] == {"mode": ref, "adapter": str(sft_adapter.resolve()),
                                   "model": str(sft_adapter) if ref == "model" else None,
                                   "requested": ref, "reason": "requested"}
    assert record["beta"] == 0.1 and record["loss_type"] == ["sigmoid"]
    check = record["step0_check"]
    assert check["passed"] and check["max_deviation"] <= check["tolerance"]
    assert check["loss"] == pytest.approx(math.log(2), abs=1e-6) and check["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert record["trainer_args"].get("precompute_ref_log_probs", False) == (ref == "precompute")

    steps = [h for h in record["log_history"] if "loss" in h]
    assert len(steps) == 3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in h for h in steps)
    assert steps[-1]["rewards/margins"] > 0  # the policy moved away from its reference, toward the chosen answers

    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run.json", "README.md",
            "loss.png", "rewards.png"} <= files
    trained, started = load_file(str(out / "adapter_model.safetensors")), load_file(str(sft_adapter / "adapter_model.safetensors"))
    assert trained.keys() == started.keys()  # the policy adapter alone, no "ref" copy
    assert any(not torch.equal(trained[k], started[k]) for k in trained)


def test_fresh_lora_against_the_base_is_the_default_without_adapter(tiny_model_dir, tmp_path):
    out = run_dpo(recipe(tiny_model_dir, prefs(tmp_path), tmp_path / "out"), progress=False)
    record = record_of(out)
    reference = record["reference"]
    assert (reference["mode"], reference["adapter"], reference["model"], reference["requested"]) == \
        ("base", None, None, "auto")  # 3 steps x 4 read 12 of the 16 pairs: auto keeps the base
    assert "reads 12 of 16 pairs" in reference["reason"]
    assert record["step0_check"]["passed"]

    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert list(model.peft_config) == ["default"]


def test_step0_check_fails_when_the_reference_is_the_base_instead_of_the_sft_adapter(
        tiny_model_dir, sft_adapter, tmp_path, monkeypatch):
    """The classic silent failure: the policy starts from the SFT adapter while the reference forward runs with
    adapters disabled (the base). Built here by dropping TRL's frozen "ref" adapter, which makes TRL fall back to
    disabling adapters for its reference forward."""
    reference_adapter_dropped(monkeypatch)
    with pytest.raises(AlignError, match=r"step-0 reference check failed for --ref adapter.*not the model the policy"):
        run_dpo(recipe(tiny_model_dir, prefs(tmp_path), tmp_path / "out", sft_adapter), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_reference_check_reports_its_figures_when_right(tiny_model_dir, sft_adapter, tmp_path):
    out = run_dpo(recipe(tiny_model_dir, prefs(tmp_path), tmp_path / "out", sft_adapter, max_steps=1), progress=False)
    check = record_of(out)["step0_check"]
    assert check["pairs"] == 4 and check["expected_loss"] == pytest.approx(math.log(2))
    assert abs(check["rewards/chosen"]) <= check["tolerance"] and abs(check["rewards/rejected"]) <= check["tolerance"]


def test_a_loss_type_passes_through_and_starts_at_its_step0_value(tiny_model_dir, sft_adapter, tmp_path):
    spec = recipe(tiny_model_dir, prefs(tmp_path), tmp_path / "out", sft_adapter, max_steps=1, loss_type=["ipo"],
                  beta=0.2)
    record = record_of(run_dpo(spec, progress=False))
    assert record["loss_type"] == ["ipo"] and record["beta"] == 0.2
    assert record["step0_check"]["passed"] and record["step0_check"]["expected_loss"] is not None


def test_every_installed_loss_type_starts_at_its_step0_value(tiny_model_dir, sft_adapter, tmp_path, monkeypatch):
    """For every loss type the installed DPOConfig lists, the step-0 check of a right reference passes: the loss TRL
    computes with the policy equal to its reference is STEP0_LOSS's value for it (TRL's formulas are the oracle), and
    only `sft` (the data's NLL) goes without one."""
    import align.train.dpo as dpo
    from trl import DPOConfig

    from align.core.trl_fields import field_choices

    installed = field_choices(DPOConfig, "loss_type")
    checked: dict[str, dict] = {}
    real = dpo.check_reference_at_step0

    def every_loss_type(trainer, mode, *args):
        saved = trainer.loss_types, trainer.loss_weights, trainer.label_smoothing
        for loss_type in installed:
            trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
            trainer.label_smoothing = 1e-3 if loss_type == "exo_pair" else 0.0  # EXO needs its epsilon
            checked[loss_type] = real(trainer, mode, *args)
        trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = saved
        return real(trainer, mode, *args)

    monkeypatch.setattr(dpo, "check_reference_at_step0", every_loss_type)
    run_dpo(recipe(tiny_model_dir, prefs(tmp_path), tmp_path / "out", sft_adapter, max_steps=1, beta=0.2),
            progress=False)
    assert set(checked) == set(installed) and all(c["passed"] for c in checked.values())
    assert [t for t, c in checked.items() if c["expected_loss"] is None] == ["sft"]
    assert len({round(c["expected_loss"], 6) for c in checked.values() if c["expected_loss"]}) > 4  # not one value


def test_weighted_and_nll_losses_have_no_step0_constant():
    assert step0_loss(["sigmoid"], None, 0.1, weighted=True) is None
    assert step0_loss(["sigmoid", "sft"], [1.0, 1.0], 0.1) is None


def test_length_limits_keep_the_prompt_end_and_the_completion_start():
    seen = []
    collator = LengthLimitedCollator(lambda examples: seen.extend(examples) or {}, 2, 3)
    collator([{"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7, 8, 9], "rejected_ids": [10], "ref_chosen_logps": -1.0}])
    assert seen == [{"prompt_ids": [3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [10], "ref_chosen_logps": -1.0}]


def test_length_limits_reach_the_batches(tiny_model_dir, tmp_path):
    spec = recipe(tiny_model_dir, prefs(tmp_path), tmp_path / "out", max_steps=1)
    spec.max_prompt_length, spec.max_completion_length = 4, 1
    record = record_of(run_dpo(spec, progress=False))
    # 4 pairs x (4 prompt + 1 completion tokens) x (chosen + rejected)
    assert record["log_history"][0]["num_tokens"] == 4 * 5 * 2


def test_held_out_pairs_are_evaluated(tiny_model_dir, sft_adapter, tmp_path):
    spec = recipe(tiny_model_dir, prefs(tmp_path), tmp_path / "out", sft_adapter, max_steps=2)
    spec.data.eval_size = 0.25
    record = record_of(run_dpo(spec, progress=False))
    assert record["data"]["pairs"] == 12 and record["data"]["eval_pairs"] == 4
    assert (record["metrics"]["eval_rewards/accuracies"] * 4).is_integer()  # a count over the 4 held-out pairs


def test_qlora_four_bit_base_with_the_adapter_as_reference(tiny_model_dir, sft_adapter, tmp_path):
    pytest.importorskip("bitsandbytes")
    spec = recipe(tiny_model_dir, prefs(tmp_path, repeat=1), tmp_path / "q", sft_adapter, "adapter", max_steps=1)
    spec.model.quantize = "4bit"
    record = record_of(run_dpo(spec, progress=False))
    assert record["reference"]["mode"] == "adapter" and record["step0_check"]["passed"]


# ---- errors ------------------------------------------------------------------------------------------------------


def cli(*args: str):
    return CliRunner().invoke(main, ["dpo", *args])


def test_cli_runs_and_records_flags(tiny_model_dir, sft_adapter, tmp_path):
    result = cli("--model", str(tiny_model_dir), "--adapter", str(sft_adapter), "--data", str(prefs(tmp_path, 1)),
                 "--output", str(tmp_path / "out"), "--dtype", "float32", "--max-steps", "1", "--batch-size", "2",
                 "--beta", "0.3", "--loss-type", "sigmoid", "--max-prompt-length", "64", "--max-completion-length", "8")
    assert result.exit_code == 0, result.output
    record = record_of(tmp_path / "out")
    assert record["beta"] == 0.3 and record["reference"]["mode"] == "adapter"
    assert record["recipe"]["max_prompt_length"] == 64 and record["recipe"]["max_completion_length"] == 8


@pytest.mark.parametrize(("args", "message"), [
    (["--ref", "adapter"], "--ref adapter needs the SFT adapter"),
    (["--ref", "modle:x"], "ref: Value error, expected (auto, )?adapter, base, precompute or model:PATH"),
    (["--set", "train.bta=0.1"], "unknown key 'train.bta'.*did you mean 'beta'"),
    (["--loss", "sigmoidd"], "train.loss_type: expected one of sigmoid, hinge"),  # before the model loads
    (["--adapter", "ADAPTER", "--ref", "base"], "--ref base with an SFT adapter"),
    (["--adapter", "MODEL"], "not a PEFT adapter dir"),
    (["--adapter", "ADAPTER", "--model", "OTHER"], "was trained on .*, not on --model"),
    (["--data", "missing.jsonl"], "data file not found: missing.jsonl"),
])
def test_cli_errors_are_one_line_exit_2_and_leave_nothing(args, message, tiny_model_dir, tiny_model_dir_b, sft_adapter,
                                                          tmp_path):
    names = {"ADAPTER": str(sft_adapter), "MODEL": str(tiny_model_dir), "OTHER": str(tiny_model_dir_b)}
    args = [names.get(a, a) for a in args]
    base = ["--model", str(tiny_model_dir), "--data", str(prefs(tmp_path, 1)), "--output", str(tmp_path / "out"),
            "--max-steps", "1"]
    result = cli(*base, *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---- the embedded model ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_dpo_after_sft_prefers_the_right_translations_on_held_out_sentences(tmp_path):
    """SFT on Pig Latin, then DPO against pairs whose rejected answers carry a systematic error (`ay` appended
    without moving consonants). Held-out preference accuracy: the share of `seen`-split pairs (new sentences) where
    the policy's log-ratio over the SFT reference is higher for the chosen answer than for the rejected one."""
    sft = run_sft(SFTRecipe.model_validate({
        "model": {"name": "smollm2-135m", "compile": False},
        "data": {"path": "builtin:pig-latin", "limit": 96},
        "train": {"max_steps": 24, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "save_steps": 1000},
        "output": str(tmp_path / "sft"),
    }), progress=False)
    # Batch 2: a DPO step runs 4 sequences forward and backward through the policy and 4 forward through the
    # reference, the cost that dominates this test on CPU.
    out = run_dpo(DPORecipe.model_validate({
        "model": {"name": "smollm2-135m", "compile": False},
        "adapter": str(sft),
        "ref": "adapter",  # the headline mode, named: the default (auto) would precompute on this fixed data
        "data": {"path": "builtin:pig-latin-prefs", "limit": 100, "eval_path": "builtin:pig-latin-prefs",
                 "eval_split": "seen"},
        "train": {"max_steps": 50, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 8,
                  "learning_rate": 2e-4, "save_steps": 1000, "eval_strategy": "no"},
        "output": str(tmp_path / "dpo"),
    }), progress=False)
    record = record_of(out)
    assert record["reference"]["mode"] == "adapter" and record["step0_check"]["passed"]
    assert record["data"]["eval_pairs"] == 100
    assert record["metrics"]["eval_rewards/accuracies"] >= 0.9
    assert record["metrics"]["eval_rewards/margins"] > 0
