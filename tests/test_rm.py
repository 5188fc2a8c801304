"""`align rm`: a LoRA reward model over TRL's RewardTrainer. End to end through the CLI; the output loads with plain
PEFT and scores as `score()` does; held-out pair accuracy matches what plain PEFT computes on the same eval pairs,
with a Wilson interval that scipy confirms; trivial data is learned; bad input is one line, exit 2, nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import write_jsonl

from align.cli import main
from align.core.errors import AlignError
from align.train.reward_model import score, tokenizer_record
from align.train.rm import wilson_interval

WORDS = ["cat", "dog", "owl", "bee", "ant", "elk", "fox", "yak", "emu", "gnu", "hen", "pig",
         "cow", "rat", "bat", "ape", "eel", "jay", "kit", "ram"]


def pairs(path: Path, words: list[str], good: str = "!", bad: str = "?") -> Path:
    """Pairs whose chosen and rejected answers differ only in their last character."""
    return write_jsonl(path, [{"prompt": f"say {w}", "chosen": f"{w}{good}", "rejected": f"{w}{bad}"} for w in words])


def rm_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["rm", "-m", str(model), "-d", str(data), "-o", str(out), "--dtype", "float32", "--lora-r", "4",
            "--report-to", "none", "--batch-size", "4", "--lr", "5e-3", "--warmup", "0", *extra]


def plain_peft_scores(out: Path, rows: list[dict]) -> tuple[list[float], list[float]]:
    """Scores of each pair's chosen and rejected conversation, by plain PEFT and transformers alone."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    model = AutoPeftModelForSequenceClassification.from_pretrained(str(out), num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))

    def one(prompt: str, answer: str) -> float:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}],
                                            tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    return [one(r["prompt"], r["chosen"]) for r in rows], [one(r["prompt"], r["rejected"]) for r in rows]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(output dir, eval file) of a 3-step run through the CLI with an explicit eval file."""
    root = tmp_path_factory.mktemp("rm")
    data, held = pairs(root / "train.jsonl", WORDS[:8]), pairs(root / "eval.jsonl", WORDS[8:14])
    result = CliRunner().invoke(main, rm_args(tiny_model_dir, data, root / "out", "--max-steps", "3",
                                              "--eval-data", str(held)))
    assert result.exit_code == 0, result.output
    return root / "out", held


def test_the_cli_writes_a_seq_cls_adapter_and_run_json_last(trained, tiny_model_dir):
    out, _ = trained
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "README.md", "loss.png", "accuracy.png", "checkpoint-3", "run.json"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights["base_model.model.score.weight"].shape == (1, 64)  # the head, saved whole
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # LoRA B starts at 0: it trained
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "rm" and record["reference"] is None
    assert len([h for h in record["log_history"] if "loss" in h]) == 3
    from transformers import AutoTokenizer

    model = record["reward_model"]
    assert model["base"] == str(tiny_model_dir) and model["num_labels"] == 1
    assert model["tokenizer"] == tokenizer_record(AutoTokenizer.from_pretrained(str(tiny_model_dir)),
                                                  str(tiny_model_dir))
    assert record["data"]["truncation"]["eval_pairs_scored"] == 6


def test_accuracy_is_plain_peft_s_on_the_eval_pairs_with_a_wilson_interval(trained):
    out, held = trained
    rows = [json.loads(line) for line in held.read_text().splitlines()]
    chosen, rejected = plain_peft_scores(out, rows)
    accuracy = json.loads((out / "run.json").read_text())["pair_accuracy"]
    correct = sum(c > r for c, r in zip(chosen, rejected))
    assert (accuracy["correct"], accuracy["pairs"], accuracy["interval"]) == (correct, 6, "wilson")
    assert accuracy["mean_margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 6, abs=1e-4)
    assert accuracy["ci95"] == pytest.approx(list(wilson_interval(correct, 6)))
    # score() reads the dir as plain PEFT does, and padding a batch (a longer answer beside it) changes no score
    prompts = [r["prompt"] for r in rows] + ["say it at length"]
    scores = score(out, prompts, [r["chosen"] for r in rows] + ["a much longer answer than the others"])
    assert scores[:-1] == pytest.approx(chosen, abs=1e-4)


@pytest.mark.parametrize(("k", "n"), [(0, 4), (4, 4), (3, 6), (8, 10), (57, 100)])
def test_wilson_interval_is_scipy_s(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_trivial_data_is_learned(tiny_model_dir, tmp_path):
    """Chosen and rejected differ only in the last character. The orientation is the one the untrained model (the
    base with the run's seeded head, LoRA B at zero) gets wrong, so high accuracy can only come from training."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    set_seed(0)  # as run_rm seeds before loading: the same fresh head
    untrained = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))

    def untrained_score(answer: str, prompt: str = "say cow") -> float:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}],
                                            tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            return float(untrained(**ids).logits[0, 0])

    good, bad = ("!", "?") if untrained_score("cow!") < untrained_score("cow?") else ("?", "!")
    untrained_correct = sum(untrained_score(w + good, f"say {w}") > untrained_score(w + bad, f"say {w}")
                            for w in WORDS[12:])
    assert untrained_correct <= 4  # the premise: without training this orientation is no better than chance
    data, held = pairs(tmp_path / "t.jsonl", WORDS[:12], good, bad), pairs(tmp_path / "e.jsonl", WORDS[12:], good, bad)
    result = CliRunner().invoke(main, rm_args(tiny_model_dir, data, tmp_path / "out", "--max-steps", "6",
                                              "--batch-size", "12", "--lr", "2e-2", "--eval-data", str(held)))
    assert result.exit_code == 0, result.output
    accuracy = json.loads((tmp_path / "out" / "run.json").read_text())["pair_accuracy"]
    assert accuracy["pairs"] == 8 and accuracy["correct"] >= 7, accuracy


