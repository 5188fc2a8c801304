"""The LM head at scored positions only (eval.generate.logits_at) against the head at every position, on the
retention suite's facts items (160 context + choice sequences) with the embedded model, interleaved, medians.

    .venv/bin/python benchmarks/eval_head_positions.py
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch

import eval.generate as generate
from align.core.data import render_chat
from align.core.models import resolve_model

REPEATS = 3


def head_everywhere(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
    """What score_spans did before logits_at: every position's logits, then the scored ones."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, positions]


def facts_sequences(tokenizer: Any) -> list[tuple[list[int], int]]:
    with open("eval/builtin/retention_facts.jsonl") as f:
        items = [json.loads(line) for line in f]
    sequences = []
    for item in items:
        context = render_chat(tokenizer, [{"role": "user", "content": item["question"]}], add_generation_prompt=True)
        sequences += [generate.context_continuation_ids(tokenizer, context, choice) for choice in item["choices"]]
    return sequences


def main() -> None:
    lm = generate.load_for_eval("base", resolve_model("smollm2-135m"))
    sequences = facts_sequences(lm.tokenizer)
    variants = {"head at scored positions": generate.logits_at, "head everywhere": head_everywhere}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    logprobs: dict[str, list[float]] = {}
    for _ in range(REPEATS):
        for name, head in variants.items():
            generate.logits_at = head  # score_spans looks the function up at call time
            started = time.perf_counter()
            spans = generate.score_spans(lm, sequences, batch_size=64)
            seconds[name].append(time.perf_counter() - started)
            logprobs[name] = [span.logprob for span in spans]
    medians = {name: round(statistics.median(times), 2) for name, times in seconds.items()}
    largest_diff = max(abs(a - b) for a, b in zip(*logprobs.values()))
    print(medians, "max |diff|", largest_diff, len(sequences), "sequences")


if __name__ == "__main__":
    main()
