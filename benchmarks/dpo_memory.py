"""`align dpo` reference modes: peak memory and seconds/step, same model, data, batch and kernels.

  auto        the default: precompute where the data allows it, else adapter (run.json says which and why)
  adapter     the frozen SFT adapter on the same base (one copy of the weights)
  precompute  reference log-probs computed once before training (no reference forward while training)
  model       a separate reference model (a second copy of the weights: the baseline)

On a CPU each mode runs in a fresh subprocess, whose peak RSS (VmHWM) is measured above its own baseline taken after
the imports and before any model loads; on a GPU the figure is `torch.cuda.max_memory_allocated` over the training
loop (reset when training begins). Seconds/step are the median of the steps after the first `--warmup` (steady
state); the one-off load and precompute pass is reported separately. Figures are ratios against the `model` baseline
of the same invocation. Goals: the memory `adapter` saves against `model` is >= 90% of one copy of the weights
(issue 3); `adapter` within 10% of `model` in seconds/step; `precompute` faster per step than both; `auto` <= 0.8x
`model` in seconds/step (issue 14). With `--repeats N` the modes run interleaved N times and every figure is the
median over the repeats. A mode that fails is recorded with its error; the others still run.

Kernels: `--liger off` (the default) runs every mode without Liger, so the modes differ in their reference alone.
With `--liger auto` each mode takes align's own choice, which on CUDA is Liger for auto/adapter/precompute and none
for `model:` (the Trainer patches the policy only): each result records `liger_kernel`, and the comparison is then
not like with like.

    .venv/bin/python benchmarks/dpo_memory.py --steps 12 --batch 8
    .venv/bin/python benchmarks/dpo_memory.py --steps 6 --batch 2 --warmup 1 --repeats 3 --modes auto,model,adapter
    .venv/bin/python benchmarks/dpo_memory.py --model models/llama-1b --data data/hh.jsonl --sft-data data/hh-chat.jsonl

`benchmarks/gpu/suite.py` runs the same modes in-process on the GPU machine (`run_mode`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.core.artifacts import proc_status_bytes  # noqa: E402

MODES = ("auto", "adapter", "precompute", "model")


@dataclass(frozen=True)
class DPOBench:
    """What every mode of one invocation shares."""

    model: str = "smollm2-135m"
    """Any align model spec."""
    data: str = "builtin:pig-latin-prefs"
    """Preference data for DPO."""
    sft_data: str = "builtin:pig-latin"
    """SFT data for the adapter every mode starts from."""
    steps: int = 12
    batch: int = 8
    max_length: int | None = None
    """DPO's max_length (None: align's default)."""
    warmup: int = 2
    liger: Literal["off", "on", "auto"] = "off"
    quantize: Literal["4bit"] | None = None
    """Load the base in NF4 (QLoRA DPO)."""


def step_timer() -> Any:
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.peak_cuda_bytes: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.marks.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.peak_cuda_bytes = torch.cuda.max_memory_allocated()

    return StepTimer()


def liger_setting(liger: str) -> dict[str, Any]:
    """The `train` keys that pin Liger on or off; none for `auto` (align decides)."""
    return {} if liger == "auto" else {"use_liger_kernel": liger == "on"}


def run_mode(mode: str, bench: DPOBench, sft: Path, workdir: Path) -> dict[str, Any]:
    """One DPO run with `--ref mode`, in this process."""
    import shutil

    import torch

    import align.train.dpo as dpo
    from align.core.config import DPORecipe
    from align.train.estimate import plan_from_recipe

    shutil.rmtree(workdir / mode, ignore_errors=True)
    timer = step_timer()
    real = dpo.progress_callback
    dpo.progress_callback = lambda total, enabled=True: timer  # the same hook point as the progress bar
    train: dict[str, Any] = {"max_steps": bench.steps, "per_device_train_batch_size": bench.batch,
                             "save_steps": 10_000, "warmup_steps": 0, **liger_setting(bench.liger)}
    if bench.max_length:
        train["max_length"] = bench.max_length
    recipe = DPORecipe.model_validate({
        "model": {"name": bench.model, "compile": False, "quantize": bench.quantize},
        "adapter": str(sft),
        "ref": f"model:{sft}" if mode == "model" else mode,
        "data": {"path": bench.data, "limit": bench.steps * bench.batch},
        "train": train, "report_to": "none",
        "output": str(workdir / mode),
    })
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        out = dpo.run_dpo(recipe, progress=False)
    finally:
        dpo.progress_callback = real
    record = json.loads((out / "run.json").read_text())
    durations = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    resolved = record["reference"]["mode"]
    plan = plan_from_recipe(recipe, "dpo", "model" if resolved == "model" else resolved)
    return {
        "mode": mode,
        "seconds_per_step": statistics.median(durations[bench.warmup:] or durations),
        "first_step_seconds": durations[0],
        "load_and_precompute_seconds": record["timings_s"]["load_model"],
        "step0_check": record["step0_check"]["passed"],
        "step0_max_deviation": record["step0_check"]["max_deviation"],
        "precision": record["machine_plan"]["precision"],
        "liger_kernel": record["machine_plan"]["liger_kernel"],
        "reference": record["reference"],
        "parameters": record["parameters"]["parameters"],
        "peak_cuda_allocated_bytes": timer.peak_cuda_bytes,
        "predicted_peak_bytes": plan.peak_bytes,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def worker(mode: str, bench: DPOBench, sft: Path, workdir: Path) -> dict[str, Any]:
    """A mode in a fresh subprocess: peak RSS above the process's own baseline after the imports."""
    from align.core.models import resolve_model

    resolve_model(bench.model)  # converts a GGUF once (cached); not part of any footprint
    baseline = proc_status_bytes("VmRSS")
    result = run_mode(mode, bench, sft, workdir)
    peak = proc_status_bytes("VmHWM")
    return {**result, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
            "peak_rss_above_baseline_bytes": peak - baseline}


