"""summary.md of the GPU suite: every step's figures and the issue's goals, from whatever results.json holds so far
(a run cut short renders what it measured; a missing figure reads "not measured")."""

from __future__ import annotations

import statistics
from typing import Any

GiB = 2**30
NOT_MEASURED = "not measured"


def render(data: dict[str, Any]) -> str:
    results = data["results"]
    sections = [header(data), sft_section(results), qlora_section(results), dpo_section(results),
                planner_section(results), memory_short_section(results), large_section(results)]
    return "\n\n".join(sections) + "\n"


# ---- lookups and formats ------------------------------------------------------------------------------------------


def find(results: list[dict[str, Any]], step: str, run: str) -> dict[str, Any] | None:
    """The last successful result of a run (None when it failed or never ran)."""
    found = [r for r in results if r.get("step") == step and r.get("run") == run and "error" not in r]
    return found[-1] if found else None


def number(value: float | None, digits: int = 1) -> str:
    return NOT_MEASURED if value is None else f"{value:,.{digits}f}"


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def verdict(value: float | None, goal: str, met: bool | None) -> str:
    if value is None or met is None:
        return f"{goal}: {NOT_MEASURED}"
    return f"{goal}: {'met' if met else '**not met**'}"


def gib(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value / GiB:.2f}"


def peak_bytes(result: dict[str, Any]) -> int | None:
    return result.get("peak_cuda_bytes") or result.get("peak_cuda_allocated_bytes")


def failures(results: list[dict[str, Any]], step: str) -> list[str]:
    return [f"- `{r['run']}` failed: {r['error']}" for r in results if r.get("step") == step and "error" in r]


def matmul_peak(results: list[dict[str, Any]]) -> float | None:
    """The highest bf16 matmul rate measured in this call, in FLOP/s (the higher, the more conservative the MFU)."""
    peaks = [r["bf16_tflops"] * 1e12 for r in results if r.get("run") == "matmul-peak" and "error" not in r]
    return max(peaks) if peaks else None


def mfu(result: dict[str, Any], peak: float | None) -> float | None:
    if peak is None or not result.get("steady_tok_s") or not result.get("model_parameters"):
        return None
    return 6 * result["model_parameters"] * result["steady_tok_s"] / peak


# ---- sections -----------------------------------------------------------------------------------------------------


