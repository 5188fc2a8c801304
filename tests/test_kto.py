"""`align kto`: unpaired labelled data (TRL's and LLaMA-Factory's layouts) and pairs split in two, the SFT adapter as
its reference with DPO's modes and a step-0 check whose value TRL's own loss confirms, balanced class weights, and bad
input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import reference_adapter_dropped, write_jsonl

from align.core.config import KTORecipe
from align.core.errors import AlignError
from align.train.kto import class_weights, run_kto

import test_dpo
from test_dpo import prefs

sft_adapter = test_dpo.sft_adapter  # the module-scoped fixture, shared (an assignment: test arguments may shadow it)


def labelled_rows(path: Path, desirable: int = 6, undesirable: int = 3) -> Path:
    """LLaMA-Factory's KTO layout: `messages` and a boolean `kto_tag`."""
    rows = [{"messages": [{"role": "user", "content": f"say {word}"},
                          {"role": "assistant", "content": f"{word} {'indeed' if good else 'never'}"}],
             "kto_tag": good}
            for i, (word, good) in enumerate(zip(["cat", "dog", "owl", "bee", "ant", "elk", "fox", "yak", "emu"],
                                                 [True] * desirable + [False] * undesirable))]
    return write_jsonl(path, rows)


def recipe(model: Path, data: Path, out: Path, adapter: Path | None = None, ref: str | None = None,
           **train) -> KTORecipe:
    return KTORecipe.model_validate({
        "model": {"name": str(model), "dtype": "float32"}, "data": {"path": str(data)}, "lora": {"r": 4},
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 0,
                  **train},
        "adapter": str(adapter) if adapter else None, "ref": ref, "report_to": "none", "output": str(out)})


def record_of(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_unpaired_data_trains_with_balanced_weights_and_passes_step0(tiny_model_dir, tmp_path):
    """6 desirable, 3 undesirable: the desirable weight is 1/2, so each step-0 batch's loss is 1/2 x its mean weight,
    which TRL's own loss must reproduce for the check to pass."""
    record = record_of(run_kto(recipe(tiny_model_dir, labelled_rows(tmp_path / "kto.jsonl"), tmp_path / "out",
                                      ref="base"), progress=False))
    assert record["data"]["from_pairs"] is False and (record["data"]["desirable"], record["data"]["undesirable"]) == (6, 3)
    assert record["class_weights"] == {"desirable_weight": 0.5, "undesirable_weight": 1.0, "ratio": 1.0,
                                       "reason": "balanced"}
    check = record["step0_check"]
    assert check["passed"] and check["kl"] == 0.0 and 0.25 <= check["expected_loss"] <= 0.5
    assert len([h for h in record["log_history"] if "loss" in h]) == 2


def test_pairs_split_in_two_with_the_sft_adapter_as_reference(tiny_model_dir, sft_adapter, tmp_path):  # noqa: F811 (the fixture)
    record = record_of(run_kto(recipe(tiny_model_dir, prefs(tmp_path, repeat=1), tmp_path / "out", sft_adapter,
                                      ref="adapter"), progress=False))
    assert record["data"]["from_pairs"] is True and record["data"]["desirable"] == record["data"]["undesirable"]
    assert record["reference"]["mode"] == "adapter" and record["step0_check"]["passed"]
    assert record["step0_check"]["expected_loss"] == pytest.approx(0.5)


def test_a_wrong_reference_fails_step0(tiny_model_dir, sft_adapter, tmp_path, monkeypatch):  # noqa: F811 (the fixture)
    reference_adapter_dropped(monkeypatch)
    with pytest.raises(AlignError, match=r"step-0 reference check failed for --ref adapter.*KTO must give"):
        run_kto(recipe(tiny_model_dir, prefs(tmp_path, repeat=1), tmp_path / "out", sft_adapter, ref="adapter"),
                progress=False)
    assert not (tmp_path / "out").exists()


def test_precomputed_reference_passes_step0(tiny_model_dir, tmp_path):
    record = record_of(run_kto(recipe(tiny_model_dir, labelled_rows(tmp_path / "kto.jsonl"), tmp_path / "out",
                                      ref="precompute"), progress=False))
    assert record["reference"]["mode"] == "precompute" and record["step0_check"]["passed"]
    assert record["trainer_args"]["precompute_ref_log_probs"] is True


def test_class_weights_balance_the_counts_unless_set():
    assert class_weights({}, 30, 10)["desirable_weight"] == pytest.approx(1 / 3)
    assert class_weights({}, 10, 40)["undesirable_weight"] == pytest.approx(0.25)
    assert class_weights({"undesirable_weight": 2.0}, 10, 10) == {"desirable_weight": 1.0, "undesirable_weight": 2.0,
                                                                  "ratio": 0.5, "reason": "requested"}


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b", "label": True}] * 4, "all 4 training examples are desirable"),
    ([{"prompt": "a", "completion": "b", "label": "yes"}] * 4, "line 1: field 'label': expected true or false"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "kto_tag": None}] * 2,
     "field 'kto_tag': missing"),
])
def test_bad_labels_are_one_line_and_leave_nothing(tiny_model_dir, tmp_path, rows, message):
    from align.cli import main

    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = CliRunner().invoke(main, ["kto", "--model", str(tiny_model_dir), "--data", str(data), "-o",
                                       str(tmp_path / "out"), "--max-steps", "1"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_an_unknown_loss_is_refused_before_loading(tiny_model_dir, tmp_path):
    from align.cli import main

    result = CliRunner().invoke(main, ["kto", "--model", str(tiny_model_dir), "--loss", "sigmoid", "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2 and "train.loss_type: expected one of kto, apo_zero_unpaired" in result.output


def test_prompts_that_fill_max_length_are_counted_and_none_left_is_refused(tiny_model_dir, tmp_path):
    """KTOTrainer drops every example whose prompt alone fills max_length: run.json counts them (as SFT and DPO
    count theirs), and a run with none left is one line naming --max-length and the first example's line."""
    data = labelled_rows(tmp_path / "kto.jsonl")
    record = record_of(run_kto(recipe(tiny_model_dir, data, tmp_path / "ok", ref="base", max_length=64),
                               progress=False))
    truncation = record["data"]["truncation"]
    assert truncation["examples_read"] == 9 and truncation["examples_dropped"] == 0
    assert truncation["completion_tokens"] == truncation["completion_tokens_before_truncation"] > 0
    with pytest.raises(AlignError, match=r"--max-length 8 leaves nothing to train on: every prompt is at least that "
                                         r"long.*the first \(.*kto.jsonl: line 1\)"):
        run_kto(recipe(tiny_model_dir, data, tmp_path / "none", ref="base", max_length=8), progress=False)
    assert not (tmp_path / "none").exists()
