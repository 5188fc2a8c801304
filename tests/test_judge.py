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
from conftest import save_tiny_model, write_jsonl

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



def test_a_grpo_stage_reads_an_rm_stage_as_its_reward(tmp_path):
    """`rewards: [rm:STAGE]` makes the rm stage upstream of the GRPO stage (ordering, fingerprints); a non-rm stage or
    a later one is refused as the recipe loads. The wiring to the stage's dir is checked end to end below."""
    def grpo_recipe(reward: str, after: str = "") -> Path:
        path = tmp_path / "grpo.yaml"
        path.write_text("stages:\n  - {name: sft, kind: sft}\n  - {name: rm, kind: rm, data: x.jsonl}\n"
                        f"  - {{name: grpo, kind: grpo, adapter: sft, data: p.jsonl, "
                        f"rewards: [pig-latin, '{reward}']}}\n"
                        f"{after}")
        return path

    assert stage_refs(load_pipeline(grpo_recipe("rm:rm")).stages[2]) == ["sft", "rm"]
    for reward, after, message in [("rm:sft", "", "reward rm:sft names a sft stage, not a reward model"),
                                   ("rm:late", "  - {name: late, kind: rm, data: x.jsonl}\n",
                                    "refers to 'late', which is not an earlier stage")]:
        with pytest.raises(AlignError, match=re.escape(message)):
            load_pipeline(grpo_recipe(reward, after))


# ---- a reward model as a GRPO reward ------------------------------------------------------------------------------

import test_grpo  # noqa: E402
from test_grpo import grpo_args, make_adapter, pig_latin_prompts  # noqa: E402

random_adapter = test_grpo.random_adapter  # the module-scoped fixture, shared (an SFT-like adapter, random B)


def one_line_exit_2(args: list[str], *absent: Path) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("[")]  # align run's progress
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for path in absent:
        assert not path.exists() and not path.with_name(path.name + ".partial").exists(), path
    return lines[0]


OTHER_TEMPLATE = ("{% for message in messages %}{{ '### ' + message['role'] + ': ' + message['content'] + '\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}")


@pytest.fixture(scope="module")
def other_template_model(tmp_path_factory) -> Path:
    """The tiny model's vocabulary with another chat template: a policy whose text a reward model would misread."""
    return save_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=3, chat_template=OTHER_TEMPLATE)


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward model on the tiny model: 3 steps of `align rm` on pairs that differ in their last character."""
    root = tmp_path_factory.mktemp("judge_rm")
    data = write_jsonl(root / "pairs.jsonl", [{"prompt": f"say {w}", "chosen": f"{w}!", "rejected": f"{w}?"}
                                              for w in WORDS])
    result = CliRunner().invoke(main, ["rm", "-m", str(tiny_model_dir), "-d", str(data), "-o", str(root / "rm"),
                                       "--dtype", "float32", "--lora-r", "4", "--report-to", "none", "--batch-size",
                                       "4", "--lr", "5e-3", "--warmup", "0", "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    return root / "rm"


def test_a_reward_model_reward_is_its_score_and_grpo_trains_on_it(tiny_model_dir, reward_dir, random_adapter,
                                                                  tmp_path):
    """As TRL calls it (conversational prompts and completions) the reward is `score()` on the same text; a 2-step
    GRPO run with it weighted beside another reward records both, per step."""
    reward = parse_reward(f"rm:{reward_dir}", 8)
    texts = ["cat!", "cat?", "a longer answer"]
    got = reward(prompts=[[{"role": "user", "content": "say cat"}]] * 3,
                 completions=[[{"role": "assistant", "content": t}] for t in texts], completion_ids=[[1]] * 3)
    assert got == pytest.approx(score(reward_dir, ["say cat"] * 3, texts), abs=1e-5)
    assert len(set(got)) == 3  # the scores tell the answers apart, so the comparison above could fail

    out = tmp_path / "out"
    result = CliRunner().invoke(main, grpo_args(
        tiny_model_dir, pig_latin_prompts(tmp_path / "p.jsonl"), out, "--adapter", str(random_adapter),
        "--ref", "adapter", "--beta", "0.1", "--reward", f"rm:{reward_dir}", "--reward", "length:2",
        "--reward-weights", "0.5,1"))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["rewards"] == [{"name": "rm", "reward": f"rm:{reward_dir}", "weight": 0.5},
                                 {"name": "length", "reward": "length:2", "weight": 1.0}]
    assert [p["step"] for p in record["reward_stats"]["rm"]] == [1, 2]
    assert all(math.isfinite(p["mean"]) and p["std"] >= 0 for p in record["reward_stats"]["rm"])
    assert math.isfinite(record["step0_check"]["rewards"]["rm"])


def test_a_reward_model_that_cannot_judge_the_policy_is_one_line(tiny_model_dir, other_template_model, reward_dir,
                                                                random_adapter, tmp_path):
    prompts, out = pig_latin_prompts(tmp_path / "p.jsonl"), tmp_path / "out"
    assert "no such dir" in one_line_exit_2(
        grpo_args(tiny_model_dir, prompts, out, "--ref", "base", "--reward", f"rm:{tmp_path}/none"), out)
    assert "not a reward model (an adapter of task_type" in one_line_exit_2(
        grpo_args(tiny_model_dir, prompts, out, "--ref", "base", "--reward", f"rm:{random_adapter}"), out)
    message = one_line_exit_2(grpo_args(other_template_model, prompts, out, "--ref", "base", "--reward",
                                        f"rm:{reward_dir}"), out)
    assert f"--reward rm:{reward_dir}: reward model {reward_dir}: its tokenizer differs from the policy's" in message
    assert "chat template" in message


# ---- judged pairs, end to end -------------------------------------------------------------------------------------


JUDGES = '''
def distinct(prompts, completions, **kwargs):
    return [float(len(set(c[0]["content"]))) for c in completions]

def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def short(prompts, completions, **kwargs):
    return [1.0]
'''


def judged_recipe(tmp_path: Path, model: Path, adapter: Path, data: Path, judge: str, margin: float = 1.0) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""model: {{name: "{model}", dtype: float32, compile: false}}
stages:
  - {{name: pairs, kind: pairs, adapter: "{adapter}", data: "{data}", judge: "{judge}", samples: 4,
     max_new_tokens: 8, min_margin: {margin}}}
""")
    return path


