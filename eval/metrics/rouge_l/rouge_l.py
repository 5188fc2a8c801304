"""ROUGE-L F-measure (rouge-score, longest common subsequence of words), per example and averaged, 0-1."""

from rouge_score import rouge_scorer

from eval.metric_factory import per_example_metric

SCORER = rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction, reference):
    return SCORER.score(reference, prediction)["rougeL"].fmeasure


RougeL = per_example_metric(
    "rouge_l", "ROUGE-L F1 from the rouge-score package, averaged over examples.", rouge_l,
    returns="rouge_l (float, 0-1) and per_example (list[float]).")
