"""`align dpo` reference modes on the embedded model: peak memory and seconds/step, same data and batch.

  auto        the default: precompute where the data allows it, else adapter (run.json says which and why)
  adapter     the frozen SFT adapter on the same base (one copy of the weights)
  precompute  reference log-probs computed once before training (no reference forward while training)
  model       a separate reference model (a second copy of the weights: the baseline)

Each mode runs in a fresh subprocess, whose peak RSS (VmHWM) is measured above its own baseline taken after the
imports and before any model loads; peak GPU memory is added where a GPU is present. Seconds/step are the median
of the steps after the first `--warmup` (steady state); the one-off precompute pass is reported separately.
Figures are ratios against the `model` baseline of the same script. The goals (issue 3): the memory `adapter` saves
against `model` is >= 90% of one copy of the weights; `adapter` within 10% of `model` in seconds/step; `precompute`
faster per step than both; (issue 14) `auto` <= 0.8x `model` in seconds/step. With `--repeats N` the modes run
interleaved N times and every figure is the median over the repeats.

    .venv/bin/python benchmarks/dpo_memory.py --steps 12 --batch 8
    .venv/bin/python benchmarks/dpo_memory.py --steps 6 --batch 2 --warmup 1 --repeats 3 --modes auto,model,adapter
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from align.core.artifacts import proc_status_bytes

ROOT = Path(__file__).resolve().parents[1]
# `--model`, `--data` and `--sft-data` reach the worker subprocesses through these variables (main sets them, the
# workers inherit them), so every mode of one invocation trains the same model on the same data.
SOURCE_DEFAULTS = {"ALIGNMERGE_BENCH_MODEL": "smollm2-135m", "ALIGNMERGE_BENCH_DATA": "builtin:pig-latin-prefs",
                   "ALIGNMERGE_BENCH_SFT_DATA": "builtin:pig-latin"}


def source(name: str) -> str:
    return os.environ.get(name, SOURCE_DEFAULTS[name])
MODES = ("auto", "adapter", "precompute", "model")


def step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.marks.append(time.perf_counter())

    return StepTimer()


def worker(mode: str, sft: Path, steps: int, batch: int, warmup: int, workdir: Path) -> dict[str, Any]:
    import torch

    import align.train.dpo as dpo
    from align.core.config import DPORecipe
    from align.core.models import resolve_model

    resolve_model(source("ALIGNMERGE_BENCH_MODEL"))  # converts a GGUF once (cached); not part of any footprint
    baseline = proc_status_bytes("VmRSS")
    timer = step_timer()
    dpo.progress_callback = lambda total, enabled=True: timer  # the same hook point as the progress bar
    ref = f"model:{sft}" if mode == "model" else mode
    recipe = DPORecipe.model_validate({
        "model": {"name": source("ALIGNMERGE_BENCH_MODEL"), "compile": False},
        "adapter": str(sft),
        "ref": ref,
        "data": {"path": source("ALIGNMERGE_BENCH_DATA"), "limit": steps * batch},
        "train": {"max_steps": steps, "per_device_train_batch_size": batch, "save_steps": 10_000,
                  "warmup_steps": 0},
        "output": str(workdir / mode),
    })
    out = dpo.run_dpo(recipe, progress=False)
    record = json.loads((out / "run.json").read_text())
    durations = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    result = {
        "mode": mode,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": proc_status_bytes("VmHWM"),
        "peak_rss_above_baseline_bytes": proc_status_bytes("VmHWM") - baseline,
        "seconds_per_step": statistics.median(durations[warmup:]),
        "first_step_seconds": durations[0],
        "load_and_precompute_seconds": record["timings_s"]["load_model"],
        "step0_check": record["step0_check"]["passed"],
        "precision": record["machine_plan"]["precision"],
        "reference": record["reference"],
        "parameters": record["parameters"]["parameters"],
    }
    if torch.cuda.is_available():
        result["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's record with every timing and memory figure replaced by the median over the runs."""
    merged = dict(runs[0])
    for key in ("seconds_per_step", "first_step_seconds", "load_and_precompute_seconds", "peak_rss_bytes",
                "peak_rss_above_baseline_bytes", "peak_cuda_allocated_bytes"):
        if key in merged:
            merged[key] = statistics.median(r[key] for r in runs)
    merged["step0_check"] = all(r["step0_check"] for r in runs)
    return merged