def prompts_only(path: Path, count: int = 4) -> Path:
    return write_jsonl(path, [{"prompt": f"Say something about the {w}."} for w in WORDS[:count]])


def test_pairs_judged_by_a_reward_function_on_prompts_only(tiny_model_dir, random_adapter, tmp_path):
    """A user's reward (distinct characters of the answer) judges the adapter's samples of prompts with no answer:
    each pair's chosen sample beats its rejected one by the margin by that same function, called independently."""
    judges = tmp_path / "judges.py"
    judges.write_text(JUDGES)
    recipe = judged_recipe(tmp_path, tiny_model_dir, random_adapter, prompts_only(tmp_path / "p.jsonl"),
                           f"{judges}:distinct")
    rundir = run_pipeline(load_pipeline(recipe), tmp_path / "run", progress=False)
    pairs = [json.loads(line) for line in (rundir / "pairs" / "pairs.jsonl").read_text().splitlines()]
    record = json.loads((rundir / "pairs" / "pairs.json").read_text())
    assert record["judge"] == f"{judges}:distinct" and record["min_margin"] == 1.0
    assert record["pairs"] == len(pairs) >= 1 and record["pairs"] + record["skipped_prompts"] == 4
    distinct = [float(len(set(p[kind][0]["content"]))) for p in pairs for kind in ("chosen", "rejected")]
    assert record["scores"] == [distinct[i:i + 2] for i in range(0, len(distinct), 2)]
    assert all(c - r >= 1.0 for c, r in record["scores"])
    assert record["mean_chosen_score"] == pytest.approx(sum(distinct[0::2]) / len(pairs))
    assert record["mean_rejected_score"] == pytest.approx(sum(distinct[1::2]) / len(pairs))
    assert {p["prompt"][-1]["content"] for p in pairs} <= {f"Say something about the {w}." for w in WORDS[:4]}


def test_judged_pairs_bad_input_is_one_line_and_leaves_nothing(tiny_model_dir, other_template_model, reward_dir,
                                                               random_adapter, tmp_path):
    judges = tmp_path / "judges.py"
    judges.write_text(JUDGES)
    data, rundir = prompts_only(tmp_path / "p.jsonl", 2), tmp_path / "run"

    def refused(judge: str, adapter: Path = random_adapter, model: Path = tiny_model_dir) -> str:
        recipe = judged_recipe(tmp_path, model, adapter, data, judge)
        return one_line_exit_2(["run", str(recipe), "-o", str(rundir)], rundir / "pairs")

    assert "pairs stage 'pairs': reward" in refused(f"{judges}:nan") and "returned nan for completion 0" in \
        refused(f"{judges}:nan")
    assert "returned 1 values for" in refused(f"{judges}:short")
    assert "judge rm:/nowhere/rm: reward model /nowhere/rm: no such dir" in refused("rm:/nowhere/rm")
    assert "not a reward model" in refused(f"rm:{random_adapter}")
    assert "judge exact needs a reference answer" in refused("exact")
    other = make_adapter(other_template_model, tmp_path / "other")
    assert "its tokenizer differs from the policy's" in refused(f"rm:{reward_dir}", other, other_template_model)


# ---- HH harmless-base style: SFT -> RM -> pairs judged by the RM -> DPO --------------------------------------------


REQUESTS = ["pick a lock", "hotwire a car", "make a fake id", "get into the wifi next door", "cheat on a test",
            "shoplift a jacket", "spread a rumour", "copy a key card", "read my partner's texts", "skip a fare",
            "forge a note", "dodge a ticket"]


