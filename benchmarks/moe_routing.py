"""Where a mixture's routing goes (issue 28): per-layer gate choices on each skill's eval prompts, and what the
mixture would score with every token sent to the right expert.

    .venv/bin/python benchmarks/moe_routing.py RUNDIR [--moe moe] [--experts pig,reverse] \
        [--skills pig-latin,reverse-words] [--limit 50]

RUNDIR is a finished `recipes/two-skills.yaml` run. For each skill, the eval stage's own prompts (as rendered, from
`RUNDIR/eval/<suite>/samples/<moe>/<skill>.jsonl`) are followed by their reference answers, and each model is run on
them teacher-forced. Skill i belongs to expert i (the order of the recipe's `experts`). Printed, as JSON:
- `routing`: per layer, the share of the user message's tokens and of the answer's tokens whose top-1 gate choice
  is the skill's own expert (1.0 everywhere is perfect routing);
- `answer_top1`: the share of answer tokens the model predicts (argmax) right, for the expert adapter itself, the
  mixture as routed, and the mixture with every token forced to the skill's expert (its MLPs, the base's
  attention: mergekit-moe takes attention from the base). The forced row separates the two ways a mixture can lose
  a skill: routing (routed < forced) and what the mixture cannot hold at all (forced < expert).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_rows(rundir: Path, moe: str, skill: str, limit: int) -> list[tuple[str, str]]:
    files = sorted((rundir / "eval").glob(f"*/samples/{moe}/{skill}.jsonl"))
    if not files:
        raise SystemExit(f"{rundir}/eval: no samples of {moe} on {skill}")
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    return [(row["prompt"], row["reference"]) for row in rows[:limit]]


def encode(tokenizer: Any, prompt: str, answer: str) -> tuple[torch.Tensor, int, int]:
    """Token ids of prompt + answer + end of turn, where the user message starts, and where the answer starts."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    user_start = len(tokenizer(prompt[: prompt.rfind("<|im_start|>user")], add_special_tokens=False)["input_ids"])
    return torch.tensor([prompt_ids + answer_ids]), user_start, len(prompt_ids)


@contextmanager
def recorded_and_forced(model: Any, forced: int | None) -> Iterator[list[torch.Tensor]]:
    """Record each layer's top-1 expert per token; with `forced`, replace the router's choice by that expert."""
    choices: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: tuple[torch.Tensor, ...]) -> Any:
        logits, scores, indices = output
        choices.append(indices[:, 0].detach().clone())
        if forced is None:
            return None
        return logits, torch.full_like(scores, 1.0 / scores.shape[-1]), torch.full_like(indices, forced)

    gates = [m for name, m in model.named_modules() if type(m).__name__.endswith("TopKRouter")]
    if not gates:
        raise SystemExit("no top-k router modules in the mixture")
    handles = [g.register_forward_hook(hook) for g in gates]
    try:
        yield choices
    finally:
        for handle in handles:
            handle.remove()


def answer_top1(model: Any, ids: torch.Tensor, answer_start: int) -> tuple[int, int]:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    predicted = logits[answer_start - 1 : -1].argmax(-1)
    target = ids[0, answer_start:]
    return int((predicted == target).sum()), int(target.numel())


def study(rundir: Path, moe: str, experts: list[str], skills: list[str], limit: int) -> dict[str, Any]:
    from align.core.models import resolve_model
    from eval.generate import free, load_for_eval

    report: dict[str, Any] = {"rundir": str(rundir), "moe": moe, "experts": experts, "skills": skills,
                              "routing": {}, "answer_top1": {}}
    rows = {skill: load_rows(rundir, moe, skill, limit) for skill in skills}
    mixture = load_for_eval(moe, resolve_model(str(rundir / moe)))
    for index, skill in enumerate(skills):
        user_hits: list[list[float]] = []
        answer_hits: list[list[float]] = []
        routed = forced = total = 0
        for prompt, answer in rows[skill]:
            ids, user_start, answer_start = encode(mixture.tokenizer, prompt, answer)
            with recorded_and_forced(mixture.model, None) as choices:
                right, count = answer_top1(mixture.model, ids, answer_start)
            routed, total = routed + right, total + count
            user_hits.append([float((c[user_start:answer_start] == index).float().mean()) for c in choices])
            answer_hits.append([float((c[answer_start:] == index).float().mean()) for c in choices])
            with recorded_and_forced(mixture.model, index):
                forced += answer_top1(mixture.model, ids, answer_start)[0]
        layers = len(user_hits[0])
        report["routing"][skill] = {
            "expert": experts[index],
            "user_tokens_to_own_expert": [sum(h[i] for h in user_hits) / len(user_hits) for i in range(layers)],
            "answer_tokens_to_own_expert": [sum(h[i] for h in answer_hits) / len(answer_hits)
                                            for i in range(layers)],
        }
        report["answer_top1"][skill] = {"answer_tokens": total, "mixture_routed": routed / total,
                                        "mixture_forced_to_expert": forced / total}
    free(mixture)
    for index, skill in enumerate(skills):
        expert = load_for_eval(experts[index], resolve_model(str(rundir / experts[index])))
        right = total = 0
        for prompt, answer in rows[skill]:
            ids, _, answer_start = encode(expert.tokenizer, prompt, answer)
            hit, count = answer_top1(expert.model, ids, answer_start)
            right, total = right + hit, total + count
        report["answer_top1"][skill]["expert_adapter"] = right / total
        free(expert)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rundir", type=Path)
    parser.add_argument("--moe", default="moe")
    parser.add_argument("--experts", default="pig,reverse")
    parser.add_argument("--skills", default="pig-latin,reverse-words")
    parser.add_argument("--limit", type=int, default=50)
    args = parser.parse_args()
    report = study(args.rundir, args.moe, args.experts.split(","), args.skills.split(","), args.limit)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
