"""`align sft` against plain TRL `SFTTrainer` on the embedded model: same data, same LoRA, one script.

Each configuration runs in a fresh subprocess (so peak RSS is its own), in an interleaved order repeated
`--repeats` times; figures are reported as ratios against the plain-TRL runs of the same script.

  (a) identical settings: trl-same vs align-same  (goal: tokens/s ratio >= 1.0, no overhead of ours)
  (b) defaults:           trl-defaults vs align-defaults (goal: align's machine defaults >= 2x TRL's defaults)
  (c) packing:            align-packed (--packing, blocks of 256 tokens) vs align-defaults, the cost model's
                          prediction for sdpa printed beside it (issue 14)

Tokens/s counts non-padding tokens (the Trainer's `num_input_tokens_seen` with "non_padding"), measured over the
steps after `--warmup` (steady state) and over the whole run including compilation (end to end).
MFU uses the usual 6*N FLOPs per token for training (forward 2N + backward 4N, N = model parameters), against
this machine's measured bf16 and fp32 matmul peaks.

    .venv/bin/python benchmarks/sft_throughput.py --steps 60 --repeats 2
    .venv/bin/python benchmarks/sft_throughput.py --model models/llama-1b --data data/hh.jsonl   # any model and data

On a CUDA machine every run trains on the GPU, and each result also carries `peak_cuda_bytes`
(`torch.cuda.max_memory_allocated`); steady-state rates skip the first `--warmup` steps, which pay the one-off costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from align.core.artifacts import proc_status_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("trl-same", "align-same", "trl-defaults", "align-defaults")
PACKED_BLOCK = 256  # align-packed's max_length: the demo rows are <= 65 tokens, so nothing is truncated


def step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))

    return StepTimer()


def rates(marks: list[tuple[float, int]], start: float, warmup: int) -> dict[str, float]:
    end_time, end_tokens = marks[-1]
    warm_time, warm_tokens = marks[min(warmup, len(marks) - 2)]
    return {
        "tokens": end_tokens,
        "end_to_end_tok_s": end_tokens / (end_time - start),
        "steady_tok_s": (end_tokens - warm_tokens) / (end_time - warm_time),
        "seconds": end_time - start,
    }


@dataclass(frozen=True)
class Source:
    """What every configuration trains on: `--model` (any align model spec, e.g. benchmarks/make_model.py's output)
    and `--data` (any SFT data align reads)."""

    model: str = "smollm2-135m"
    data: str = "builtin:pig-latin"


def prompt_completion_rows(rows: int, source: Source) -> list[dict[str, Any]]:
    """The data as TRL's prompt-completion rows: the conversation up to its last turn, and that turn."""
    from align.core.data import load_sft_data

    data, _, _ = load_sft_data(source.data, limit=rows)
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in data]


def run_trl(config: str, steps: int, rows: int, batch: int, warmup: int, workdir: Path,
            source: Source) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from align.core.models import load_tokenizer, resolve_model

    resolved = resolve_model(source.model)
    tokenizer = load_tokenizer(resolved)
    common = dict(output_dir=str(workdir), max_steps=steps, per_device_train_batch_size=batch, logging_steps=1,
                  report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                  include_num_input_tokens_seen="non_padding", learning_rate=2e-4,
                  use_cpu=not torch.cuda.is_available())
    if config == "trl-same":
        # exactly what align-same resolves to on this machine
        from align.core.models import pick_precision

        bf16 = pick_precision("auto").bf16_autocast
        args = SFTConfig(**common, bf16=bf16, gradient_checkpointing=False, torch_compile=False, max_length=1024,
                         lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0)
    else:  # TRL's own defaults for everything not needed to run
        args = SFTConfig(**common)
    # trl-same loads what align resolves (bf16 weights on a GPU); TRL's defaults take the checkpoint as it is stored
    from align.core.models import pick_precision

    dtype = pick_precision("auto").weights if config == "trl-same" else "auto"
    model = AutoModelForCausalLM.from_pretrained(resolved.base, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = step_timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(prompt_completion_rows(rows, source)),
                         processing_class=tokenizer, peft_config=lora, callbacks=[timer])
    start = time.perf_counter()
    trainer.train()
    return {**rates(timer.marks, start, warmup), "settings": {
        "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
        "torch_compile": args.torch_compile, "packing": args.packing}}


def run_align(config: str, steps: int, rows: int, batch: int, warmup: int, workdir: Path,
              source: Source) -> dict[str, Any]:
    import align.train.sft as sft
    from align.core.config import SFTRecipe

    timer = step_timer()
    real = sft.progress_callback
    sft.progress_callback = lambda total, enabled=True: timer  # same hook point, no bar
    train: dict[str, Any] = {"max_steps": steps, "per_device_train_batch_size": batch, "save_steps": 10**6}
    model: dict[str, Any] = {"name": source.model}
    if config == "align-same":
        model.update(compile=False, gradient_checkpointing=False)
    if config == "align-packed":
        train.update(packing=True, max_length=PACKED_BLOCK)
    recipe = SFTRecipe.model_validate({"model": model, "data": {"path": source.data, "limit": rows},
                                       "lora": {"r": 16}, "train": train, "output": str(workdir / "out")})
    start = time.perf_counter()
    out = sft.run_sft(recipe, progress=False)
    sft.progress_callback = real
    record = json.loads((out / "run.json").read_text())
    return {**rates(timer.marks, start, warmup), "settings": record["machine_plan"],
            "packing": record["trainer_args"].get("packing", False)}


