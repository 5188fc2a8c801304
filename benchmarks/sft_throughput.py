"""`align sft` against plain TRL `SFTTrainer`: same model, same data, same LoRA, one script.

Configurations (`CONFIGS`; each `trl-same*` copies the trainer arguments its align run recorded in run.json, so it
must come after that run in `--configs`):

  trl-defaults       plain TRL, its own defaults for everything a run does not need (gradient checkpointing on, the
                     checkpoint's dtype, no packing, no Liger)
  align-defaults     `align sft` as a user runs it: the machine plan decides precision, checkpointing, micro-batch,
                     packing and Liger
  trl-same           plain TRL with align-defaults' recorded arguments (precision, checkpointing, packing, Liger,
                     optimizer, schedule, max length): what is left to differ is who prepares the data (align
                     tokenizes itself with loss on every assistant turn; TRL's prompt-completion path, loss on the
                     last turn; the token sequences are the same)
  align-noliger      align-defaults with `train.use_liger_kernel=false`; trl-same-noliger copies it
  align-packed       align-defaults with `--packing` (blocks of --max-length tokens); trl-same-packed copies it
  align-qlora        align-defaults with `--quantize 4bit`; trl-same-qlora copies it and loads the same NF4 config
  align-packed-split4  align-packed in micro-batches of a quarter of --batch, 4 accumulation steps

Comparisons (`COMPARISONS`) are ratios of steady tokens/s and peak memory between two configurations of the same
invocation, each with what differs between its two sides. Goals: align-defaults >= 3x trl-defaults (issue 23; 2x
on a CPU, issue 2), align-defaults >= 1.0x trl-same.

Tokens/s counts non-padding tokens (the Trainer's `num_input_tokens_seen` with "non_padding"), steady over the steps
after `--warmup`, end to end including building the trainer. Peak memory: `torch.cuda.max_memory_allocated` from the
start of training on a GPU, peak RSS of the process (a fresh subprocess per configuration) on a CPU. MFU uses the
usual 6*N FLOPs per token (forward 2N, backward 4N; LoRA skips the frozen weights' gradients, so it overstates the
work by up to a third) against the device's matmul peak measured in the same invocation (8192^3 on a GPU).

    .venv/bin/python benchmarks/sft_throughput.py --steps 60 --repeats 2
    .venv/bin/python benchmarks/sft_throughput.py --model models/llama-1b --data data/hh-chat.jsonl --max-length 512 \\
        --configs trl-defaults,align-defaults,trl-same,align-packed

`benchmarks/gpu/suite.py` runs the same configurations in-process on the GPU machine (`run_config`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.core.artifacts import proc_status_bytes  # noqa: E402


@dataclass(frozen=True)
class Bench:
    """What every configuration of one invocation shares: `--model` (any align model spec, e.g.
    benchmarks/make_model.py's output), `--data` (any SFT data align reads) and the run's shape."""

    model: str = "smollm2-135m"
    data: str = "builtin:pig-latin"
    rows: int = 1024
    batch: int = 8
    max_length: int = 1024
    steps: int = 60
    warmup: int = 10


@dataclass(frozen=True)
class SFTRun:
    side: Literal["align", "trl"]
    model: dict[str, Any] = field(default_factory=dict)
    """align's `model` section beyond the defaults (quantize, gradient_checkpointing, ...)."""
    train: dict[str, Any] = field(default_factory=dict)
    """align's `train` section beyond the shared settings."""
    same_as: str | None = None
    """TRL: run with the trainer arguments and model loading this align configuration recorded."""
    split: int = 1
    """Micro-batches per optimizer step: --batch / split per micro-batch, the same effective batch."""


CONFIGS: dict[str, SFTRun] = {
    "trl-defaults": SFTRun("trl"),
    "align-defaults": SFTRun("align"),
    "trl-same": SFTRun("trl", same_as="align-defaults"),
    "align-noliger": SFTRun("align", train={"use_liger_kernel": False}),
    "trl-same-noliger": SFTRun("trl", same_as="align-noliger"),
    "align-packed": SFTRun("align", train={"packing": True}),
    "trl-same-packed": SFTRun("trl", same_as="align-packed"),
    "align-qlora": SFTRun("align", model={"quantize": "4bit"}),
    "trl-same-qlora": SFTRun("trl", same_as="align-qlora"),
    # a quarter of --batch per micro-batch, 4 accumulation steps: issue 14's 4 x 4 for a batch of 16 that does not
    # fit, the alternative to the planner's choice
    "align-packed-split4": SFTRun("align", train={"packing": True}, split=4),
}
DEFAULT_CONFIGS = ("trl-defaults", "align-defaults", "trl-same")

# (name, ours, theirs, what differs between the two sides)
COMPARISONS = (
    ("same_settings", "align-defaults", "trl-same", "who prepares the data (align's tokenization vs TRL's "
     "prompt-completion path); every trainer argument, the dtype and the LoRA are align-defaults' own"),
    ("defaults", "align-defaults", "trl-defaults", "everything each tool picks by default (align: its machine plan; "
     "TRL: gradient checkpointing, no packing, no Liger); batch, max length, LoRA and data are the same"),
    ("same_settings_noliger", "align-noliger", "trl-same-noliger", "as same_settings, both without Liger"),
    ("liger", "align-defaults", "align-noliger", "Liger's fused RMSNorm/RoPE/SwiGLU kernels only"),
    ("packed_vs_unpacked", "align-packed", "align-defaults", "padding-free packing (blocks of max_length) only"),
    ("same_settings_packed", "align-packed", "trl-same-packed", "as same_settings, both packed"),
    ("qlora_same_settings", "align-qlora", "trl-same-qlora", "as same_settings, both on an NF4 base"),
    ("qlora_vs_bf16_lora", "align-qlora", "align-defaults", "the NF4 base (4-bit weights, bf16 compute) only"),
)


def step_timer() -> Any:
    """Marks (time, tokens seen) at every optimizer step; on a GPU also the allocator's peak over the training loop
    (reset when training begins, so the load's transient copies are not counted)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []
            self.peak_cuda_bytes: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.peak_cuda_bytes = torch.cuda.max_memory_allocated()

    return StepTimer()


def rates(marks: list[tuple[float, int]], start: float, warmup: int) -> dict[str, float]:
    end_time, end_tokens = marks[-1]
    warm_time, warm_tokens = marks[min(warmup, len(marks) - 2)]
    return {
        "tokens": end_tokens,
        "end_to_end_tok_s": end_tokens / (end_time - start),
        "steady_tok_s": (end_tokens - warm_tokens) / (end_time - warm_time),
        "steps_timed": len(marks),
        "seconds": end_time - start,
    }


def prompt_completion_rows(bench: Bench) -> list[dict[str, Any]]:
    """The data as TRL's prompt-completion rows: the conversation up to its last turn, and that turn."""
    from align.core.data import load_sft_data

    data, _, _ = load_sft_data(bench.data, limit=bench.rows)
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in data]