MEDIAN_KEYS = ("seconds_per_step", "first_step_seconds", "load_and_precompute_seconds", "peak_rss_bytes",
               "peak_rss_above_baseline_bytes", "peak_cuda_allocated_bytes")


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's record with every timing and memory figure replaced by the median over the runs that
    succeeded; a mode with no successful run keeps its first error."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return runs[0]
    merged = dict(done[0])
    for key in MEDIAN_KEYS:
        values = [r[key] for r in done if r.get(key) is not None]
        if values:
            merged[key] = statistics.median(values)
    merged["step0_check"] = all(r["step0_check"] for r in done)
    merged["repeats"] = len(done)
    return merged


def weight_copy(bench: DPOBench) -> dict[str, Any]:
    """One copy of the model's weights as training loads them (`--dtype auto`: bf16 on a GPU, fp32 weights under
    bf16 autocast on a CPU)."""
    from align.core.models import pick_precision
    from align.train.estimate import load_shape

    params = load_shape(bench.model).total_params
    dtype = pick_precision("auto").weights
    return {"parameters": params, "dtype": str(dtype).removeprefix("torch."), "bytes": params * dtype.itemsize}


def make_sft_adapter(bench: DPOBench, workdir: Path) -> Path:
    """A short SFT run: memory and step time depend on the adapter's shape, not on how well it was trained. Liger is
    pinned as the modes pin it: its kernels patch transformers' classes for the whole process."""
    from align.core.config import SFTRecipe
    from align.train.sft import run_sft

    key = hashlib.sha256(f"{bench.model}\n{bench.sft_data}\n{bench.liger}".encode()).hexdigest()[:12]
    out = workdir / f"sft-{key}"
    if (out / "run.json").is_file():
        return out
    return run_sft(SFTRecipe.model_validate({
        "model": {"name": bench.model, "compile": False},
        "data": {"path": bench.sft_data, "limit": 16},
        "train": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "save_steps": 10_000,
                  **({"max_length": bench.max_length} if bench.max_length else {}), **liger_setting(bench.liger)},
        "report_to": "none", "output": str(out), "overwrite": True,
    }), progress=False)


def summarize(results: dict[str, dict[str, Any]], weights: dict[str, Any]) -> dict[str, Any]:
    """Ratios against `model:`: seconds/step per mode, and the memory `adapter` saves as a share of one weight copy
    (the allocator's peak on a GPU, RSS above baseline on a CPU)."""
    summary: dict[str, Any] = {"weights": weights}
    ok = {mode: r for mode, r in results.items() if "error" not in r}
    memory_key = ("peak_cuda_allocated_bytes" if ok and all(r.get("peak_cuda_allocated_bytes") for r in ok.values())
                  else "peak_rss_above_baseline_bytes")
    summary["memory_figure"] = memory_key
    summary["same_kernels"] = len({r["liger_kernel"] for r in ok.values()}) <= 1
    if "model" in ok:
        base = ok["model"]
        for mode, r in ok.items():
            if mode != "model":
                summary[f"{mode}_seconds_per_step_vs_model"] = r["seconds_per_step"] / base["seconds_per_step"]
        if "adapter" in ok:
            saved = base[memory_key] - ok["adapter"][memory_key]
            summary["adapter_saves_bytes"] = saved
            summary["adapter_saves_share_of_one_weight_copy"] = saved / weights["bytes"]
    if "precompute" in ok and "adapter" in ok:
        summary["precompute_seconds_per_step_vs_adapter"] = (ok["precompute"]["seconds_per_step"]
                                                             / ok["adapter"]["seconds_per_step"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DPOBench()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--model", default=defaults.model, help="any align model spec")
    parser.add_argument("--data", default=defaults.data, help="preference data for DPO")
    parser.add_argument("--sft-data", default=defaults.sft_data, help="SFT data for the adapter")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--max-length", type=int, default=None, help="DPO's max_length (default: align's)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--liger", choices=("off", "on", "auto"), default=defaults.liger,
                        help="off: every mode without Liger (like with like); auto: align's choice per mode")
    parser.add_argument("--quantize", choices=("4bit",), default=None, help="QLoRA DPO")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/alignmerge-dpo-bench"))
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--modes", default="adapter,precompute,model", help="Comma-separated, run in this order.")
    parser.add_argument("--repeats", type=int, default=1, help="Interleaved repeats; figures are medians.")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--sft", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    bench = DPOBench(args.model, args.data, args.sft_data, args.steps, args.batch, args.max_length, args.warmup,
                     args.liger, args.quantize)

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, bench, args.sft, args.workdir)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    sft = make_sft_adapter(bench, args.workdir)
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:  # interleaved, so a change in the machine's load touches every mode alike
            command = [sys.executable, __file__, "--worker", mode, "--sft", str(sft), "--workdir", str(args.workdir)]
            for key, value in asdict(bench).items():
                if value is not None:
                    command += [f"--{key.replace('_', '-')}", str(value)]
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:  # recorded; the other modes still run
                runs[mode].append({"mode": mode, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                runs[mode].append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(f"{mode}: {runs[mode][-1]}", file=sys.stderr)
    results = {mode: median_result(found) for mode, found in runs.items()}

    from align.core.artifacts import machine_info

    summary = {"machine": machine_info(), "bench": asdict(bench), "repeats": args.repeats,
               **summarize(results, weight_copy(bench)), "results": results, "runs": runs}
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
