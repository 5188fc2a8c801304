"""Regex match: 1 when the reference, read as a Python regular expression, matches the stripped prediction.

`re.search` semantics: anchor with ^ and $ to demand the whole output; use (?i) for case-insensitive patterns.
"""

import re

from eval.metric_factory import per_example_metric

RegexMatch = per_example_metric(
    "regex_match", "Share of predictions matched by their reference pattern (re.search on the stripped prediction).",
    lambda prediction, pattern: float(re.search(pattern, prediction.strip()) is not None),
    returns="regex_match (float, 0-1) and per_example (list[float]).",
    inputs="predictions (list[str]), references (list[str]: regular expressions)")
