"""Generation throughput of `align eval`: batched (batch 16, left padding, KV cache) vs one prompt at a time.

Same process, same model, same prompts (held-out Pig Latin sentences), greedy decoding; the ratio is what to
compare across machines. Also reports how many batched outputs equal the one-at-a-time outputs.

    .venv/bin/python benchmarks/eval_speed.py                       # 32 prompts, 32 new tokens, batch 16
    .venv/bin/python benchmarks/eval_speed.py --dtype float32 --examples 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from align.core.artifacts import machine_info, package_versions
from align.core.data import render_chat
from align.core.demo import builtin_dataset
from align.core.models import EMBEDDED_ALIAS, pick_precision, resolve_model
from eval.generate import LoadedModel, generate_texts, load_for_eval
from eval.suites import GenerationSpec


def timed(lm: LoadedModel, prompts: list[str], settings: GenerationSpec, batch_size: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    outputs = generate_texts(lm, prompts, settings, batch_size=batch_size)
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_ALIAS)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    lm = load_for_eval("bench", resolve_model(args.model), args.dtype)
    rows = builtin_dataset("pig-latin", "seen")[: args.examples]
    prompts = [render_chat(lm.tokenizer, r["messages"][:-1], add_generation_prompt=True) for r in rows]
    settings = GenerationSpec(max_new_tokens=args.max_new_tokens)
    generate_texts(lm, prompts[:2], GenerationSpec(max_new_tokens=4), batch_size=2)  # warm-up: first-call costs

    # Interleaved per chunk of one batch, so a change in machine load hits both modes alike (shared 2-core box)
    single_s = batched_s = 0.0
    single: list[str] = []
    batched: list[str] = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        seconds, outputs = timed(lm, chunk, settings, batch_size=args.batch_size)
        batched_s, batched = batched_s + seconds, batched + outputs
        seconds, outputs = timed(lm, chunk, settings, batch_size=1)
        single_s, single = single_s + seconds, single + outputs
        print(f"{start + len(chunk)}/{len(prompts)}: batched {batched_s:.1f}s, one at a time {single_s:.1f}s",
              file=sys.stderr)
    result = {
        "model": args.model,
        "precision": pick_precision(args.dtype).name,
        "examples": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "one_at_a_time": {"seconds": round(single_s, 2), "examples_per_s": round(len(prompts) / single_s, 3)},
        f"batch_{args.batch_size}": {"seconds": round(batched_s, 2), "examples_per_s": round(len(prompts) / batched_s, 3)},
        "speedup": round(single_s / batched_s, 2),
        "identical_outputs": f"{sum(a == b for a, b in zip(single, batched))}/{len(prompts)}",
        "machine": machine_info(),
        "versions": {k: package_versions()[k] for k in ("torch", "transformers")},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
