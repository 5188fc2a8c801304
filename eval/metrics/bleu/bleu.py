"""Corpus BLEU from sacrebleu (0-100, default 13a tokenization).

BLEU is a corpus statistic (n-gram counts pooled before the geometric mean), so it has no per-example score and
the report gives it no bootstrap interval; sentence BLEU would be a different, much noisier number.
"""

from sacrebleu.metrics import BLEU

from eval.metric_factory import metric_class


def corpus_bleu(predictions, references):
    return {"bleu": BLEU().corpus_score(list(predictions), [list(references)]).score}


Bleu = metric_class("bleu", "Corpus BLEU (sacrebleu defaults), 0-100.", "bleu (float, 0-100).", corpus_bleu)
