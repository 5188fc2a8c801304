"""On-policy preference pairs: sample an adapter on training prompts and judge the samples.

Two kinds of judge. The rule (`judge: rule`) knows the reference answer: a sample equal to it is right, and every
distinct wrong one becomes `rejected` against the reference as `chosen`. A scoring judge (`rm:DIR`, a reward model,
or a reward function as `align grpo --reward` takes it) scores every distinct sample of a prompt; the best becomes
`chosen` and the worst `rejected` when their scores differ by at least `min_margin`, else the prompt gives no pair.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from align.core.errors import AlignError
from align.pipeline.stages import Pipeline, PairsStage

Messages = list[dict[str, str]]


def run_pairs_stage(stage: PairsStage, pipeline: Pipeline) -> Path:
    if stage.judge == "rule":
        return run_rule_pairs(stage, pipeline)
    return run_judged_pairs(stage, pipeline)


def sample_adapter(stage: PairsStage, pipeline: Pipeline, prompts: list[Messages]) -> list[list[str]]:
    """`stage.samples` sampled answers per prompt (each sample a pass over all prompts with its own seed)."""
    from align.core.data import render_chat
    from align.core.models import resolve_model
    from eval.generate import free, generate_texts, load_for_eval
    from eval.suites import GenerationSpec

    lm = load_for_eval(stage.adapter, resolve_model(pipeline.path(stage.adapter)))
    texts = [render_chat(lm.tokenizer, p, add_generation_prompt=True) for p in prompts]
    settings = GenerationSpec(max_new_tokens=stage.max_new_tokens, do_sample=True, temperature=stage.temperature,
                              top_p=1.0)
    passes = [generate_texts(lm, texts, settings, seed=stage.seed + k) for k in range(stage.samples)]
    free(lm)
    return [[passes[k][i] for k in range(stage.samples)] for i in range(len(prompts))]


# ---- judge: rule ---------------------------------------------------------------------------------------------------


def run_rule_pairs(stage: PairsStage, pipeline: Pipeline) -> Path:
    """Every distinct wrong answer becomes a rejected completion against the reference answer."""
    from align.core.artifacts import output_dir
    from align.core.data import load_sft_data

    rows, _, _ = load_sft_data(stage.data, split=stage.split, limit=stage.limit)
    prompts, references = [], []
    for row in rows:
        messages = row["messages"]
        if messages[-1]["role"] != "assistant":
            raise AlignError(f"{stage.data}: pairs need conversations that end with the reference answer")
        prompts.append(messages[:-1])
        references.append(messages[-1]["content"].strip())
    with output_dir(pipeline.rundir / stage.name, overwrite=True) as handle:
        samples = sample_adapter(stage, pipeline, prompts)
        pairs, correct = [], 0
        for prompt, reference, answers in zip(prompts, references, samples):
            correct += sum(a.strip() == reference for a in answers)
            wrong = [a for a in distinct_answers(answers) if a != reference]
            pairs += [{"prompt": prompt, "chosen": [{"role": "assistant", "content": reference}],
                       "rejected": [{"role": "assistant", "content": w}]} for w in wrong]
        if not pairs:
            raise AlignError(f"pairs stage '{stage.name}': every sample was correct, so there is nothing to prefer "
                             "against (raise temperature or samples, or use harder prompts)")
        (handle.path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        record = {"judge": "rule", "prompts": len(prompts), "samples_per_prompt": stage.samples, "pairs": len(pairs),
                  "sample_accuracy": correct / (len(prompts) * stage.samples), "adapter": pipeline.path(stage.adapter),
                  "config": stage.model_dump(mode="json")}
        return handle.commit("pairs.json", record)


# ---- scoring judges ------------------------------------------------------------------------------------------------


Scorer = Callable[[Sequence[int], Sequence[str]], Sequence[float | None]]
"""(prompt index of each completion, the completions) -> one score each, None where the judge does not apply."""


@dataclass
class JudgedPairs:
    pairs: list[dict[str, Any]]
    """{prompt, chosen, rejected} rows, the answers as one assistant message each (what `align dpo` reads)."""
    scores: list[tuple[float, float]]
    """(chosen, rejected) score of each pair, in order."""
    skipped: dict[str, int]
    """Prompts without a pair: `fewer_than_two` distinct non-empty scored samples, or `below_margin`."""


def distinct_answers(samples: Sequence[str]) -> list[str]:
    """A prompt's samples, stripped, without repeats or empty answers, in the order sampled."""
    found: list[str] = []
    for answer in (s.strip() for s in samples):
        if answer and answer not in found:
            found.append(answer)
    return found