def trl_arguments(run: SFTRun, bench: Bench, workdir: Path, prior: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """SFTConfig keywords: TRL's defaults beyond what any run needs, or the align run's recorded arguments."""
    import torch

    timing = dict(output_dir=str(workdir), report_to="none", save_strategy="no", disable_tqdm=True,
                  logging_steps=1, include_num_input_tokens_seen="non_padding")
    if run.same_as is None:
        return dict(max_steps=bench.steps, per_device_train_batch_size=bench.batch, max_length=bench.max_length,
                    seed=0, learning_rate=2e-4, use_cpu=not torch.cuda.is_available(), **timing)
    if run.same_as not in prior:
        raise RuntimeError(f"copies {run.same_as}'s recorded arguments: run {run.same_as} first")
    return {**prior[run.same_as]["trainer_args"], **timing}


def trl_model(run: SFTRun, bench: Bench, prior: dict[str, dict[str, Any]]) -> Any:
    """The model as plain TRL users load it: the checkpoint's dtype (TRL's default), or the align run's dtype and
    quantization."""
    from transformers import AutoModelForCausalLM

    from align.core.models import pick_precision, quantization_config, resolve_model

    base = resolve_model(bench.model).base
    if run.same_as is None:
        return AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    recorded = prior[run.same_as]["recipe"]["model"]
    precision = pick_precision(recorded["dtype"])
    kwargs: dict[str, Any] = {"dtype": precision.weights, "attn_implementation": recorded["attn"]}
    import torch

    quantization = quantization_config(recorded["quantize"], torch.bfloat16 if precision.bf16_autocast
                                       else precision.weights)
    if quantization is not None:
        kwargs.update(quantization_config=quantization,
                      device_map={"": "cuda:0" if torch.cuda.is_available() else "cpu"})
    return AutoModelForCausalLM.from_pretrained(base, **kwargs)


def run_trl(run: SFTRun, bench: Bench, workdir: Path, prior: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from align.core.models import load_tokenizer, resolve_model

    args = SFTConfig(**trl_arguments(run, bench, workdir, prior))
    lora = prior[run.same_as]["recipe"]["lora"] if run.same_as else {"r": 16, "alpha": 32, "dropout": 0.05,
                                                                       "target_modules": "all-linear"}
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"] or 2 * lora["r"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    timer = step_timer()
    start = time.perf_counter()
    model = trl_model(run, bench, prior)
    autocast = " + bf16 autocast" if args.bf16 and model.dtype != torch.bfloat16 else ""
    precision = str(model.dtype).removeprefix("torch.") + autocast
    trainer = SFTTrainer(model=model, args=args,
                         train_dataset=Dataset.from_list(prompt_completion_rows(bench)),
                         processing_class=load_tokenizer(resolve_model(bench.model)), peft_config=peft_config,
                         callbacks=[timer])
    trainer.train()
    flag = "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"
    return {**rates(timer.marks, start, bench.warmup), "peak_cuda_bytes": timer.peak_cuda_bytes, "settings": {
        "precision": precision, "bf16": args.bf16, "gradient_checkpointing": bool(getattr(args, flag)), "torch_compile": args.torch_compile,
        "packing": args.packing, "liger_kernel": args.use_liger_kernel,
        "batch": (args.per_device_train_batch_size, args.gradient_accumulation_steps),
        "optim": str(getattr(args.optim, "value", args.optim))}}


def run_align(run: SFTRun, bench: Bench, workdir: Path) -> dict[str, Any]:
    import align.train.sft as sft
    from align.core.config import SFTRecipe
    from align.train.estimate import plan_from_recipe

    timer = step_timer()
    real = sft.progress_callback
    sft.progress_callback = lambda total, enabled=True: timer  # same hook point, no bar
    train = {"max_steps": bench.steps, "per_device_train_batch_size": max(1, bench.batch // run.split),
             "max_length": bench.max_length, "save_steps": 10**6, **run.train}
    if run.split > 1:
        train["gradient_accumulation_steps"] = run.split
    recipe = SFTRecipe.model_validate({"model": {"name": bench.model, **run.model},
                                       "data": {"path": bench.data, "limit": bench.rows},
                                       "lora": {"r": 16}, "train": train, "report_to": "none",
                                       "output": str(workdir / "out"), "overwrite": True})
    start = time.perf_counter()
    try:
        out = sft.run_sft(recipe, progress=False)
    finally:
        sft.progress_callback = real
    record = json.loads((out / "run.json").read_text())
    plan = plan_from_recipe(recipe, "sft")
    plan_settings = record["machine_plan"]
    return {**rates(timer.marks, start, bench.warmup), "peak_cuda_bytes": timer.peak_cuda_bytes,
            "settings": {**plan_settings, "optim": record["trainer_args"].get("optim")},
            "trainer_args": record["trainer_args"], "recipe": record["recipe"],
            "predicted_peak_bytes": plan.peak_bytes, "predicted_layout": plan.layout or None}


def run_config(name: str, bench: Bench, workdir: Path, prior: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One configuration, in this process. `prior`: earlier results of the invocation, by configuration name."""
    import torch

    run = CONFIGS[name]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
    allocated_before = torch.cuda.memory_allocated() if cuda else None
    result = (run_align(run, bench, workdir / name) if run.side == "align"
              else run_trl(run, bench, workdir / name, prior))
    result.update(config=name, device="cuda" if cuda else "cpu", threads=torch.get_num_threads(),
                  allocated_before_bytes=allocated_before)
    return result


def worker(name: str, bench: Bench, prior: dict[str, dict[str, Any]]) -> None:
    """A configuration in a fresh subprocess, so that its peak RSS is its own."""
    baseline = proc_status_bytes("VmHWM")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_config(name, bench, Path(tmp), prior)
    result.update(peak_rss_bytes=proc_status_bytes("VmHWM"), baseline_rss_bytes=baseline)
    print("RESULT " + json.dumps(result))


def matmul_peak_flops(dtype_name: str, n: int | None = None) -> float:
    """The device's dense matmul rate in FLOP/s: n^3 products, by default 8192 on a GPU (1024 understates an
    H100/H200 and so overstates MFU) and 1024 on a CPU (which saturates far sooner); the mean of 10 products after
    3 warm-ups."""
    import torch

    cuda = torch.cuda.is_available()
    n = n or (8192 if cuda else 1024)
    repeats = 10
    dtype = getattr(torch, dtype_name)
    device = "cuda" if cuda else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        began = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = time.perf_counter() - began
    return 2 * n**3 * repeats / seconds


def predicted_packing_speedup(bench: Bench) -> float:
    """What align's packing decision predicts for align-packed against align-defaults with sdpa, on this
    invocation's model, data, batch and max length."""
    from align.core.data import load_sft_data, tokenize_sft_rows
    from align.core.models import load_tokenizer, resolve_model
    from align.train.estimate import load_shape, packing_speedup

    tokenizer = load_tokenizer(resolve_model(bench.model))
    rows, _, _ = load_sft_data(bench.data, limit=bench.rows)
    lengths = [min(len(t["input_ids"]), bench.max_length) for t in tokenize_sft_rows(tokenizer, rows, "assistant")]
    return packing_speedup(load_shape(bench.model), lengths, bench.batch, bench.max_length, dense_mask=True)


def mean(results: list[dict[str, Any]], config: str, key: str) -> float | None:
    values = [r[key] for r in results if r.get("config") == config and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def summarize(results: list[dict[str, Any]], peak_flops: float, params: int) -> dict[str, Any]:
    """Per configuration: mean steady and end-to-end tokens/s, peak memory, MFU; then every comparison whose two
    sides both ran."""
    out: dict[str, Any] = {"matmul_peak_tflops": peak_flops / 1e12, "parameters": params}
    for config in dict.fromkeys(r["config"] for r in results if "config" in r):
        steady = mean(results, config, "steady_tok_s")
        out[config] = {"steady_tok_s": steady, "end_to_end_tok_s": mean(results, config, "end_to_end_tok_s"),
                       "peak_cuda_gib": (mean(results, config, "peak_cuda_bytes") or 0) / 2**30 or None,
                       "peak_rss_gib": (mean(results, config, "peak_rss_bytes") or 0) / 2**30 or None,
                       "mfu": 6 * params * steady / peak_flops if steady else None}
    for name, ours, theirs, differs in COMPARISONS:
        if ours in out and theirs in out:
            memory = "peak_cuda_gib" if out[ours]["peak_cuda_gib"] and out[theirs]["peak_cuda_gib"] else "peak_rss_gib"
            ratio = (lambda key: out[ours][key] / out[theirs][key] if out[ours][key] and out[theirs][key] else None)
            out[name] = {"ours": ours, "theirs": theirs, "differs": differs,
                         "steady_tok_s_ratio": ratio("steady_tok_s"),
                         "end_to_end_tok_s_ratio": ratio("end_to_end_tok_s"), f"{memory}_ratio": ratio(memory)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Bench()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--rows", type=int, default=defaults.rows)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--max-length", type=int, default=defaults.max_length,
                        help="every configuration's max_length (and packed block size)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--model", default=defaults.model, help="any align model spec (default: the embedded model)")
    parser.add_argument("--data", default=defaults.data, help="any SFT data (default: builtin:pig-latin)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--prior", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write all results here")
    args = parser.parse_args()
    bench = Bench(args.model, args.data, args.rows, args.batch, args.max_length, args.steps, args.warmup)
    if args.worker:
        worker(args.worker, bench, json.loads(args.prior.read_text()) if args.prior else {})
        return

    from align.core.artifacts import machine_info
    from align.core.models import resolve_model
    from align.train.estimate import load_shape

    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration(s) {unknown}: choose from {', '.join(CONFIGS)}")
    resolve_model(args.model)  # convert once, outside the timed runs
    results: list[dict[str, Any]] = []
    latest: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prior_file = Path(tmp) / "prior.json"
        for _ in range(args.repeats):
            for config in configs:
                prior_file.write_text(json.dumps(latest))
                command = [sys.executable, __file__, "--worker", config, "--prior", str(prior_file)]
                for key, value in asdict(bench).items():
                    command += [f"--{key.replace('_', '-')}", str(value)]
                proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                      env={**os.environ, "ALIGNMERGE_QUIET": "1"})
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:  # keep the other configurations' results
                    results.append({"config": config, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
                    print(f"{config:18s} failed: {results[-1]['error']}", flush=True)
                    continue
                results.append(json.loads(line.removeprefix("RESULT ")))
                latest[config] = results[-1]
                memory = (f"peak CUDA {results[-1]['peak_cuda_bytes'] / 2**30:.2f} GiB" if results[-1]["peak_cuda_bytes"]
                          else f"peak RSS {results[-1]['peak_rss_bytes'] / 2**30:.2f} GiB")
                print(f"{config:18s} steady {results[-1]['steady_tok_s']:9.1f} tok/s  end-to-end "
                      f"{results[-1]['end_to_end_tok_s']:9.1f} tok/s  {memory}", flush=True)
    summary = summarize(results, matmul_peak_flops("bfloat16"), load_shape(args.model).total_params)
    if any(CONFIGS[c].train.get("packing") for c in configs):
        summary["packed_vs_unpacked_predicted"] = predicted_packing_speedup(bench)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "bench": asdict(bench), "results": results,
                                         "summary": summary}, indent=2, default=str))


if __name__ == "__main__":
    main()
