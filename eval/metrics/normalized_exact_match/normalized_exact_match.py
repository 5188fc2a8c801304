"""Normalized exact match: equal after lower-casing, dropping punctuation and articles, collapsing whitespace.

The normalization is SQuAD's, so `The Eiffel Tower.` matches `eiffel tower`.
"""

import re
import string

from eval.metric_factory import per_example_metric

_PUNCTUATION = set(string.punctuation)


def normalize(text):
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


NormalizedExactMatch = per_example_metric(
    "normalized_exact_match", "Share of predictions equal to their reference after SQuAD-style normalization.",
    lambda prediction, reference: float(normalize(prediction) == normalize(reference)),
    returns="normalized_exact_match (float, 0-1) and per_example (list[float]).")
