"""Merge stages: one merge, or a sweep of candidates each merged, scored on a selection suite, the best kept."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from align.core.artifacts import OutputDir, plot_series, read_json_record, write_json
from align.core.errors import AlignError
from align.pipeline.report import flat_metrics
from align.pipeline.stages import MergeStage, Pipeline, SelectSpec, split_slice
from align.pipeline.template import sft_stage_dir

log = logging.getLogger(__name__)


def run_merge_stage(stage: MergeStage, pipeline: Pipeline) -> Path:
    """One merge, or a sweep: every candidate is merged and scored; the best becomes the stage's output and
    `sweep.json`/`sweep.png` beside it record every candidate's metrics."""
    from align.core.artifacts import output_dir

    candidates = stage.candidates()
    out = pipeline.rundir / stage.name
    if len(candidates) == 1:
        return merge_candidate(stage, pipeline, candidates[0], out)
    with output_dir(out, overwrite=True) as handle:
        # the candidates live inside the stage's partial dir: a kill leaves them where the next start clears them
        scored = score_candidates(stage, pipeline, candidates, handle.path / ".sweep")
        return keep_best_candidate(stage, handle, scored)


def score_candidates(stage: MergeStage, pipeline: Pipeline, candidates: list[dict[str, Any]],
                     scratch: Path) -> list[dict[str, Any]]:
    """Merge every candidate into `scratch` and score it on the stage's selection metric."""
    scored = []
    for i, candidate in enumerate(candidates):
        path = merge_candidate(stage, pipeline, candidate, scratch / f"candidate-{i}")
        metrics = score_candidate(stage.select, path, scratch / f"eval-{i}")  # type: ignore[arg-type]
        scored.append({"candidate": candidate, "path": str(path), "metrics": metrics,
                       "score": selection_score(stage.select.metric, metrics)})  # type: ignore[union-attr]
        log.info("merge sweep %s: %s", candidate, scored[-1]["score"])
    return scored


def keep_best_candidate(stage: MergeStage, handle: OutputDir, scored: list[dict[str, Any]]) -> Path:
    """Move the best-scoring candidate into the stage's output with sweep.json/sweep.png and the sweep in merge.json;
    the other candidates go with the scratch dir."""
    best = max(range(len(scored)), key=lambda i: (scored[i]["score"], -i))
    kept = Path(scored[best]["path"])
    for item in kept.iterdir():
        shutil.move(item, handle.path / item.name)
    shutil.rmtree(kept.parent)
    sweep = {"selected": scored[best]["candidate"], "select": stage.select.model_dump(),  # type: ignore[union-attr]
             "candidates": [{k: v for k, v in s.items() if k != "path"} for s in scored]}
    write_json(handle.path / "sweep.json", sweep)
    plot_sweep(handle.path / "sweep.png", scored, best)
    record = read_json_record(handle.path / "merge.json")
    if record is None:
        raise AlignError(f"merge sweep: the kept candidate {kept} has no readable merge.json")
    record["sweep"] = sweep
    (handle.path / "merge.json").unlink()
    return handle.commit("merge.json", record)


def merge_candidate(stage: MergeStage, pipeline: Pipeline, candidate: dict[str, Any], out: Path) -> Path:
    from merge.methods import MergeParams
    from merge.run import MergeRequest, run_merge_request

    params: dict[str, Any] = {}
    if candidate.get("t") is not None:
        params["t"] = [candidate["t"]]
    if candidate.get("weights") is not None:
        params["weights"] = list(candidate["weights"])
    if stage.density is not None:
        params["density"] = [stage.density]
    slices = [f"{pipeline.path(name)}:{layers}" for name, layers in map(split_slice, stage.slices)]
    request = MergeRequest(method=stage.method, models=[pipeline.path(m) for m in stage.models], out=out,
                           slices=slices,
                           base=pipeline.path(stage.base) if stage.base else None, params=MergeParams(**params),
                           mode="adapter" if stage.as_adapter else "auto", overwrite=True,
                           allow_base_mismatch=stage.allow_base_mismatch,
                           template_source=str(sft) if (sft := sft_stage_dir(pipeline, stage.name)) else None)
    return run_merge_request(request)


def score_candidate(select: SelectSpec, model: Path, out: Path) -> dict[str, float]:
    from eval.run import EvalRequest, run_eval

    report_dir = run_eval(EvalRequest(suite=select.suite, models=[("candidate", str(model))], output=out,
                                      limit=select.limit, batch_size=select.batch_size, overwrite=True))
    report = read_json_record(report_dir / "report.json")
    if report is None:
        raise AlignError(f"merge sweep: {report_dir} has no readable report.json")
    return flat_metrics(report, "candidate")


def selection_score(metric: str | dict[str, float], metrics: dict[str, float]) -> float:
    weights = {metric: 1.0} if isinstance(metric, str) else metric
    missing = [m for m in weights if m not in metrics]
    if missing:
        raise AlignError(f"selection metric {missing[0]} is not in the eval results ({', '.join(sorted(metrics))})")
    return sum(w * metrics[m] for m, w in weights.items())


def plot_sweep(path: Path, scored: list[dict[str, Any]], best: int) -> None:
    """Every metric and the selection score against the swept value; the title names the candidate kept."""
    xs = [next(iter(s["candidate"].values())) for s in scored]
    if not all(isinstance(x, int | float) for x in xs):
        xs = list(range(len(scored)))
    names = sorted({m for s in scored for m in s["metrics"]})
    series = {m: [(x, s["metrics"][m]) for x, s in zip(xs, scored) if not math.isnan(s["metrics"].get(m, math.nan))]
              for m in names}
    series["selection score"] = [(x, s["score"]) for x, s in zip(xs, scored)]
    kept = ", ".join(f"{k}={v}" for k, v in scored[best]["candidate"].items())
    plot_series(path, series, f"merge sweep (kept {kept})", xlabel=next(iter(scored[0]["candidate"])))

