"""Accuracy over integer labels (the chosen option index vs the right one), per example and averaged."""

from eval.metric_factory import per_example_metric

Accuracy = per_example_metric(
    "accuracy", "Share of predicted labels equal to the reference labels.",
    lambda prediction, reference: float(prediction == reference),
    returns="accuracy (float, 0-1) and per_example (list[float]).",
    inputs="predictions (list[int]), references (list[int])", value_type="int64")
