"""Metric values with 95% bootstrap intervals, and loading the `evaluate` modules a suite names.

Shipped modules live in eval/metrics/<name>/<name>.py and are loaded by local path, which `evaluate.load` does
without the network (it copies the script into its modules cache and imports it). `hub:NAME` loads a hub module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from align.core.errors import AlignError
from eval.suites import METRICS_DIR, shipped_metrics

BOOTSTRAP_RESAMPLES = 1000


@dataclass
class MetricValue:
    """One number for the report, with its 95% interval when it comes from per-example scores."""

    value: float
    ci95: tuple[float, float] | None = None
    per_example: list[float] | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "ci95": list(self.ci95) if self.ci95 else None}
        out.update(self.extra)
        return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    seed: int,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[float, float] | None:
    """Percentile 95% interval of `statistic` (default: the mean) over examples resampled with replacement.

    `values` may be 2-D (one row per example) for statistics of several columns, such as perplexity's
    (nll, tokens). `statistic` maps a (resamples, n, ...) array to (resamples,) values.
    """
    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))
    stats = statistic(data[picks]) if statistic else data[picks].mean(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def mean_value(scores: Sequence[float], seed: int, extra: dict[str, Any] | None = None) -> MetricValue:
    scores = [float(s) for s in scores]
    return MetricValue(sum(scores) / max(len(scores), 1), bootstrap_ci(scores, seed), scores, extra or {})


def perplexity_value(nll: Sequence[float], tokens: Sequence[int], seed: int) -> MetricValue:
    """exp(total NLL / total tokens): token-weighted, so long texts count for more, as in a corpus perplexity."""
    pairs = np.column_stack([np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)])

    def statistic(sample: np.ndarray) -> np.ndarray:
        return np.exp(sample[..., 0].sum(axis=-1) / np.maximum(sample[..., 1].sum(axis=-1), 1))

    value = math.exp(float(pairs[:, 0].sum()) / max(float(pairs[:, 1].sum()), 1.0))
    per_example = [math.exp(n / max(t, 1)) for n, t in zip(nll, tokens)]
    return MetricValue(value, bootstrap_ci(pairs, seed, statistic), per_example)


class MetricLoader:
    """Loads each `evaluate` module once per run."""

    def __init__(self) -> None:
        self._modules: dict[str, Any] = {}

    def load(self, name: str) -> Any:
        if name not in self._modules:
            import evaluate

            path = metric_location(name)
            try:
                self._modules[name] = evaluate.load(path, keep_in_memory=True)
            except (FileNotFoundError, ConnectionError, OSError) as exc:
                raise AlignError(f"metric '{name}' could not be loaded: {str(exc).splitlines()[0]}") from None
        return self._modules[name]


def metric_location(name: str) -> str:
    if name in shipped_metrics():
        return str(METRICS_DIR / name)
    if name.startswith("hub:"):
        return name.removeprefix("hub:")
    if Path(name).is_dir():
        return str(Path(name).resolve())
    raise AlignError(f"unknown metric '{name}'")


def compute_text_metric(
    loader: MetricLoader, name: str, predictions: list[str], references: list[str], seed: int
) -> dict[str, MetricValue]:
    """Run one module. Its headline keys become report metrics; `per_example` (shipped modules) gives the CI.

    A module may return several numbers (chrf also returns corpus_chrf); each becomes its own metric, and only
    the one equal to the mean of `per_example` carries the interval.
    """
    result = loader.load(name).compute(predictions=predictions, references=references) or {}
    per_example = result.pop("per_example", None)
    values: dict[str, MetricValue] = {}
    for key, value in result.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # lists of n-gram precisions and the like stay out of the table
        if per_example is not None and math.isclose(float(value), sum(per_example) / max(len(per_example), 1),
                                                    rel_tol=1e-9, abs_tol=1e-12):
            values[key] = mean_value(per_example, seed)
        else:
            values[key] = MetricValue(float(value))
    if not values:
        raise AlignError(f"metric '{name}' returned no numbers (got keys {sorted(result)})")
    return values
