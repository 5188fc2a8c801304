"""Generation throughput of `align eval`: batched (batch 16, left padding, KV cache) vs one prompt at a time.

Same process, same model, same prompts (held-out Pig Latin sentences), greedy decoding; the ratio is what to
compare across machines. Also reports how many batched outputs equal the one-at-a-time outputs.

    .venv/bin/python benchmarks/eval_speed.py                       # 32 prompts, 32 new tokens, batch 16
    .venv/bin/python benchmarks/eval_speed.py --dtype float32 --examples 16
    .venv/bin/python benchmarks/eval_speed.py --model models/llama-1b --data data/pig-latin.jsonl   # on a GPU

`--data` takes any SFT data `align sft` reads (prompts are each row's conversation up to its last turn); on a CUDA
machine the model runs on the GPU and each timed call is synchronized.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from align.core.artifacts import machine_info, package_versions
from align.core.data import load_sft_data, render_chat
from align.core.models import EMBEDDED_ALIAS, pick_precision, resolve_model
from eval.generate import LoadedModel, generate_texts, load_for_eval
from eval.suites import GenerationSpec


def timed(lm: LoadedModel, prompts: list[str], settings: GenerationSpec, batch_size: int) -> tuple[float, list[str]]:
    import torch

    start = time.perf_counter()
    outputs = generate_texts(lm, prompts, settings, batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_ALIAS)
    parser.add_argument("--data", default="builtin:pig-latin", help="SFT data (default: held-out Pig Latin)")
    parser.add_argument("--split", help="split of a built-in or hub dataset (default: seen for builtin data)")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    lm = load_for_eval("bench", resolve_model(args.model), args.dtype)
    split = args.split or ("seen" if args.data.startswith("builtin:") else None)
    rows, _, _ = load_sft_data(args.data, split=split, limit=args.examples)
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
        "data": args.data,
        "device": "cuda" if __import__("torch").cuda.is_available() else "cpu",
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
