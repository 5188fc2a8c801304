"""Normalized exact match: equal after lower-casing, dropping punctuation and articles, collapsing whitespace.

The normalization is SQuAD's, so `The Eiffel Tower.` matches `eiffel tower`.
"""

import re
import string

import datasets
import evaluate

_DESCRIPTION = "Share of predictions equal to their reference after SQuAD-style normalization."
_KWARGS = """
Args:
    predictions (list[str]), references (list[str]).
Returns:
    normalized_exact_match (float, 0-1) and per_example (list[float]).
"""

_PUNCTUATION = set(string.punctuation)


def normalize(text):
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class NormalizedExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references)]
        return {"normalized_exact_match": sum(scores) / max(len(scores), 1), "per_example": scores}
