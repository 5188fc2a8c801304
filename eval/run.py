"""`run_eval(EvalRequest) -> Path`: what `align eval` and the pipeline call.

Order: check everything the user gave (suite, model specs, output dir) before any work; read each task's data
once; then per model: reference log-probs that need their own model, load the model, run every task, free it.
A task that fails (bad data, a model that will not load) is recorded with its error; the rest still run.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.core.artifacts import Timer, check_output_dir, output_dir, provenance
from align.core.errors import AlignError
from align.core.models import EMBEDDED_ALIAS, ResolvedModel, resolve_model
from eval.generate import LoadedModel, free, load_for_eval, progress_bar
from eval.reference import RewardReference, activate_reference, find_reward_reference
from eval.report import compute_deltas, plot_report, render_markdown, write_samples
from eval.scoring import MetricLoader
from eval.suites import SuiteSpec, TaskSpec, load_suite
from eval.tasks import (EvalSettings, Example, PreferenceSpans, TaskOutcome, load_examples, preference_outcome,
                        run_choice, run_generate, run_perplexity, score_preferences, work_units)

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class EvalRequest:
    suite: str | Path | SuiteSpec
    """A built-in suite name, a YAML path, or an already validated suite."""
    models: list[tuple[str, str]] | dict[str, str]
    """(name, spec) pairs in report order; the first is the baseline for deltas."""
    output: Path
    limit: int | None = None
    batch_size: int = 16
    seed: int = 0
    reference: str | None = None
    """Reference for DPO implicit rewards; otherwise each adapter's run.json is read."""
    beta: float | None = None
    dtype: str = "auto"
    generation: dict[str, Any] = field(default_factory=dict)
    """Overrides of every generate task's settings (max_new_tokens, do_sample, temperature, top_p)."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    overwrite: bool = False


def parse_model_args(values: list[str]) -> list[tuple[str, str]]:
    """`NAME=SPEC` or `SPEC` -> (name, spec); unnamed models are named after their spec's last path part."""
    pairs: list[tuple[str, str]] = []
    for value in values:
        name, sep, spec = value.partition("=")
        if sep and MODEL_NAME.match(name) and spec:
            pairs.append((name, spec))
        elif sep and not Path(value).exists():
            raise AlignError(f"--model {value}: a name must be letters, digits, '.', '_' or '-' (NAME=SPEC)")
        else:
            pairs.append((_default_name(value, [n for n, _ in pairs]), value))
    return pairs


