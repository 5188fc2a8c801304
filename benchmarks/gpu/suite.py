"""Every GPU goal of the project measured in one command (issue 23): `bash benchmarks/gpu/run.sh` on the GPU machine.

The steps run in priority order, each in its own worker process under its own timeout, and every result is written
to `OUT/results.json` and `OUT/summary.md` the moment it arrives, so a run cut short still returns what it measured.
Inside a step the configurations run one after another in the worker (one import and CUDA start per step, not per
configuration); peak memory is `torch.cuda.max_memory_allocated` over each training loop, reset when it begins.
Liger's kernels patch transformers' classes for the whole process, so a step runs its configurations without Liger
first.

  1 sft-1b        SFT, 1B Llama, bs8 L512, HH-style chat: align defaults, TRL defaults, TRL with align's settings;
                  the same without Liger and with packing (sft_throughput.py's configurations)
  2 qlora-1b      `--quantize 4bit` against plain TRL QLoRA with the same settings, and against step 1's bf16 LoRA
  3 dpo-1b        DPO bs4 L512, `--ref auto` / `model:` / `adapter`, 3 interleaved repeats, all without Liger (like
                  with like), then `auto` as users get it (dpo_memory.py's modes); the step-0 check in bf16
  4 estimate      held-out planner points: QLoRA DPO bs4 L512 `--ref adapter`, SFT 3B bs8 L1024; every align run of
                  every step carries the planner's prediction (`align estimate --device cuda`)
  5 memory-short  bs16 L2048 packed on a 60 GiB budget (set_per_process_memory_fraction): the planner's layout and
                  its tokens/s against bs4 x 4
  6 sft-3b        SFT defaults against TRL defaults on the 3B model; MFU against the bf16 matmul peak measured here

    python3 benchmarks/gpu/suite.py --out OUT [--tiny] [--steps sft-1b,dpo-1b] [--budget 480]

`--tiny` runs the same steps, flags and paths on a 2-layer model with 2 optimizer steps each, on any machine (CI's
`tests/test_gpu_suite.py`), so nothing can rot between GPU runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(HERE)]

GiB = 2**30
# Step 5's budget. On an 80 GB card the planner now keeps bs16 L2048 (72 GiB planned), so the case is memory-short
# only below that: at 60 GiB bs16 does not fit and the planner must choose (tests/test_planner_choices.py: 8 x 2).
MEMORY_SHORT_BUDGET = 60 * GiB


@dataclass(frozen=True)
class Scale:
    """The sizes one suite runs at: the GPU grid, or the tiny CPU mode that keeps it from rotting."""

    small_model: str = "llama-1b"
    large_model: str = "llama-3b"
    model_dtype: str = "bfloat16"
    data: tuple[str, str] = ("hh-style-chat", "hh-style")
    """export_data.py sources for the SFT rows and the pairs, when prepare.sh carried none."""
    data_rows: int = 640
    length: int = 512
    sft_batch: int = 8
    sft_rows: int = 160
    sft_steps: int = 16
    warmup: int = 4
    dpo_batch: int = 4
    dpo_steps: int = 8
    dpo_warmup: int = 2
    dpo_repeats: int = 3
    short_batch: int = 16
    short_length: int = 2048
    short_rows: int = 640
    short_steps: int = 5
    large_length: int = 1024
    memory_budget: int | None = MEMORY_SHORT_BUDGET
    matmul_size: int = 8192
    step_timeout_s: int | None = None
    """None: each step's own timeout; the tiny mode allows any CPU its time."""


# Short rows (the built-in demo data) and fp32 weights keep the tiny mode to minutes on an AVX2 CPU without native
# bf16; the steps, configurations, flags and code paths are the GPU run's.
TINY = Scale(small_model="tiny", large_model="tiny", model_dtype="float32",
             data=("builtin:pig-latin", "builtin:pig-latin-prefs"), data_rows=64, length=128, sft_batch=2,
             sft_rows=8, sft_steps=2, warmup=0, dpo_batch=2, dpo_steps=2, dpo_warmup=0, dpo_repeats=1, short_batch=4,
             short_length=256, short_rows=32, short_steps=2, large_length=256, memory_budget=None, matmul_size=256,
             step_timeout_s=900)


