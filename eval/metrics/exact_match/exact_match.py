"""Exact match: 1 when the prediction equals the reference after stripping surrounding whitespace."""

import datasets
import evaluate

_DESCRIPTION = "Share of predictions equal to their reference (surrounding whitespace ignored)."
_KWARGS = """
Args:
    predictions (list[str]), references (list[str]).
Returns:
    exact_match (float, 0-1) and per_example (list[float]).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [float(p.strip() == r.strip()) for p, r in zip(predictions, references)]
        return {"exact_match": sum(scores) / max(len(scores), 1), "per_example": scores}
