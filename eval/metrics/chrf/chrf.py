"""chrF (sacrebleu, character 6-grams, beta 2), 0-100, per sentence and averaged.

The headline is the mean of sentence-level chrF so that it can carry a bootstrap interval over examples;
`corpus_chrf` (sacrebleu's corpus statistic, which pools n-gram counts) is returned beside it.
"""

import datasets
import evaluate
from sacrebleu.metrics import CHRF

_DESCRIPTION = "chrF from sacrebleu: mean sentence-level score (0-100) and the pooled corpus score."
_KWARGS = """
Args:
    predictions (list[str]), references (list[str]).
Returns:
    chrf (float, 0-100), corpus_chrf (float, 0-100), per_example (list[float]).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        chrf = CHRF()
        scores = [chrf.sentence_score(p, [r]).score for p, r in zip(predictions, references)]
        corpus = chrf.corpus_score(list(predictions), [list(references)]).score
        return {"chrf": sum(scores) / max(len(scores), 1), "corpus_chrf": corpus, "per_example": scores}