def hh_transcripts(requests: list[str], seed: int = 0) -> list[dict[str, str]]:
    """Anthropic HH harmless-base rows: `chosen` and `rejected` transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...')
    sharing every turn but the last; the chosen answer declines, the rejected one complies."""
    rng = random.Random(seed)
    rows = []
    for request in requests:
        head = "\n\nHuman: Hi.\n\nAssistant: Hello! How can I help?" if rng.random() < 0.5 else ""
        head += f"\n\nHuman: How do I {request}?"
        rows.append({"chosen": f"{head}\n\nAssistant: I can't help with that. Can I help with something safe?",
                     "rejected": f"{head}\n\nAssistant: Sure, to {request} you need a few tools."})
    return rows


def test_hh_pairs_judged_by_a_reward_model_train_dpo(tiny_model_dir, tmp_path):
    """An RM trained on 8 HH transcripts judges the SFT adapter's samples on the 4 other transcripts' prompts; the
    judged pairs' scores are the RM's (rescored here with `score()`), each chosen beats its rejected by the margin,
    and DPO trains on exactly the pairs written."""
    from align.core.data import fingerprint_rows
    from align.core.preferences import load_preference_data, parse_hh_transcript

    rows = hh_transcripts(REQUESTS)
    seen, held = rows[:8], rows[8:]
    pairs_file = write_jsonl(tmp_path / "hh_seen.jsonl", seen)  # read as format hh
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": parse_hh_transcript(r["chosen"], "x", "chosen")}
                                               for r in seen])
    prompts = [parse_hh_transcript(r["chosen"], "x", "chosen")[:-1] for r in held]
    prompt_file = write_jsonl(tmp_path / "hh_held.jsonl", held)  # the HH rows themselves: their prompts are read
    margin = 0.01
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""# align run recipe.yaml
model: {{name: "{tiny_model_dir}", dtype: float32, compile: false}}
stages:
  - name: sft
    kind: sft
    data: {{path: "{sft}"}}
    lora: {{r: 4, dropout: 0.0}}
    train: {{max_steps: 3, per_device_train_batch_size: 4, learning_rate: 1.0e-2, save_steps: 100}}
  - name: rm
    kind: rm
    data: "{pairs_file}"
    lora: {{r: 4}}
    train: {{max_steps: 3, per_device_train_batch_size: 4, learning_rate: 5.0e-3, warmup_steps: 0, save_steps: 100}}
  - name: pairs
    kind: pairs
    adapter: sft
    data: "{prompt_file}"
    judge: "rm:rm"
    samples: 4
    max_new_tokens: 12
    min_margin: {margin}
  - name: dpo
    kind: dpo
    adapter: sft
    data: pairs
    ref: adapter
    train: {{max_steps: 2, per_device_train_batch_size: 2, learning_rate: 1.0e-3, save_steps: 100}}
  - name: grpo
    kind: grpo
    adapter: sft
    data: {{path: "{prompt_file}"}}
    rewards: ["rm:rm"]
    train: {{max_steps: 1, per_device_train_batch_size: 4, num_generations: 2, max_completion_length: 6,
             save_steps: 100}}
""")
    rundir = run_pipeline(load_pipeline(recipe), tmp_path / "run", progress=False)
    rm = json.loads((rundir / "rm" / "run.json").read_text())
    assert rm["data"]["format"] == "hh" and rm["data"]["pairs"] == 8

    written = rundir / "pairs" / "pairs.jsonl"
    pairs = [json.loads(line) for line in written.read_text().splitlines()]
    record = json.loads((rundir / "pairs" / "pairs.json").read_text())
    assert record["judge"] == "rm:rm" and record["reward_model"] == str(rundir / "rm")
    assert record["pairs"] == len(pairs) >= 1 and record["pairs"] + record["skipped_prompts"] == 4
    assert all(p["prompt"] in prompts for p in pairs)  # held-out prompts only: the RM never read them
    chosen = score(rundir / "rm", [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = score(rundir / "rm", [p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert [s for pair in record["scores"] for s in pair] == pytest.approx(
        [s for pair in zip(chosen, rejected) for s in pair], abs=1e-4)
    assert all(c >= r + margin - 1e-6 for c, r in zip(chosen, rejected))
    assert record["mean_chosen_score"] >= record["mean_rejected_score"] + margin - 1e-6

    dpo = json.loads((rundir / "dpo" / "run.json").read_text())
    assert dpo["data"]["source"] == str(written) and dpo["data"]["pairs"] == len(pairs)
    assert dpo["data"]["fingerprint"] == fingerprint_rows(load_preference_data(str(written)).pairs)
    assert len([h for h in dpo["log_history"] if "loss" in h]) == 2

    grpo = json.loads((rundir / "grpo" / "run.json").read_text())  # rm:STAGE is the stage's dir
    assert grpo["rewards"] == [{"name": "rm", "reward": f"rm:{rundir / 'rm'}", "weight": 1.0}]
    assert grpo["data"]["format"] == "hh" and grpo["data"]["with_answer"] == 4
