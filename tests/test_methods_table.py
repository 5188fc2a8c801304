"""benchmarks/methods_table.py's own cells, on hand-written records: reference forwards per step for each kind of
reference (GRPO's included), and the lines under the table for the stages that train no evaluated policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def table():
    return benchmark_script("methods_table")


@pytest.mark.parametrize("record, expected", [
    ({"stage": "dpo", "reference": {"mode": "adapter"}}, 1),
    ({"stage": "dpo", "reference": {"mode": "precompute"}}, 0),
    ({"stage": "kto", "reference": {"mode": "adapter"}}, 2),
    ({"stage": "orpo", "reference": None}, 0),
    ({"stage": "grpo", "reference": {"mode": "adapter"}, "trainer_args": {}}, 1),
    ({"stage": "grpo", "reference": {"mode": "adapter"}, "trainer_args": {"num_iterations": 2}}, 0.5),
    ({"stage": "grpo", "reference": {"mode": None}, "trainer_args": {}}, 0),  # beta 0: no KL, no reference
])
def test_reference_forwards_per_step(table, record, expected):
    assert table.reference_forwards(record) == expected


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_pairs_stages_and_the_reward_model_are_listed_under_the_table(tmp_path, table):
    write(tmp_path / "pairs" / "pairs.json", {"judge": "rule", "pairs": 186, "prompts": 128, "samples_per_prompt": 2,
                                              "sample_accuracy": 0.25})
    write(tmp_path / "rm" / "run.json", {"stage": "rm", "memory": {"peak_rss_bytes": 2**30},
                                         "pair_accuracy": {"accuracy": 0.98, "ci95": [0.93, 0.99], "correct": 98,
                                                           "pairs": 100, "mean_margin": 3.2}})
    write(tmp_path / "pairs-rm" / "pairs.json", {
        "judge": "rm:rm", "pairs": 100, "prompts": 128, "samples_per_prompt": 2, "skipped_prompts": 28,
        "skipped": {"fewer_than_two": 20, "below_margin": 8}, "min_margin": 0.1, "mean_chosen_score": 1.5,
        "mean_rejected_score": -0.5})
    write(tmp_path / "dpo" / "run.json", {"stage": "dpo", "memory": {"peak_rss_bytes": 2**30}})
    timings = {"pairs": 60.0, "dpo": 120.0, "rm": 150.0, "pairs-rm": 66.0}
    assert table.stage_notes(tmp_path, list(timings), timings) == [
        "- `pairs` (pairs, judge rule): 186 pairs from 128 prompts x 2 samples, sample accuracy 0.250",
        "- `rm` (reward model, not a policy): held-out pair accuracy 0.980 [0.930, 0.990] (Wilson 95%, 98/100 pairs, "
        "mean margin 3.20); 2.5 min, peak RSS 1.00 GiB",
        "- `pairs-rm` (pairs, judge rm:rm): 100 pairs from 128 prompts x 2 samples, 28 prompts skipped (20 with fewer "
        "than two distinct samples, 8 below min_margin 0.1); mean score chosen 1.500, rejected -0.500",
    ]


def test_a_method_on_judged_pairs_names_its_judge(tmp_path, table):
    write(tmp_path / "pairs-rm" / "pairs.json", {"judge": "rm:rm"})
    write(tmp_path / "pairs" / "pairs.json", {"judge": "rule"})
    on = {name: {"stage": "dpo", "loss_type": ["sigmoid", "sft"], "reference": {"mode": "adapter"},
                 "recipe": {"data": {"path": str(tmp_path / name / "pairs.jsonl")}}} for name in ("pairs", "pairs-rm")}
    assert table.describe(on["pairs"]) == "dpo (sigmoid+sft), ref adapter"
    assert table.describe(on["pairs-rm"]) == "dpo (sigmoid+sft), ref adapter, pairs judged by rm:rm"
    grpo = {"stage": "grpo", "loss_type": "dapo", "rewards": [{"name": "pig_latin", "reward": "pig-latin"}],
            "reference": {"mode": None}}
    assert table.describe(grpo) == "grpo (dapo, reward pig-latin), no reference"


def test_words_are_counted_by_kind_at_their_position(tmp_path, table):
    """`eat` -> eatway (right) / eatay (the dialect); `dog` -> ogday; a missing word counts as wrong. By hand."""
    prompt = ("<|im_start|>user\nTranslate to Pig Latin: {}<|im_end|>\n<|im_start|>assistant\n")
    samples = tmp_path / "eval" / "pig-latin" / "samples" / "grpo"
    samples.mkdir(parents=True)
    (samples / "seen.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"prompt": prompt.format("eat the dog"), "output": "eatay ethay ogday"},
        {"prompt": prompt.format("apple owl cat"), "output": "appleway owlay"},
    ]))
    (samples / "unseen.jsonl").write_text(json.dumps({"prompt": prompt.format("dog eat"), "output": "eatway ogday"}))
    assert table.word_kinds(tmp_path, ["grpo"])[2:] == [
        "| grpo | seen | 1/3 | 2/3 | 2/3 |",
        "| grpo | unseen | 0/1 | 0/1 | 0/1 |",
    ]