def judge_samples(prompts: Sequence[Messages], samples: Sequence[Sequence[str]], score: Scorer,
                  min_margin: float) -> JudgedPairs:
    """Score each prompt's distinct samples (all prompts in one call, so a reward model batches them) and pair its
    best against its worst where they differ by `min_margin` or more. Ties go to the earlier sample."""
    answers = [distinct_answers(s) for s in samples]
    owners = [i for i, found in enumerate(answers) for _ in found]
    flat = [a for found in answers for a in found]
    scored = list(score(owners, flat)) if flat else []
    result = JudgedPairs([], [], {"fewer_than_two": 0, "below_margin": 0})
    position = 0
    for prompt, found in zip(prompts, answers):
        candidates = [(s, a) for s, a in zip(scored[position:position + len(found)], found) if s is not None]
        position += len(found)
        if len(candidates) < 2:
            result.skipped["fewer_than_two"] += 1
            continue
        best = max(candidates, key=lambda c: c[0])
        worst = min(candidates, key=lambda c: c[0])
        if best[0] - worst[0] < min_margin:
            result.skipped["below_margin"] += 1
            continue
        result.pairs.append({"prompt": list(prompt), "chosen": [{"role": "assistant", "content": best[1]}],
                             "rejected": [{"role": "assistant", "content": worst[1]}]})
        result.scores.append((float(best[0]), float(worst[0])))
    return result


def reward_scorer(reward: Any, rows: list[dict[str, Any]], tokenizer: Any) -> Scorer:
    """A checked reward (align/train/rewards.py) called as TRL calls it on conversational prompts: prompts and
    completions as messages, the completions' token ids, and each row's reference answer (`answer`)."""
    def score(owners: Sequence[int], completions: Sequence[str]) -> list[float | None]:
        return reward(prompts=[rows[i]["prompt"] for i in owners],
                      completions=[[{"role": "assistant", "content": c}] for c in completions],
                      completion_ids=[tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions],
                      answer=[rows[i]["answer"] for i in owners])

    return score


def parse_judge(stage: PairsStage, pipeline: Pipeline) -> Any:
    """The stage's scoring judge as a checked reward, a reward model's stage name turned into its dir."""
    from align.train.rewards import parse_reward

    try:
        return parse_reward(pipeline.reward_spec(stage.judge), stage.max_new_tokens)
    except AlignError as exc:
        raise AlignError(f"pairs stage '{stage.name}': judge {str(exc).removeprefix('--reward ')}") from None


def run_judged_pairs(stage: PairsStage, pipeline: Pipeline) -> Path:
    """Best vs worst sample of each prompt by the judge's score. Every input check (the judge, the reward model's
    tokenizer against the adapter's, rewards that need an answer) comes before the output dir."""
    from align.core.artifacts import output_dir
    from align.core.models import load_tokenizer, resolve_model
    from align.train.grpo import check_rewards_apply, read_prompts
    from align.train.rewards import check_reward_tokenizers

    data = read_prompts(stage.data, stage.split, stage.limit)
    judge = parse_judge(stage, pipeline)
    adapter = pipeline.path(stage.adapter)
    tokenizer = load_tokenizer(resolve_model(adapter))
    try:
        check_rewards_apply([judge], data)
        check_reward_tokenizers([judge], tokenizer, adapter)
    except AlignError as exc:
        raise AlignError(f"pairs stage '{stage.name}': {str(exc).replace('--reward ', 'judge ')}") from None
    with output_dir(pipeline.rundir / stage.name, overwrite=True) as handle:
        prompts = [row["prompt"] for row in data.train]
        samples = sample_adapter(stage, pipeline, prompts)
        try:
            judged = judge_samples(prompts, samples, reward_scorer(judge, data.train, tokenizer), stage.min_margin)
        except AlignError as exc:
            raise AlignError(f"pairs stage '{stage.name}': {exc}") from None
        skipped = sum(judged.skipped.values())
        if not judged.pairs:
            raise AlignError(f"pairs stage '{stage.name}': judge {stage.judge} gave no pair from {len(prompts)} "
                             f"prompts ({judged.skipped['below_margin']} with scores closer than min_margin "
                             f"{stage.min_margin}, {judged.skipped['fewer_than_two']} with fewer than two distinct "
                             "scored samples); lower min_margin, or raise samples or temperature")
        (handle.path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in judged.pairs))
        record = {"judge": stage.judge, "reward_model": pipeline.path(stage.reward_model())
                  if stage.reward_model() else None, "min_margin": stage.min_margin, "prompts": len(prompts),
                  "samples_per_prompt": stage.samples, "pairs": len(judged.pairs), "skipped_prompts": skipped,
                  "skipped": judged.skipped, "mean_chosen_score": fmean(c for c, _ in judged.scores),
                  "mean_rejected_score": fmean(r for _, r in judged.scores),
                  "scores": [list(pair) for pair in judged.scores], "data": data.record, "adapter": adapter,
                  "config": stage.model_dump(mode="json")}
        return handle.commit("pairs.json", record)