def weight_bytes() -> tuple[int, int]:
    """(parameters, bytes) of one copy of the model's weights as training loads them (fp32 under CPU autocast,
    bf16 on a GPU: `--dtype auto`)."""
    from safetensors import safe_open

    from align.core.models import resolve_model

    base = Path(resolve_model(source("ALIGNMERGE_BENCH_MODEL")).base)
    params = nbytes = 0
    for file in base.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                count = 1
                for dim in tensor.get_shape():
                    count *= dim
                params += count
    from align.core.models import pick_precision

    nbytes = params * pick_precision("auto").weights.itemsize
    return params, nbytes


def make_sft_adapter(workdir: Path) -> Path:
    """A short SFT run: memory and step time depend on the adapter's shape, not on how well it was trained."""
    from align.core.config import SFTRecipe
    from align.train.sft import run_sft

    model, data = source("ALIGNMERGE_BENCH_MODEL"), source("ALIGNMERGE_BENCH_SFT_DATA")
    same = (model, data) == (SOURCE_DEFAULTS["ALIGNMERGE_BENCH_MODEL"], SOURCE_DEFAULTS["ALIGNMERGE_BENCH_SFT_DATA"])
    out = workdir / ("sft" if same else "sft-" + hashlib.sha256(f"{model}\n{data}".encode()).hexdigest()[:12])
    if (out / "run.json").is_file():
        return out
    return run_sft(SFTRecipe.model_validate({
        "model": {"name": model, "compile": False},
        "data": {"path": data, "limit": 32},
        "train": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "save_steps": 10_000},
        "output": str(out), "overwrite": True,
    }), progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default=source("ALIGNMERGE_BENCH_MODEL"), help="any align model spec")
    parser.add_argument("--data", default=source("ALIGNMERGE_BENCH_DATA"), help="preference data for DPO")
    parser.add_argument("--sft-data", default=source("ALIGNMERGE_BENCH_SFT_DATA"), help="SFT data for the adapter")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/alignmerge-dpo-bench"))
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--modes", default="adapter,precompute,model", help="Comma-separated, run in this order.")
    parser.add_argument("--repeats", type=int, default=1, help="Interleaved repeats; figures are medians.")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--sft", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(ALIGNMERGE_BENCH_MODEL=args.model, ALIGNMERGE_BENCH_DATA=args.data,
                      ALIGNMERGE_BENCH_SFT_DATA=args.sft_data)

    if args.worker:
        import shutil

        shutil.rmtree(args.workdir / args.worker, ignore_errors=True)
        result = worker(args.worker, args.sft, args.steps, args.batch, args.warmup, args.workdir)
        print("RESULT " + json.dumps(result))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    sft = make_sft_adapter(args.workdir)
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:  # interleaved, so a change in the machine's load touches every mode alike
            command = [sys.executable, __file__, "--worker", mode, "--sft", str(sft), "--steps", str(args.steps),
                       "--batch", str(args.batch), "--warmup", str(args.warmup), "--workdir", str(args.workdir)]
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            runs[mode].append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(f"{mode}: {runs[mode][-1]}", file=sys.stderr)
    results = {mode: median_result(found) for mode, found in runs.items()}

    from align.core.artifacts import machine_info

    params, nbytes = weight_bytes()
    summary: dict[str, Any] = {
        "machine": machine_info(),
        "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
        "weights": {"parameters": params, "fp32_bytes": nbytes},
        "results": results,
        "runs": runs,
    }
    if "model" in results:
        base = results["model"]
        for mode in results:
            if mode != "model":
                summary[f"{mode}_seconds_per_step_vs_model"] = (results[mode]["seconds_per_step"]
                                                                 / base["seconds_per_step"])
        if "adapter" in results:
            saved = base["peak_rss_above_baseline_bytes"] - results["adapter"]["peak_rss_above_baseline_bytes"]
            summary["adapter_saves_bytes"] = saved
            summary["adapter_saves_share_of_one_weight_copy"] = saved / nbytes
    if "precompute" in results and "adapter" in results:
        summary["precompute_seconds_per_step_vs_adapter"] = (results["precompute"]["seconds_per_step"]
                                                             / results["adapter"]["seconds_per_step"])
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
