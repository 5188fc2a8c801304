"""Accuracy over integer labels (the chosen option index vs the right one), per example and averaged."""

import datasets
import evaluate

_DESCRIPTION = "Share of predicted labels equal to the reference labels."
_KWARGS = """
Args:
    predictions (list[int]), references (list[int]).
Returns:
    accuracy (float, 0-1) and per_example (list[float]).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        scores = [float(p == r) for p, r in zip(predictions, references)]
        return {"accuracy": sum(scores) / max(len(scores), 1), "per_example": scores}