def _default_name(spec: str, taken: list[str]) -> str:
    stem = Path(spec.rstrip("/")).name.removesuffix(".gguf") if spec != EMBEDDED_ALIAS else spec
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def check_request(request: EvalRequest) -> tuple[SuiteSpec, list[tuple[str, ResolvedModel]]]:
    """Everything that is the user's input, validated before any output is written."""
    suite = request.suite if isinstance(request.suite, SuiteSpec) else load_suite(request.suite)
    pairs = list(request.models.items()) if isinstance(request.models, dict) else list(request.models)
    if not pairs:
        raise AlignError("give at least one --model")
    names = [n for n, _ in pairs]
    for name in names:
        if not MODEL_NAME.match(name):
            raise AlignError(f"model name '{name}': use letters, digits, '.', '_' or '-'")
    if len(set(names)) != len(names):
        raise AlignError(f"model names must be unique: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    if request.batch_size < 1:
        raise AlignError(f"--batch-size {request.batch_size}: must be at least 1")
    if request.limit is not None and request.limit < 1:
        raise AlignError(f"--limit {request.limit}: must be at least 1")
    check_output_dir(Path(request.output), request.overwrite)
    if request.reference is not None:
        resolve_model(request.reference)  # a mistyped --reference is the user's error, not a failed task
    if request.lm_eval_tasks:
        from eval.lm_eval_bridge import require_lm_eval

        require_lm_eval()
    return suite, [(name, resolve_model(spec)) for name, spec in pairs]


def run_eval(request: EvalRequest) -> Path:
    suite, models = check_request(request)
    timer = Timer()
    settings = EvalSettings(request.batch_size, request.seed, dict(request.generation))
    metrics = MetricLoader()
    with output_dir(Path(request.output), overwrite=request.overwrite) as out:
        with timer.phase("data"):
            examples, data_errors = _load_all_examples(suite, request.limit)
        plans = {name: _plan_or_error(resolved, request) for name, resolved in models}
        results: dict[str, dict[str, dict[str, Any]]] = {}
        reference_cache: dict[tuple[str, str], PreferenceSpans] = {}
        for name, resolved in models:
            with timer.phase(f"model:{name}"):
                results[name] = _evaluate_model(name, resolved, suite, examples, data_errors, plans[name],
                                                request, settings, metrics, reference_cache, out.path)
        report = _report(request, suite, models, plans, results, timer)
        (out.path / "report.md").write_text(render_markdown(report), encoding="utf-8")
        plot_report(out.path / "report.png", report)
        return out.commit("report.json", report)


def _load_all_examples(suite: SuiteSpec, limit: int | None) -> tuple[dict[str, list[Example]], dict[str, str]]:
    examples: dict[str, list[Example]] = {}
    errors: dict[str, str] = {}
    for task in suite.tasks:
        try:
            examples[task.name] = load_examples(task, limit)
        except AlignError as exc:
            errors[task.name] = str(exc)
            log.warning("task %s: %s", task.name, exc)
    return examples, errors


def _plan_or_error(resolved: ResolvedModel, request: EvalRequest) -> RewardReference | str | None:
    try:
        return find_reward_reference(resolved, request.reference, request.beta)
    except AlignError as exc:
        return f"reference: {exc}"


def _failed(error: str) -> dict[str, Any]:
    return {"status": "failed", "error": error}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, AlignError):
        return str(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _evaluate_model(name: str, resolved: ResolvedModel, suite: SuiteSpec, examples: dict[str, list[Example]],
                    data_errors: dict[str, str], plan: RewardReference | str | None, request: EvalRequest,
                    settings: EvalSettings, metrics: MetricLoader,
                    reference_cache: dict[tuple[str, str], PreferenceSpans], root: Path) -> dict[str, dict[str, Any]]:
    preference_tasks = [t for t in suite.tasks if t.kind == "preference" and t.name in examples]
    if isinstance(plan, RewardReference) and plan.mode == "model" and preference_tasks:
        _score_reference_model(plan, preference_tasks, examples, settings, reference_cache, request.dtype)
    try:
        lm = load_for_eval(name, resolved, request.dtype)
    except Exception as exc:  # noqa: BLE001 - a model that will not load fails its tasks, not the run
        log.debug("loading %s failed", name, exc_info=True)
        return {task.name: _failed(f"model did not load: {_describe(exc)}") for task in suite.tasks}
    outcomes: dict[str, dict[str, Any]] = {}
    try:
        for task in suite.tasks:
            if task.name in data_errors:
                outcomes[task.name] = _failed(data_errors[task.name])
                continue
            outcomes[task.name] = _run_task(lm, task, examples[task.name], plan, settings, metrics,
                                            reference_cache, root)
        for task_name, scores in _lm_eval(lm, request).items():
            outcomes[task_name] = scores
    finally:
        free(lm)
    return outcomes


def _run_task(lm: LoadedModel, task: TaskSpec, task_examples: list[Example], plan: RewardReference | str | None,
              settings: EvalSettings, metrics: MetricLoader,
              reference_cache: dict[tuple[str, str], PreferenceSpans], root: Path) -> dict[str, Any]:
    started = time.perf_counter()
    bar = progress_bar(work_units(task.kind, task_examples), f"{lm.name}/{task.name}")
    try:
        outcome = _run_kind(lm, task, task_examples, plan, settings, metrics, reference_cache, bar.update)
    except Exception as exc:  # noqa: BLE001 - one failing task is recorded, the others still run
        log.debug("task %s on %s failed", task.name, lm.name, exc_info=True)
        return _failed(_describe(exc))
    finally:
        bar.close()
    samples = write_samples(root, lm.name, task.name, outcome.samples)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "status": "ok", "kind": task.kind, "examples": len(task_examples), "seconds": round(seconds, 3),
        "examples_per_second": len(task_examples) / seconds if seconds > 0 else None,
        "metrics": {k: v.to_json() for k, v in outcome.metrics.items()},
        "samples": str(samples.relative_to(root)),
    }
    if task.kind == "preference" and isinstance(plan, RewardReference):
        result["reference"] = plan.describe()
    elif task.kind == "preference" and isinstance(plan, str):
        result["reference_error"] = plan
    return result


