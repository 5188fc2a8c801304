"""chrF (sacrebleu, character 6-grams, beta 2), 0-100, per sentence and averaged.

The headline is the mean of sentence-level chrF so that it can carry a bootstrap interval over examples;
`corpus_chrf` (sacrebleu's corpus statistic, which pools n-gram counts) is returned beside it.
"""

from sacrebleu.metrics import CHRF

from eval.metric_factory import metric_class


def chrf_scores(predictions, references):
    chrf = CHRF()
    scores = [chrf.sentence_score(p, [r]).score for p, r in zip(predictions, references)]
    corpus = chrf.corpus_score(list(predictions), [list(references)]).score
    return {"chrf": sum(scores) / max(len(scores), 1), "corpus_chrf": corpus, "per_example": scores}


Chrf = metric_class(
    "chrf", "chrF from sacrebleu: mean sentence-level score (0-100) and the pooled corpus score.",
    "chrf (float, 0-100), corpus_chrf (float, 0-100), per_example (list[float]).", chrf_scores)
