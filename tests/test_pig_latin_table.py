"""benchmarks/pig_latin_table.py's statistics: paired bootstrap CIs read from an eval's per-item samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def table():
    return benchmark_script("pig_latin_table")


def write_suite(rundir: Path, suite: str, scores: dict[str, dict[str, tuple[str, list[float]]]]) -> None:
    """scores: model -> task -> (metric name, per-item values), written as `align eval` writes them."""
    root = rundir / "eval" / suite
    results: dict = {}
    for model, tasks in scores.items():
        for task, (name, values) in tasks.items():
            path = root / "samples" / model / f"{task}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"output": "", "scores": {name: v}}) + "\n" for v in values))
            results.setdefault(model, {})[task] = {"status": "ok", "samples": f"samples/{model}/{task}.jsonl",
                                                   "metrics": {name: {"value": float(np.mean(values))}}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "report.json").write_text(json.dumps({"results": results}))


def test_paired_difference_sees_a_consistent_gain_that_unpaired_noise_would_hide(tmp_path, table):
    rng = np.random.default_rng(1)
    sft = rng.uniform(0, 1, 100)  # items differ a lot in difficulty ...
    dpo = np.minimum(sft + 0.05, 1.0)  # ... and the better model gains a little on every one
    write_suite(tmp_path, "pig-latin", {"sft": {"seen": ("word_accuracy", list(sft))},
                                        "dpo": {"seen": ("word_accuracy", list(dpo))}})
    value, (low, high) = table.Scores(tmp_path).difference("sft", "dpo", "seen")
    assert value == pytest.approx(float(dpo.mean() - sft.mean()))
    assert 0 < low <= value <= high
    # The unpaired intervals of the two models overlap: only pairing the items shows the gain.
    sft_ci, dpo_ci = (table.Scores(tmp_path).value_ci(m, "seen word_accuracy") for m in ("sft", "dpo"))
    assert dpo_ci[0] < sft_ci[1]


def test_equal_models_have_a_difference_ci_that_does_not_exclude_zero(tmp_path, table):
    scores = list(np.random.default_rng(2).uniform(0, 1, 50))
    noisy = [s if i % 2 else 1 - s for i, s in enumerate(scores)]  # same mean-ish, item by item different
    write_suite(tmp_path, "pig-latin", {"a": {"seen": ("word_accuracy", scores)},
                                        "b": {"seen": ("word_accuracy", scores)},
                                        "c": {"seen": ("word_accuracy", noisy)}})
    assert table.Scores(tmp_path).difference("a", "b", "seen") == (0.0, (0.0, 0.0))
    value, (low, high) = table.Scores(tmp_path).difference("a", "c", "seen")
    assert low < 0 < high


def test_retention_is_the_mean_of_its_parts_in_points_with_each_task_resampled_alone(tmp_path, table):
    parts = {"facts": ("accuracy", [1.0] * 30 + [0.0] * 10),
             "arithmetic": ("contains", [1.0] * 10 + [0.0] * 30),
             "instructions": ("regex_match", [0.0] * 40)}
    worse = {**parts, "facts": ("accuracy", [1.0] * 20 + [0.0] * 20)}
    write_suite(tmp_path, "retention", {"base": parts, "merged": worse})
    scores = table.Scores(tmp_path)
    low, high = scores.value_ci("base", "retention")
    assert low < 100 * (0.75 + 0.25 + 0) / 3 < high
    assert high < 100 * (1 + 1 + 0) / 3  # the all-zero task pins a third of the score at 0 in every resample
    value, (low, high) = scores.retention_difference("base", "merged")
    assert value == pytest.approx(-100 * 0.25 / 3)
    assert low <= value <= high <= 0  # merged never beats base on any resample: its only change is a loss


def test_skill_ratio_pools_both_splits(tmp_path, table):
    write_suite(tmp_path, "pig-latin", {"dpo": {"seen": ("word_accuracy", [1.0] * 20), "unseen": ("word_accuracy", [0.5] * 20)},
                                        "merged": {"seen": ("word_accuracy", [0.9] * 20), "unseen": ("word_accuracy", [0.45] * 20)}})
    ratio, (low, high) = table.Scores(tmp_path).skill_ratio("dpo", "merged")
    assert ratio == pytest.approx(0.9)
    assert low == pytest.approx(0.9) and high == pytest.approx(0.9)
