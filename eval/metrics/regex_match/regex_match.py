"""Regex match: 1 when the reference, read as a Python regular expression, matches the stripped prediction.

`re.search` semantics: anchor with ^ and $ to demand the whole output; use (?i) for case-insensitive patterns.
"""

import re

import datasets
import evaluate

_DESCRIPTION = "Share of predictions matched by their reference pattern (re.search on the stripped prediction)."
_KWARGS = """
Args:
    predictions (list[str]), references (list[str]: regular expressions).
Returns:
    regex_match (float, 0-1) and per_example (list[float]).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RegexMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [float(re.search(r, p.strip()) is not None) for p, r in zip(predictions, references)]
        return {"regex_match": sum(scores) / max(len(scores), 1), "per_example": scores}