def _run_kind(lm: LoadedModel, task: TaskSpec, task_examples: list[Example], plan: RewardReference | str | None,
              settings: EvalSettings, metrics: MetricLoader,
              reference_cache: dict[tuple[str, str], PreferenceSpans], progress: Any) -> TaskOutcome:
    if task.kind == "generate":
        return run_generate(lm, task, task_examples, settings, metrics, progress)  # type: ignore[arg-type]
    if task.kind == "choice":
        return run_choice(lm, task, task_examples, settings, metrics, progress)  # type: ignore[arg-type]
    if task.kind == "perplexity":
        return run_perplexity(lm, task, task_examples, settings, metrics, progress)  # type: ignore[arg-type]
    policy = score_preferences(lm, task_examples, settings.batch_size, progress)  # type: ignore[arg-type]
    reference = None
    if isinstance(plan, RewardReference):
        if plan.mode == "model":
            reference = reference_cache[(plan.key, task.name)]
        else:
            with activate_reference(lm.model, plan):
                reference = score_preferences(lm, task_examples, settings.batch_size)  # type: ignore[arg-type]
    return preference_outcome(task_examples, policy, reference, plan.beta if isinstance(plan, RewardReference) else 0.0,
                              settings.seed)  # type: ignore[arg-type]


def _score_reference_model(plan: RewardReference, tasks: list[TaskSpec], examples: dict[str, list[Example]],
                           settings: EvalSettings, cache: dict[tuple[str, str], PreferenceSpans], dtype: str) -> None:
    """A reference that is a model of its own is loaded, scored on every preference task and freed before the
    policy loads, so at most one model is in memory. Shared references are scored once."""
    missing = [t for t in tasks if (plan.key, t.name) not in cache]
    if not missing or plan.model is None:
        return
    ref = load_for_eval("reference", plan.model, dtype)
    try:
        for task in missing:
            bar = progress_bar(work_units(task.kind, examples[task.name]), f"reference/{task.name}")
            try:
                cache[(plan.key, task.name)] = score_preferences(ref, examples[task.name],  # type: ignore[arg-type]
                                                                 settings.batch_size, bar.update)
            finally:
                bar.close()
    finally:
        free(ref)


def _lm_eval(lm: LoadedModel, request: EvalRequest) -> dict[str, dict[str, Any]]:
    if not request.lm_eval_tasks:
        return {}
    from eval.lm_eval_bridge import run_lm_eval

    try:
        return run_lm_eval(lm, request.lm_eval_tasks, request.batch_size, request.limit, request.seed)
    except Exception as exc:  # noqa: BLE001 - the harness failing must not lose the suite's results
        log.debug("lm-eval on %s failed", lm.name, exc_info=True)
        return {f"lm-eval:{t}": _failed(_describe(exc)) for t in request.lm_eval_tasks}


def _report(request: EvalRequest, suite: SuiteSpec, models: list[tuple[str, ResolvedModel]],
            plans: dict[str, RewardReference | str | None], results: dict[str, dict[str, dict[str, Any]]],
            timer: Timer) -> dict[str, Any]:
    names = [n for n, _ in models]
    report: dict[str, Any] = {
        "suite": {"name": suite.name, "description": suite.description,
                  "source": suite.name if isinstance(request.suite, SuiteSpec) else str(request.suite)},
        "models": [{"name": n, **r.describe(),
                    "reference": p.describe() if isinstance(p, RewardReference) else None}
                   for (n, r), p in zip(models, plans.values())],
        "tasks": [task.model_dump() for task in suite.tasks],
        "settings": {"limit": request.limit, "batch_size": request.batch_size, "seed": request.seed,
                     "dtype": request.dtype, "generation_overrides": request.generation,
                     "lm_eval_tasks": request.lm_eval_tasks, "bootstrap": "percentile, 1000 resamples, 95%"},
        "results": results,
    }
    report["deltas"] = compute_deltas(results, names)
    report["failed"] = [{"model": m, "task": t, "error": o["error"]} for m, tasks in results.items()
                        for t, o in tasks.items() if o.get("status") == "failed"]
    report.update(provenance({k: round(v, 3) for k, v in timer.timings().items()}))
    return report