def worker(config: str, steps: int, rows: int, batch: int, warmup: int, source: Source) -> None:
    import tempfile

    import torch

    baseline = proc_status_bytes("VmHWM")
    with tempfile.TemporaryDirectory() as tmp:
        runner = run_trl if config.startswith("trl") else run_align
        result = runner(config, steps, rows, batch, warmup, Path(tmp), source)
    result.update(config=config, peak_rss_bytes=proc_status_bytes("VmHWM"), baseline_rss_bytes=baseline,
                  threads=torch.get_num_threads(), device="cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():  # on a GPU the memory that matters is the allocator's peak
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(result))


def matmul_peak_gflops(dtype_name: str, n: int = 1024, repeats: int = 20) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the peak of the device the runs trained on
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--model", default=Source.model, help="any align model spec (default: the embedded model)")
    parser.add_argument("--data", default=Source.data, help="any SFT data (default: builtin:pig-latin)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--worker")
    parser.add_argument("--json", type=Path, help="also write all results here")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.rows, args.batch, args.warmup, Source(args.model, args.data))
        return

    from align.core.artifacts import machine_info
    from align.core.models import resolve_model

    resolve_model(args.model)  # convert once, outside the timed runs
    results: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        for config in args.configs.split(","):
            proc = subprocess.run([sys.executable, __file__, "--worker", config, "--steps", str(args.steps),
                                   "--rows", str(args.rows), "--batch", str(args.batch), "--warmup", str(args.warmup),
                                   "--model", args.model, "--data", args.data],
                                  capture_output=True, text=True, cwd=ROOT, env={**os.environ, "ALIGNMERGE_QUIET": "1"})
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{config} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(line.removeprefix("RESULT ")))
            print(f"{config:15s} steady {results[-1]['steady_tok_s']:7.1f} tok/s  end-to-end "
                  f"{results[-1]['end_to_end_tok_s']:7.1f} tok/s  peak RSS {results[-1]['peak_rss_bytes'] / 2**30:.2f} GiB",
                  flush=True)
    peaks = {"bfloat16": matmul_peak_gflops("bfloat16"), "float32": matmul_peak_gflops("float32")}
    from align.train.estimate import load_shape

    params = load_shape(args.model).total_params  # tied embeddings counted once
    summary = summarize(results, peaks, params)
    if "align-packed" in args.configs.split(","):
        summary["c_packed_predicted_speedup"] = predicted_packing_speedup(args.rows, args.batch)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "args": vars(args) | {"json": str(args.json)},
                                         "results": results, "summary": summary}, indent=2, default=str))


def predicted_packing_speedup(rows: int, batch: int) -> float:
    """What align's packing decision predicts for align-packed against align-defaults (sdpa, the same rows)."""
    from align.core.data import tokenize_sft_rows
    from align.core.demo import builtin_dataset
    from align.core.models import load_tokenizer, resolve_model
    from align.train.estimate import load_shape, packing_speedup

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    lengths = [len(t["input_ids"]) for t in tokenize_sft_rows(tokenizer, builtin_dataset("pig-latin", "train")[:rows],
                                                              "assistant")]
    return packing_speedup(load_shape("smollm2-135m"), lengths, batch, PACKED_BLOCK, dense_mask=True)


def summarize(results: list[dict[str, Any]], peaks: dict[str, float], params: int) -> dict[str, Any]:
    def mean(config: str, key: str) -> float:
        values = [r[key] for r in results if r["config"] == config]
        return sum(values) / len(values) if values else float("nan")

    out: dict[str, Any] = {"matmul_peak_gflops": peaks}
    for config in {r["config"] for r in results}:
        steady = mean(config, "steady_tok_s")
        out[config] = {
            "steady_tok_s": steady, "end_to_end_tok_s": mean(config, "end_to_end_tok_s"),
            "peak_rss_gib": mean(config, "peak_rss_bytes") / 2**30,
            "mfu_vs_bf16_peak": 6 * params * steady / (peaks["bfloat16"] * 1e9),
            "mfu_vs_fp32_peak": 6 * params * steady / (peaks["float32"] * 1e9),
        }
    for ours, theirs, name in (("align-same", "trl-same", "a_same_settings"),
                               ("align-defaults", "trl-defaults", "b_defaults"),
                               ("align-packed", "align-defaults", "c_packed_vs_unpacked")):
        if ours in out and theirs in out:
            out[name] = {
                "steady_tok_s_ratio": out[ours]["steady_tok_s"] / out[theirs]["steady_tok_s"],
                "end_to_end_tok_s_ratio": out[ours]["end_to_end_tok_s"] / out[theirs]["end_to_end_tok_s"],
                "peak_rss_ratio": out[ours]["peak_rss_gib"] / out[theirs]["peak_rss_gib"],
            }
    return out


if __name__ == "__main__":
    main()
