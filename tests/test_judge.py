"""Judges that score samples: the pairs stage's `judge:` (best vs worst of each prompt's samples, with a margin) and a
reward model as a GRPO reward (`--reward rm:DIR`). The pairing rule on a fake scorer, checked by hand; a reward model
scoring as `score()` does; end to end on HH harmless-base style transcripts (SFT -> RM -> pairs judged by the RM on
held-out prompts -> DPO on exactly those pairs); bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import write_jsonl

from align.cli import main
from align.core.errors import AlignError
from align.pipeline.pairs import judge_samples
from align.pipeline.run import load_pipeline, run_pipeline
from align.pipeline.stages import stage_refs
from align.train.reward_model import score
from align.train.rewards import parse_reward

WORDS = ["cat", "dog", "owl", "bee", "ant", "elk", "fox", "yak", "emu", "gnu", "hen", "pig"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: extra torch threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the pairing rule, on a fake scorer ----------------------------------------------------------------------------


def test_best_against_worst_with_a_margin_and_skipped_prompts_counted():
    """Score = length, None for answers starting with 'n' (the judge does not apply). Expected by hand."""
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    samples = [["a", "bbb", "a", "", " cc "],   # distinct a, bbb, cc: bbb (3) vs a (1), margin 2
               ["xx", "yy"],                     # 2 vs 2: below the margin
               ["z", "z", ""],                   # one distinct answer
               ["n1", "ok", "nope", "okay"],     # None twice: okay (4) vs ok (2)
               ["ab", "cd", "e"]]                # a tie for best: the earlier sample (ab) is chosen
    calls = []

    def scorer(owners, completions):
        calls.append((list(owners), list(completions)))
        return [None if c.startswith("n") else float(len(c)) for c in completions]

    judged = judge_samples(prompts, samples, scorer, min_margin=1.0)
    assert calls == [([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4],
                      ["a", "bbb", "cc", "xx", "yy", "z", "n1", "ok", "nope", "okay", "ab", "cd", "e"])]
    assert [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"])
            for p in judged.pairs] == [("q0", "bbb", "a"), ("q3", "okay", "ok"), ("q4", "ab", "e")]
    assert judged.scores == [(3.0, 1.0), (4.0, 2.0), (2.0, 1.0)]
    assert judged.skipped == {"fewer_than_two": 1, "below_margin": 1}
    # a margin is inclusive, and a larger one skips more
    assert len(judge_samples(prompts, samples, scorer, min_margin=2.0).pairs) == 2
    assert judge_samples(prompts, samples, scorer, min_margin=2.5).skipped == {"fewer_than_two": 1, "below_margin": 4}


# ---- recipes -------------------------------------------------------------------------------------------------------


def pairs_recipe(tmp_path: Path, pairs_stage: str, before: str = "  - {name: sft, kind: sft}\n") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"stages:\n{before}  - {{name: pairs, kind: pairs, adapter: sft, {pairs_stage}}}\n")
    return path


def test_a_judge_is_checked_when_the_recipe_loads(tmp_path):
    rm = "  - {name: sft, kind: sft}\n  - {name: rm, kind: rm, data: x.jsonl}\n"
    stage = load_pipeline(pairs_recipe(tmp_path, "judge: 'rm:rm', data: p.jsonl", rm)).stages[2]
    assert stage.reward_model() == "rm" and stage_refs(stage) == ["sft", "rm"] and stage.min_margin == 0.1
    assert load_pipeline(pairs_recipe(tmp_path, "judge: 'regex:[a-z]+', min_margin: 0.5")).stages[1].judge
    assert load_pipeline(pairs_recipe(tmp_path, "")).stages[1].judge == "rule"
    for stage_text, message in [
        ("judge: 'rm:sft'", "judge rm:sft names a sft stage, not a reward model"),
        ("judge: 'rm:later'", "refers to 'later', which is not an earlier stage"),
        ("judge: 'rm:'", "judge rm: names no reward model"),
        ("judge: pig-latn", "unknown reward (did you mean 'pig-latin'?)"),
        (f"judge: '{tmp_path}/none.py:f'", "none.py not found"),
        ("judge: exact, min_margin: 0", "min_margin"),
    ]:
        with pytest.raises(AlignError, match=re.escape(message)) as caught:
            load_pipeline(pairs_recipe(tmp_path, stage_text))
        assert len(str(caught.value).splitlines()) == 1, str(caught.value)

