"""Optional lm-evaluation-harness tasks on the model objects already loaded (its HFLM wrapper accepts a model
instance), so harness scores land in the same report without a second load.

A task is a harness task name or the path of a task YAML (lm-eval's own format, e.g. over a local jsonl through
`dataset_path: json`); tests/test_lm_eval.py checks the harness's multiple-choice scores against the `choice` task's."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from align.core.errors import MissingDependencyError
from eval.generate import LoadedModel


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise MissingDependencyError("lm-eval", "--lm-eval-tasks", "pip install 'alignmerge[lm-eval]'")


def run_lm_eval(lm: LoadedModel, tasks: list[str], batch_size: int, limit: int | None,
                seed: int) -> dict[str, dict[str, Any]]:
    """One report entry per harness task: `lm-eval:TASK` with its numeric metrics (stderr as extra fields)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from lm_eval.tasks import TaskManager

    wrapper = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    # Indexing the harness's ~15k built-in task YAMLs took 12.7 s on the 2-core CI VM; task files need none of them.
    local_only = all(Path(task).is_file() for task in tasks)
    output = lm_eval.simple_evaluate(model=wrapper, tasks=list(tasks), limit=limit, random_seed=seed,
                                     numpy_random_seed=seed, torch_random_seed=seed,
                                     task_manager=TaskManager(include_defaults=not local_only))
    entries: dict[str, dict[str, Any]] = {}
    for task, scores in (output or {}).get("results", {}).items():
        metrics: dict[str, Any] = {}
        for key, value in scores.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key:
                continue
            metric = key.split(",")[0]
            stderr = scores.get(key.replace(metric, f"{metric}_stderr", 1))
            ci = [value - 1.96 * stderr, value + 1.96 * stderr] if isinstance(stderr, (int, float)) else None
            metrics[metric] = {"value": float(value), "ci95": ci}
        entries[f"lm-eval:{task}"] = {"status": "ok", "kind": "lm-eval", "metrics": metrics}
    return entries
