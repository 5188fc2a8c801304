"""The report: report.json (written last), report.md (the table), report.png (grouped bars), samples/*.jsonl.

Results are nested model -> task -> {"status", "metrics": {name: {"value", "ci95"}}, ...}; deltas are each
model's value minus the first model's, for every metric both have.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Results = dict[str, dict[str, dict[str, Any]]]


def compute_deltas(results: Results, models: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """value(model) - value(first model), per task and metric, for the models after the first."""
    if not models:
        return {}
    first = results.get(models[0], {})
    deltas: dict[str, dict[str, dict[str, float]]] = {}
    for model in models[1:]:
        for task, outcome in results.get(model, {}).items():
            baseline = first.get(task, {})
            if outcome.get("status") != "ok" or baseline.get("status") != "ok":
                continue
            for metric, value in outcome["metrics"].items():
                if metric in baseline["metrics"]:
                    deltas.setdefault(model, {}).setdefault(task, {})[metric] = (
                        value["value"] - baseline["metrics"][metric]["value"])
    return deltas


def write_samples(root: Path, model: str, task: str, samples: list[dict[str, Any]]) -> Path:
    path = root / "samples" / model / f"{task}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return path


def _format(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def _cell(entry: dict[str, Any], delta: float | None) -> str:
    text = _format(entry["value"])
    if entry.get("ci95"):
        low, high = entry["ci95"]
        text += f" [{_format(low)}, {_format(high)}]"
    if delta is not None:
        text += f" ({'+' if delta >= 0 else ''}{_format(delta)})"
    return text


def render_markdown(report: dict[str, Any]) -> str:
    """One row per task and metric, one column per model: value [95% CI] (delta vs the first model)."""
    models = [m["name"] for m in report["models"]]
    results: Results = report["results"]
    deltas = report["deltas"]
    lines = [f"# Evaluation: suite `{report['suite']['name']}`", "",
             "value [95% bootstrap CI] (difference from the first model)", "",
             "| task | metric | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 2)]
    for task in _task_order(report):
        metrics: list[str] = []
        for model in models:
            outcome = results.get(model, {}).get(task, {})
            metrics += [m for m in outcome.get("metrics", {}) if m not in metrics]
        for metric in metrics or ["-"]:
            cells = []
            for model in models:
                outcome = results.get(model, {}).get(task, {})
                if outcome.get("status") == "failed":
                    cells.append("failed")
                elif metric in outcome.get("metrics", {}):
                    delta = deltas.get(model, {}).get(task, {}).get(metric)
                    cells.append(_cell(outcome["metrics"][metric], delta))
                else:
                    cells.append("-")
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    failures = [(m, t, o["error"]) for m, tasks in results.items() for t, o in tasks.items() if o.get("status") == "failed"]
    if failures:
        lines += ["", "## Failed", ""] + [f"- {m} / {t}: {e}" for m, t, e in failures]
    return "\n".join(lines) + "\n"


def _task_order(report: dict[str, Any]) -> list[str]:
    names = [t["name"] for t in report["tasks"]]
    for tasks in report["results"].values():
        names += [t for t in tasks if t not in names]
    return names


def plot_report(path: Path, report: dict[str, Any]) -> bool:
    """Grouped bars, one panel per metric (metrics have different scales): tasks on x, one bar per model,
    whiskers for the 95% intervals. Returns False when nothing succeeded, and writes nothing."""
    models = [m["name"] for m in report["models"]]
    panels: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}  # metric -> task -> model -> entry
    for model in models:
        for task, outcome in report["results"].get(model, {}).items():
            for metric, entry in outcome.get("metrics", {}).items():
                panels.setdefault(metric, {}).setdefault(task, {})[model] = entry
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, (metric, tasks) in zip(axes.flat, panels.items()):
        for k, model in enumerate(models):
            xs, heights, errors = [], [], [[], []]
            for x, task in enumerate(tasks):
                entry = tasks[task].get(model)
                if entry is None:
                    continue
                xs.append(x + (k - (len(models) - 1) / 2) * width)
                heights.append(entry["value"])
                low, high = entry["ci95"] or (entry["value"], entry["value"])
                errors[0].append(max(entry["value"] - low, 0.0))
                errors[1].append(max(high - entry["value"], 0.0))
            ax.bar(xs, heights, width, yerr=errors, capsize=2, label=model)
        ax.set_xticks(range(len(tasks)), list(tasks), rotation=20, fontsize=8)
        values = [e["value"] for by_model in tasks.values() for e in by_model.values()]
        if values and min(values) >= 0:
            ax.set_ylim(0, 1.05 if max(values) <= 1 else None)  # shares on a common 0-1 axis
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"suite {report['suite']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