@dataclass(frozen=True)
class Paths:
    models: Path
    sft_data: Path
    pairs: Path
    work: Path

    def model(self, shape: str) -> str:
        return str(self.models / shape)


# ---- steps: each a list of named runs, done in order by one worker process ---------------------------------------

Run = tuple[str, Callable[[], dict[str, Any]]]


def sft_runs(names: list[str], bench: Any, paths: Paths, prior: dict[str, dict[str, Any]], tag: str) -> Iterator[Run]:
    import sft_throughput

    from align.train.estimate import load_shape

    for name in names:
        def run(name: str = name) -> dict[str, Any]:
            result = sft_throughput.run_config(name, bench, paths.work / tag, prior)
            prior[name] = result
            return {**result, "bench": asdict(bench), "model_parameters": load_shape(bench.model).total_params}

        yield name, run


def matmul_run(scale: Scale) -> Run:
    import sft_throughput

    return "matmul-peak", lambda: {"bf16_tflops": sft_throughput.matmul_peak_flops("bfloat16", scale.matmul_size) / 1e12,
                                   "size": scale.matmul_size}


def sft_bench(scale: Scale, paths: Paths, model: str, **changes: Any) -> Any:
    import sft_throughput

    bench = sft_throughput.Bench(model=paths.model(model), data=str(paths.sft_data), rows=scale.sft_rows,
                                 batch=scale.sft_batch, max_length=scale.length, steps=scale.sft_steps,
                                 warmup=scale.warmup)
    return replace(bench, **changes)


def step_sft_1b(scale: Scale, paths: Paths) -> Iterator[Run]:
    yield matmul_run(scale)
    bench = sft_bench(scale, paths, scale.small_model)
    prior: dict[str, dict[str, Any]] = {}
    # without Liger first: once a run applies it, transformers' Llama classes stay patched in this process
    yield from sft_runs(["trl-defaults", "align-noliger", "trl-same-noliger", "align-defaults", "trl-same",
                         "align-packed", "trl-same-packed"], bench, paths, prior, "sft-1b")


def step_qlora_1b(scale: Scale, paths: Paths) -> Iterator[Run]:
    yield from sft_runs(["align-qlora", "trl-same-qlora"], sft_bench(scale, paths, scale.small_model), paths, {},
                        "qlora-1b")


def dpo_bench(scale: Scale, paths: Paths, **changes: Any) -> Any:
    import dpo_memory

    return replace(dpo_memory.DPOBench(model=paths.model(scale.small_model), data=str(paths.pairs),
                                       sft_data=str(paths.sft_data), steps=scale.dpo_steps, batch=scale.dpo_batch,
                                       max_length=scale.length,
                                       warmup=scale.dpo_warmup, liger="off"), **changes)


def dpo_run(name: str, mode: str, bench: Any, paths: Paths) -> Run:
    import dpo_memory

    def run() -> dict[str, Any]:
        sft = dpo_memory.make_sft_adapter(bench, paths.work / "dpo")
        return {**dpo_memory.run_mode(mode, bench, sft, paths.work / "dpo" / name), "bench": asdict(bench)}

    return name, run


def step_dpo_1b(scale: Scale, paths: Paths) -> Iterator[Run]:
    bench = dpo_bench(scale, paths)
    for repeat in range(scale.dpo_repeats):  # interleaved, so drift in the machine touches every mode alike
        for mode in ("auto", "model", "adapter"):
            yield dpo_run(f"dpo-{mode}#{repeat + 1}", mode, bench, paths)
    yield dpo_run("dpo-auto-default", "auto", replace(bench, liger="auto"), paths)


