"""Exact match: 1 when the prediction equals the reference after stripping surrounding whitespace."""

from eval.metric_factory import per_example_metric

ExactMatch = per_example_metric(
    "exact_match", "Share of predictions equal to their reference (surrounding whitespace ignored).",
    lambda prediction, reference: float(prediction.strip() == reference.strip()),
    returns="exact_match (float, 0-1) and per_example (list[float]).")
