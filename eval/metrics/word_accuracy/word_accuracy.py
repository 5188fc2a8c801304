"""Word accuracy: the share of reference words reproduced at the same position in the prediction.

Position-wise, so a dropped word costs every later word too; extra words in the prediction do not count.
"""

from eval.metric_factory import per_example_metric


def word_accuracy(prediction, reference):
    expected = reference.split()
    if not expected:
        return float(not prediction.split())
    produced = prediction.split()
    return sum(1 for i, word in enumerate(expected) if i < len(produced) and produced[i] == word) / len(expected)


WordAccuracy = per_example_metric(
    "word_accuracy", "Per example, the share of reference words (split on whitespace) matched at the same position.",
    word_accuracy, returns="word_accuracy (float, 0-1: mean over examples) and per_example (list[float]).")
