"""Contains: 1 when the reference occurs in the prediction as whole words, case-insensitively.

Whole words, so the answer `12` is not found in `112`; a reference may list alternatives separated by `|`.
"""

import re

import datasets
import evaluate

_DESCRIPTION = "Share of predictions containing their reference as whole words (case-insensitive)."
_KWARGS = """
Args:
    predictions (list[str]), references (list[str]; alternatives separated by '|').
Returns:
    contains (float, 0-1) and per_example (list[float]).
"""


def contains(prediction, reference):
    for answer in reference.split("|"):
        answer = answer.strip()
        if answer and re.search(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", prediction, re.IGNORECASE):
            return 1.0
    return 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Contains(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [contains(p, r) for p, r in zip(predictions, references)]
        return {"contains": sum(scores) / max(len(scores), 1), "per_example": scores}
