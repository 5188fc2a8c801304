"""Contains: 1 when the reference occurs in the prediction as whole words, case-insensitively.

Whole words, so the answer `12` is not found in `112`; a reference may list alternatives separated by `|`.
"""

import re

from eval.metric_factory import per_example_metric


def contains(prediction, reference):
    for answer in reference.split("|"):
        answer = answer.strip()
        if answer and re.search(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", prediction, re.IGNORECASE):
            return 1.0
    return 0.0


Contains = per_example_metric(
    "contains", "Share of predictions containing their reference as whole words (case-insensitive).", contains,
    returns="contains (float, 0-1) and per_example (list[float]).",
    inputs="predictions (list[str]), references (list[str]; alternatives separated by '|')")
