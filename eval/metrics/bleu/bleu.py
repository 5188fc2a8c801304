"""Corpus BLEU from sacrebleu (0-100, default 13a tokenization).

BLEU is a corpus statistic (n-gram counts pooled before the geometric mean), so it has no per-example score and
the report gives it no bootstrap interval; sentence BLEU would be a different, much noisier number.
"""

import datasets
import evaluate
from sacrebleu.metrics import BLEU

_DESCRIPTION = "Corpus BLEU (sacrebleu defaults), 0-100."
_KWARGS = """
Args:
    predictions (list[str]), references (list[str]).
Returns:
    bleu (float, 0-100).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return {"bleu": BLEU().corpus_score(list(predictions), [list(references)]).score}
