"""Word accuracy: the share of reference words reproduced at the same position in the prediction.

Position-wise, so a dropped word costs every later word too; extra words in the prediction do not count.
"""

import datasets
import evaluate

_DESCRIPTION = "Per example, the share of reference words (split on whitespace) matched at the same position."
_KWARGS = """
Args:
    predictions (list[str]), references (list[str]).
Returns:
    word_accuracy (float, 0-1: mean over examples) and per_example (list[float]).
"""


def word_accuracy(prediction, reference):
    expected = reference.split()
    if not expected:
        return float(not prediction.split())
    produced = prediction.split()
    return sum(1 for i, word in enumerate(expected) if i < len(produced) and produced[i] == word) / len(expected)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class WordAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [word_accuracy(p, r) for p, r in zip(predictions, references)]
        return {"word_accuracy": sum(scores) / max(len(scores), 1), "per_example": scores}