def step_estimate(scale: Scale, paths: Paths) -> Iterator[Run]:
    yield dpo_run("qlora-dpo-adapter", "adapter", dpo_bench(scale, paths, quantize="4bit", liger="auto"), paths)
    bench = sft_bench(scale, paths, scale.large_model, max_length=scale.large_length)
    yield from sft_runs(["align-defaults"], bench, paths, {}, "estimate-3b")


def step_memory_short(scale: Scale, paths: Paths) -> Iterator[Run]:
    import torch

    if scale.memory_budget and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, scale.memory_budget / total))
    bench = sft_bench(scale, paths, scale.small_model, batch=scale.short_batch, max_length=scale.short_length,
                      rows=scale.short_rows, steps=scale.short_steps, warmup=1 if scale.short_steps > 2 else 0)
    yield from sft_runs(["align-packed"], bench, paths, {}, "short-bs16")
    yield from sft_runs(["align-packed-split4"], bench, paths, {}, "short-split4")


def step_sft_3b(scale: Scale, paths: Paths) -> Iterator[Run]:
    yield matmul_run(scale)
    bench = sft_bench(scale, paths, scale.large_model)
    yield from sft_runs(["trl-defaults", "align-defaults"], bench, paths, {}, "sft-3b")


@dataclass(frozen=True)
class Step:
    name: str
    runs: Callable[[Scale, Paths], Iterator[Run]]
    plan_s: int
    """Planned wall time on an H200, the worker's start included."""
    timeout_s: int


STEPS = (
    Step("sft-1b", step_sft_1b, 100, 170),
    Step("qlora-1b", step_qlora_1b, 40, 90),
    Step("dpo-1b", step_dpo_1b, 110, 180),
    Step("estimate", step_estimate, 50, 100),
    Step("memory-short", step_memory_short, 50, 100),
    Step("sft-3b", step_sft_3b, 50, 100),
)


# ---- the worker ---------------------------------------------------------------------------------------------------


def work(step: Step, scale: Scale, paths: Paths) -> None:
    """Run a step's configurations in this process; one RESULT line each, an error recorded and the next one run."""
    runs = step.runs(scale, paths)
    while True:
        started = time.perf_counter()
        try:
            name, run = next(runs)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - a step that cannot even set up is recorded, not raised
            emit({"step": step.name, "run": "setup", "error": describe(exc)})
            return
        try:
            result = run()
        except Exception as exc:  # noqa: BLE001 - one configuration's failure must not cost the others
            traceback.print_exc()
            result = {"error": describe(exc)}
        finally:
            cleanup()
        emit({"step": step.name, "run": name, "wall_s": time.perf_counter() - started, **result})


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]


def cleanup() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def emit(result: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(result, default=str), flush=True)


