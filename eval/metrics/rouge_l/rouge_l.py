"""ROUGE-L F-measure (rouge-score, longest common subsequence of words), per example and averaged, 0-1."""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE-L F1 from the rouge-score package, averaged over examples."
_KWARGS = """
Args:
    predictions (list[str]), references (list[str]).
Returns:
    rouge_l (float, 0-1) and per_example (list[float]).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        return {"rouge_l": sum(scores) / max(len(scores), 1), "per_example": scores}
