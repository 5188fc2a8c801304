"""The one `evaluate.Metric` skeleton behind the metrics shipped in eval/metrics/<name>/<name>.py.

Each shipped metric stays a script that `evaluate.load(path)` loads offline: evaluate copies the script into its
modules cache, checks that every library it imports can be imported (this package is one), imports it and takes
the first `EvaluationModule` subclass in its namespace. So a script only defines its score and names the class
this factory builds; the `_info`/`_compute` boilerplate is written once, here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import evaluate

Compute = Callable[[list[Any], list[Any]], dict[str, Any]]
TEXT_INPUTS = "predictions (list[str]), references (list[str])"


def metric_class(name: str, description: str, returns: str, compute: Compute, inputs: str = TEXT_INPUTS,
                 value_type: str = "string") -> type[evaluate.Metric]:
    """An `evaluate.Metric` named `name` (its class name is the CamelCase of it, which evaluate turns back into
    `name`) whose predictions and references are `value_type` values and whose result is `compute(...)`."""
    inputs_description = f"\nArgs:\n    {inputs}.\nReturns:\n    {returns}\n"

    def _info(self: evaluate.Metric) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=description, citation="", inputs_description=inputs_description,
            features=datasets.Features({"predictions": datasets.Value(value_type),
                                        "references": datasets.Value(value_type)}),
        )

    def _compute(self: evaluate.Metric, predictions: list[Any], references: list[Any]) -> dict[str, Any]:
        return compute(predictions, references)

    class_name = "".join(part.title() for part in name.split("_"))
    return type(class_name, (evaluate.Metric,), {"_info": _info, "_compute": _compute, "__qualname__": class_name,
                                                 "__doc__": description + "\n" + inputs_description})


def per_example_metric(name: str, description: str, score: Callable[[Any, Any], float], returns: str,
                       inputs: str = TEXT_INPUTS, value_type: str = "string") -> type[evaluate.Metric]:
    """A metric that scores each (prediction, reference) pair: `name` is the mean, `per_example` every score (the
    report's bootstrap intervals resample these)."""
    def compute(predictions: list[Any], references: list[Any]) -> dict[str, Any]:
        scores = [score(p, r) for p, r in zip(predictions, references)]
        return {name: sum(scores) / max(len(scores), 1), "per_example": scores}

    return metric_class(name, description, returns, compute, inputs, value_type)
