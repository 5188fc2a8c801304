"""Eval stages and RUNDIR/report.md, the run's tables of models x metrics and wall time per stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from align.core.artifacts import output_dir, read_json_record
from align.core.errors import AlignError
from align.pipeline.export import export_lines
from align.pipeline.stages import EvalStage, ExportStage, Pipeline


def run_eval_stage(stage: EvalStage, pipeline: Pipeline) -> Path:
    """All suites in one report dir per suite, under RUNDIR/<stage>/<suite>/; report.json of the stage sums them."""
    from eval.run import EvalRequest, run_eval

    models = [(m, pipeline.path(m)) for m in stage.models]
    with output_dir(pipeline.rundir / stage.name, overwrite=True) as handle:
        combined: dict[str, Any] = {"suites": {}}
        for suite in stage.suites:
            name = Path(suite).stem if suite.endswith((".yaml", ".yml")) else suite
            out = run_eval(EvalRequest(suite=suite, models=models, output=handle.path / name, limit=stage.limit,
                                       batch_size=stage.batch_size, overwrite=True))
            combined["suites"][name] = json.loads((out / "report.json").read_text())
        return handle.commit("report.json", combined)


def write_report(pipeline: Pipeline, timings: dict[str, float]) -> None:
    """RUNDIR/report.md: every eval stage's table of models x metrics, plus wall time per stage."""
    lines = ["# Pipeline report", ""]
    for stage in pipeline.recipe.stages:
        if not isinstance(stage, EvalStage):
            continue
        report = read_json_record(pipeline.rundir / stage.name / "report.json")
        if report is None:
            continue
        for suite, suite_report in report["suites"].items():
            rows = {m: flat_metrics(suite_report, m) for m in stage.models
                    if m in suite_report.get("results", {})}
            metrics = sorted({k for r in rows.values() for k in r})
            lines += [f"## {suite}", "", "| model | " + " | ".join(metrics) + " |",
                      "| --- |" + " --- |" * len(metrics)]
            lines += [f"| {m} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in metrics) + " |"
                      for m, r in rows.items()]
            lines.append("")
    exports = [(s, record) for s in pipeline.recipe.stages if isinstance(s, ExportStage)
               and (record := read_json_record(pipeline.rundir / s.name / "export.json")) is not None]
    if exports:
        lines += ["## GGUF files", ""]
        for stage, record in exports:
            lines += export_lines(stage, pipeline, record)
        lines.append("")
    lines += ["## Wall time per stage", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
    (pipeline.rundir / "report.md").write_text("\n".join(lines) + "\n")


def flat_metrics(report: dict[str, Any], model: str) -> dict[str, float]:
    """`task/metric` -> value for one model of an eval report."""
    flat: dict[str, float] = {}
    for task, result in report_model_results(report, model).items():
        for metric, value in (result.get("metrics") or {}).items():
            number = value.get("value") if isinstance(value, dict) else value
            if isinstance(number, int | float):
                flat[f"{task}/{metric}"] = float(number)
    return flat


def report_model_results(report: dict[str, Any], model: str) -> dict[str, Any]:
    results = report.get("results", {})
    if isinstance(results, dict) and model in results:
        return results[model]
    raise AlignError(f"eval report has no results for model '{model}'")

