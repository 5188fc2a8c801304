"""The LM head at scored positions only (eval.generate.logits_at) against the head at every position, on the
retention suite's facts items (160 context + choice sequences) with the embedded model, interleaved, medians.

    .venv/bin/python benchmarks/eval_head_positions.py
"""

import json
import statistics
import time

import eval.generate as g
from align.core.models import resolve_model
from align.core.data import render_chat
lm = g.load_for_eval("base", resolve_model("smollm2-135m"))
items = [json.loads(l) for l in open("eval/builtin/retention_facts.jsonl")]
seqs = []
for it in items:
    ctx = render_chat(lm.tokenizer, [{"role": "user", "content": it["question"]}], add_generation_prompt=True)
    for c in it["choices"]:
        seqs.append(g.context_continuation_ids(lm.tokenizer, ctx, c))
fast = g.logits_at
def full(model, ids, mask, pos):
    return model(input_ids=ids, attention_mask=mask).logits[:, pos]
times = {"head at scored positions": [], "head everywhere": []}
res = {}
for rep in range(3):
    for name, fn in (("head at scored positions", fast), ("head everywhere", full)):
        g.logits_at = fn
        t = time.perf_counter(); out = g.score_spans(lm, seqs, batch_size=64); times[name].append(time.perf_counter() - t)
        res[name] = [s.logprob for s in out]
print({k: round(statistics.median(v), 2) for k, v in times.items()}, "max |diff|", max(abs(a - b) for a, b in zip(*res.values())), len(seqs), "sequences")