def one_line_exit_2(args: list[str], out: Path) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return result.output


def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, trained):
    data = pairs(tmp_path / "p.jsonl", WORDS[:6])
    out = tmp_path / "out"
    assert "data file not found" in one_line_exit_2(rm_args(tiny_model_dir, tmp_path / "missing.jsonl", out), out)
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "say cat", "chosen": "cat!"}])
    assert "broken.jsonl" in one_line_exit_2(rm_args(tiny_model_dir, broken, out), out)
    assert "pair accuracy needs at least 2" in one_line_exit_2(
        rm_args(tiny_model_dir, data, out, "--eval-size", "1"), out)
    assert "pad token '<nope>' is not in the tokenizer's vocabulary" in one_line_exit_2(
        rm_args(tiny_model_dir, data, out, "--set", "train.pad_token=<nope>"), out)
    assert "is a LoRA adapter" in one_line_exit_2(rm_args(trained[0], data, out), out)


def test_eval_pairs_that_max_length_drops_are_refused_inside_the_run_and_leave_nothing(tiny_model_dir, tmp_path):
    """RewardTrainer drops over-long pairs after the output dir is locked: the refusal still leaves nothing."""
    data = pairs(tmp_path / "p.jsonl", WORDS[:6])
    held = write_jsonl(tmp_path / "long.jsonl", [{"prompt": f"say {w}", "chosen": w * 40, "rejected": w * 41}
                                                 for w in WORDS[6:9]])
    out = tmp_path / "out"
    assert "--max-length 100 leaves 0 of the 3 eval pairs" in one_line_exit_2(
        rm_args(tiny_model_dir, data, out, "--max-length", "100", "--eval-data", str(held)), out)


def test_score_refuses_a_dir_that_is_not_a_reward_model(tiny_model_dir):
    with pytest.raises(AlignError, match="not a reward model dir"):
        score(tiny_model_dir, ["say cat"], ["cat!"])