def header(data: dict[str, Any]) -> str:
    env = data["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    memory = f", {env['device_memory_bytes'] / GiB:.1f} GiB" if env.get("device_memory_bytes") else ""
    lines = [f"# GPU suite (issue 23){' - TINY CPU MODE, no figure here is a GPU figure' if data['tiny'] else ''}",
             "", f"Device: {env['device']}{memory}; CUDA {env.get('cuda')}; Python {env['python']}; {versions}.",
             "", "| step | status | wall s |", "|---|---|---:|"]
    for name, status in data["steps"].items():
        lines.append(f"| {name} | {status.get('status', 'running')} | {status.get('wall_s', '')} |")
    return "\n".join(lines)


def settings_cells(result: dict[str, Any]) -> str:
    s = result.get("settings", {})
    precision = s.get("precision") or ("bf16" if s.get("bf16") else "fp32/checkpoint dtype")
    batch = s.get("batch") or (s.get("micro_batch") or (result["bench"]["batch"], 1))
    return (f"{precision} | {'on' if s.get('gradient_checkpointing') else 'off'} | "
            f"{'on' if s.get('packing') else 'off'} | {'on' if s.get('liger_kernel') else 'off'} | "
            f"{batch[0]}x{batch[1]}")


SFT_TABLE = ("| run | precision | checkpointing | packing | Liger | batch x accum | steady tok/s | end-to-end tok/s "
             "| peak GiB | MFU (6N) |\n|---|---|---|---|---|---|---:|---:|---:|---:|")


def sft_rows(results: list[dict[str, Any]], step: str, peak: float | None) -> list[str]:
    rows = []
    for r in results:
        if r.get("step") != step or r.get("run") == "matmul-peak" or "error" in r:
            continue
        share = mfu(r, peak)
        rows.append(f"| {r['run']} | {settings_cells(r)} | {number(r['steady_tok_s'])} | "
                    f"{number(r['end_to_end_tok_s'])} | {gib(peak_bytes(r))} | "
                    f"{NOT_MEASURED if share is None else f'{share:.1%}'} |")
    return rows


def sft_section(results: list[dict[str, Any]]) -> str:
    from sft_throughput import COMPARISONS

    peak = matmul_peak(results)
    lines = ["## 1. SFT, 1B Llama, bs8 L512, HH-style chat (`sft-1b`)", "", SFT_TABLE,
             *sft_rows(results, "sft-1b", peak), *failures(results, "sft-1b"), "",
             "| comparison | steady tok/s ratio | peak memory ratio | what differs | goal |", "|---|---:|---:|---|---|"]
    goals = {"defaults": 3.0, "same_settings": 1.0}
    for name, ours, theirs, differs in COMPARISONS:
        a, b = find(results, "sft-1b", ours), find(results, "sft-1b", theirs)
        if name.startswith("qlora") or (a is None and b is None):
            continue
        speed = ratio(a and a["steady_tok_s"], b and b["steady_tok_s"])
        memory = ratio(a and peak_bytes(a), b and peak_bytes(b))
        goal = goals.get(name)
        judged = verdict(speed, f">= {goal}x", speed >= goal if speed is not None else None) if goal else ""
        lines.append(f"| {ours} / {theirs} | {number(speed, 3)} | {number(memory, 3)} | {differs} | {judged} |")
    return "\n".join(lines)


def qlora_section(results: list[dict[str, Any]]) -> str:
    ours, theirs = find(results, "qlora-1b", "align-qlora"), find(results, "qlora-1b", "trl-same-qlora")
    bf16 = find(results, "sft-1b", "align-defaults")
    lines = ["## 2. QLoRA, 1B, bs8 L512 (`qlora-1b`)", "", SFT_TABLE, *sft_rows(results, "qlora-1b", None),
             *failures(results, "qlora-1b"), ""]
    vs_trl = ratio(ours and peak_bytes(ours), theirs and peak_bytes(theirs))
    vs_bf16 = ratio(ours and peak_bytes(ours), bf16 and peak_bytes(bf16))
    speed = ratio(ours and ours["steady_tok_s"], theirs and theirs["steady_tok_s"])
    lines += [f"- peak, align QLoRA / TRL QLoRA (same settings): {number(vs_trl, 3)} "
              f"({verdict(vs_trl, '<= 1.0', vs_trl <= 1.0 if vs_trl is not None else None)})",
              f"- peak, align QLoRA / align bf16 LoRA (step 1's align-defaults, same settings but the base): "
              f"{number(vs_bf16, 3)} ({verdict(vs_bf16, 'clearly below 1', vs_bf16 < 0.9 if vs_bf16 is not None else None)})",
              f"- steady tok/s, align QLoRA / TRL QLoRA: {number(speed, 3)} "
              f"({verdict(speed, '>= 1.0', speed >= 1.0 if speed is not None else None)})"]
    return "\n".join(lines)


def dpo_section(results: list[dict[str, Any]]) -> str:
    lines = ["## 3. DPO, 1B, bs4 L512, HH-style pairs (`dpo-1b`)", "",
             "| `--ref` | ran as | Liger | repeats | s/step (median) | each repeat | peak GiB (median) | "
             "load + precompute s | step-0 check (max deviation) |", "|---|---|---|---:|---:|---|---:|---:|---|"]
    medians: dict[str, float] = {}
    peaks: dict[str, float] = {}
    for mode in ("auto", "model", "adapter", "auto-default"):
        runs = [r for r in results if r.get("step") == "dpo-1b" and "error" not in r
                and r["run"].split("#")[0] == f"dpo-{mode}"]
        if not runs:
            lines.append(f"| {mode} | | | 0 | {NOT_MEASURED} | | | | |")
            continue
        medians[mode] = statistics.median(r["seconds_per_step"] for r in runs)
        measured = [peak_bytes(r) for r in runs if peak_bytes(r)]
        if measured:
            peaks[mode] = statistics.median(measured)
        checks = ", ".join(f"{'passed' if r['step0_check'] else 'FAILED'} ({r['step0_max_deviation']:.1e})"
                           for r in runs)
        each = ", ".join(f"{r['seconds_per_step']:.3f}" for r in runs)
        lines.append(f"| {mode} | {runs[0]['reference']['mode']} | {'on' if runs[0]['liger_kernel'] else 'off'} | "
                     f"{len(runs)} | {medians[mode]:.3f} | {each} | "
                     f"{gib(peaks.get(mode))} | {statistics.median(r['load_and_precompute_seconds'] for r in runs):.1f} "
                     f"| {checks} |")
    lines += failures(results, "dpo-1b")
    auto = ratio(medians.get("auto"), medians.get("model"))
    adapter = ratio(medians.get("adapter"), medians.get("model"))
    lines += ["", f"- s/step, auto / model: (same kernels, no Liger): {number(auto, 3)} "
                  f"({verdict(auto, '<= 0.8', auto <= 0.8 if auto is not None else None)})",
              f"- s/step, adapter / model: {number(adapter, 3)}"]
    weights = next((r for r in results if r.get("step") == "dpo-1b" and r.get("run", "").startswith("dpo-model")
                    and "error" not in r), None)
    if "model" in peaks and "adapter" in peaks and weights:
        copy = weights["parameters"] * 2  # bf16 weights (--dtype auto on a GPU); the adapter is a rounding error
        lines.append(f"- peak memory adapter saves against model: {(peaks['model'] - peaks['adapter']) / GiB:.2f} GiB "
                     f"= {(peaks['model'] - peaks['adapter']) / copy:.0%} of one bf16 weight copy")
    return "\n".join(lines)


def planner_section(results: list[dict[str, Any]]) -> str:
    lines = ["## 4. `align estimate --device cuda` against each measured peak (`estimate` adds held-out points)", "",
             "| step | run | predicted GiB | measured GiB | error |", "|---|---|---:|---:|---:|"]
    errors = []
    for r in results:
        if "error" in r or not r.get("predicted_peak_bytes"):
            continue
        measured = peak_bytes(r)
        error = ratio(r["predicted_peak_bytes"], measured)
        if error is not None:
            errors.append(error - 1)
        lines.append(f"| {r['step']} | {r['run']} | {gib(r['predicted_peak_bytes'])} | {gib(measured)} | "
                     f"{NOT_MEASURED if error is None else f'{error - 1:+.1%}'} |")
    lines += failures(results, "estimate")
    worst = max(errors, key=abs) if errors else None
    lines += ["", f"- worst error: {NOT_MEASURED if worst is None else f'{worst:+.1%}'} "
                  f"({verdict(worst, 'within +-15% everywhere', abs(worst) <= 0.15 if worst is not None else None)})"]
    return "\n".join(lines)


def memory_short_section(results: list[dict[str, Any]]) -> str:
    chosen, fixed = find(results, "memory-short", "align-packed"), find(results, "memory-short", "align-packed-split4")
    lines = ["## 5. The memory-short case: bs16 L2048 packed on a 60 GiB budget (`memory-short`)", "", SFT_TABLE,
             *sft_rows(results, "memory-short", None), *failures(results, "memory-short"), ""]
    if chosen:
        reason = chosen["settings"].get("reasons", {}).get("gradient_checkpointing", "")
        lines.append(f"- the planner's choice: micro-batch {chosen['settings'].get('micro_batch') or 'as asked'}, "
                     f"checkpointing {'on' if chosen['settings'].get('gradient_checkpointing') else 'off'} ({reason})")
    speed = ratio(chosen and chosen["steady_tok_s"], fixed and fixed["steady_tok_s"])
    lines.append(f"- steady tok/s, the planner's layout / bs4 x 4: {number(speed, 3)}")
    return "\n".join(lines)


def large_section(results: list[dict[str, Any]]) -> str:
    peak = matmul_peak(results)
    ours, theirs = find(results, "sft-3b", "align-defaults"), find(results, "sft-3b", "trl-defaults")
    speed = ratio(ours and ours["steady_tok_s"], theirs and theirs["steady_tok_s"])
    lines = ["## 6. SFT defaults on the 3B model, and MFU (`sft-3b`)", "", SFT_TABLE, *sft_rows(results, "sft-3b", peak),
             *failures(results, "sft-3b"), "",
             f"- steady tok/s, align defaults / TRL defaults: {number(speed, 3)} "
             f"({verdict(speed, '>= 3x', speed >= 3.0 if speed is not None else None)})"]
    shares = [(mfu(r, peak), r) for r in results if "error" not in r and r.get("model_parameters")]
    shares = [(s, r) for s, r in shares if s is not None]
    if shares:
        best, run = max(shares, key=lambda pair: pair[0])
        lines.append(f"- best MFU: {best:.1%} ({run['step']} / {run['run']}; 6 x {run['model_parameters'] / 1e9:.2f}B "
                     f"x {run['steady_tok_s']:,.0f} tok/s over {peak / 1e12:.0f} TFLOP/s measured here; the moonshot "
                     "is 40%)")
    else:
        lines.append(f"- best MFU: {NOT_MEASURED}")
    return "\n".join(lines)