# ---- the driver ---------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    import torch

    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes",
                    "liger-kernel", "triton", "pydantic"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    env: dict[str, Any] = {"python": platform.python_version(), "versions": versions, "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, device_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        env["device"] = "cpu"
    return env


def prepare(scale: Scale, work: Path, carry: Path) -> Paths:
    """Models drawn at random (on the GPU when there is one) with SmolLM2's tokenizer; HH-style data carried by
    prepare.sh, or written here when nothing was carried."""
    import torch

    import export_data
    import make_model

    paths = Paths(models=work / "models", sft_data=carry / "data" / "sft.jsonl", pairs=carry / "data" / "pairs.jsonl",
                  work=work / "runs")
    tokenizer = str(carry / "tokenizer") if (carry / "tokenizer").is_dir() else make_model.tokenizer_source(None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in dict.fromkeys((scale.small_model, scale.large_model)):
        if not (paths.models / shape / "config.json").is_file():
            make_model.build(shape, tokenizer, paths.models / shape, dtype=scale.model_dtype, device=device)
    if not paths.sft_data.is_file():
        paths = replace(paths, sft_data=work / "data" / "sft.jsonl", pairs=work / "data" / "pairs.jsonl")
        paths.sft_data.parent.mkdir(parents=True, exist_ok=True)
        for path, source in zip((paths.sft_data, paths.pairs), scale.data):
            if not path.is_file():
                rows = export_data.rows_of(source, "train", scale.data_rows, 0)
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


class Record:
    """results.json and summary.md, rewritten whole after every result (each write atomic), so that whatever
    stops the suite, both hold everything measured until then."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {**header, "steps": {}, "results": []}

    def add(self, result: dict[str, Any]) -> None:
        self.data["results"].append(result)
        self.save()

    def step(self, name: str, **status: Any) -> None:
        self.data["steps"].setdefault(name, {}).update(status)
        self.save()

    def save(self) -> None:
        from suite_report import render

        for name, text in (("results.json", json.dumps(self.data, indent=1, default=str)),
                           ("summary.md", render(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)


def run_step(step: Step, args: argparse.Namespace, record: Record, timeout: float, log: Any) -> None:
    """One step's worker under its timeout, each RESULT line recorded as it comes."""
    command = [sys.executable, __file__, "--worker", step.name, "--out", str(args.out), "--carry", str(args.carry),
               "--work", str(args.work), *(["--tiny"] if args.tiny else [])]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
                            env={**os.environ, "ALIGNMERGE_QUIET": "1", "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    deadline = started + timeout
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    status = "done"
    buffered = ""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            os.killpg(proc.pid, 9)
            status = f"timed out after {timeout:.0f} s"
            break
        if not selector.select(timeout=min(left, 5)):
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
        if not chunk:
            break
        buffered += chunk
        *lines, buffered = buffered.split("\n")
        for line in lines:
            if line.startswith("RESULT "):
                record.add(json.loads(line.removeprefix("RESULT ")))
                print(f"  {record.data['results'][-1].get('run')}: "
                      f"{'error ' + record.data['results'][-1]['error'] if 'error' in record.data['results'][-1] else 'ok'}",
                      flush=True)
    code = proc.wait()
    if status == "done" and code != 0:
        status = f"worker exited with status {code}"
    record.step(step.name, status=status, wall_s=round(time.perf_counter() - started, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="summary.md, results.json and log.txt go here")
    parser.add_argument("--carry", type=Path, default=ROOT / ".gpu-carry", help="prepare.sh's folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/alignmerge-gpu-suite"),
                        help="models, data and run outputs (a 3B model is 6.4 GB)")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer CPU mode (CI)")
    parser.add_argument("--steps", help=f"a subset, comma-separated, from {', '.join(s.name for s in STEPS)}")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps; a step whose plan no "
                                                                    "longer fits is skipped and recorded so")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    scale = TINY if args.tiny else Scale()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        step = next(s for s in STEPS if s.name == args.worker)
        work(step, scale, prepare(scale, args.work, args.carry))
        return

    began = time.perf_counter()
    steps = [s for s in STEPS if not args.steps or s.name in args.steps.split(",")]
    record = Record(args.out, {"environment": environment(), "scale": asdict(scale), "tiny": args.tiny})
    with (args.out / "log.txt").open("a") as log:
        print("preparing models and data", flush=True)
        prepare(scale, args.work, args.carry)
        cleanup()  # the models were drawn on the GPU: give the memory back before the workers start
        record.step("prepare", status="done", wall_s=round(time.perf_counter() - began, 1))
        for step in steps:
            left = args.budget - (time.perf_counter() - began)
            if scale.step_timeout_s is None and left < step.plan_s:
                record.step(step.name, status=f"skipped: {left:.0f} s left of the budget, planned {step.plan_s} s")
                continue
            timeout = scale.step_timeout_s or min(step.timeout_s, left)
            print(f"step {step.name} (plan {step.plan_s} s, timeout {timeout:.0f} s)", flush=True)
            run_step(step, args, record, timeout, log)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
