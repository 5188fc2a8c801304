"""The shipped `evaluate` metric modules, loaded by local path (offline), on hand-made predictions."""

from __future__ import annotations

import numpy as np
import pytest

from eval.scoring import MetricLoader, bootstrap_ci, compute_text_metric, perplexity_value
from eval.suites import shipped_metrics


@pytest.fixture(scope="module")
def loader() -> MetricLoader:
    return MetricLoader()


def compute(loader: MetricLoader, name: str, predictions: list, references: list) -> dict:
    return loader.load(name).compute(predictions=predictions, references=references)


def test_every_metric_dir_is_a_loadable_module(loader):
    assert {"exact_match", "normalized_exact_match", "word_accuracy", "chrf", "bleu", "rouge_l", "contains",
            "regex_match", "accuracy"} <= set(shipped_metrics())
    for name in shipped_metrics():
        assert loader.load(name).name == name


def test_every_shipped_metric_is_built_by_the_one_factory(loader):
    # evaluate.load(path) takes the first Metric subclass in the script's namespace: the factory's class
    for name in shipped_metrics():
        assert type(loader.load(name))._info.__qualname__ == "metric_class.<locals>._info"


def test_exact_match_ignores_only_surrounding_whitespace(loader):
    result = compute(loader, "exact_match", ["ethay atcay ", "Ethay atcay", "x"], ["ethay atcay", "ethay atcay", "y"])
    assert result["per_example"] == [1.0, 0.0, 0.0]
    assert result["exact_match"] == pytest.approx(1 / 3)


def test_normalized_exact_match_drops_case_punctuation_and_articles(loader):
    result = compute(loader, "normalized_exact_match", ["The Eiffel  Tower.", "Paris!", "Rome"],
                     ["eiffel tower", "paris", "Paris"])
    assert result["per_example"] == [1.0, 1.0, 0.0]


def test_word_accuracy_counts_words_in_place(loader):
    # 2 of 4 words in place; a dropped first word shifts everything (0 of 3); extra words are free (2 of 2)
    result = compute(loader, "word_accuracy", ["a x c y", "b c", "a b extra"], ["a b c d", "a b c", "a b"])
    assert result["per_example"] == [0.5, 0.0, 1.0]
    assert result["word_accuracy"] == pytest.approx(0.5)


def test_chrf_is_100_for_identical_and_0_for_disjoint_text(loader):
    result = compute(loader, "chrf", ["ethay atcay", "qqqq"], ["ethay atcay", "zzzz"])
    assert result["per_example"] == [pytest.approx(100.0), pytest.approx(0.0)]
    assert result["chrf"] == pytest.approx(50.0)


def test_bleu_is_a_corpus_score_without_per_example_values(loader):
    assert compute(loader, "bleu", ["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100)
    values = compute_text_metric(loader, "bleu", ["the cat sat on the mat", "a"], ["the cat sat on the mat", "b"], 0)
    assert values["bleu"].ci95 is None and values["bleu"].per_example is None


def test_rouge_l_is_the_lcs_f_measure(loader):
    # LCS of "a c d" in "a b c d" is 3 words: precision 3/3, recall 3/4, F1 = 2*1*0.75/1.75
    result = compute(loader, "rouge_l", ["a c d"], ["a b c d"])
    assert result["rouge_l"] == pytest.approx(2 * 0.75 / 1.75)


def test_contains_matches_whole_words_and_alternatives(loader):
    result = compute(loader, "contains", ["The answer is 112.", "It is 12.", "twelve!", "no"],
                     ["12", "12", "12|twelve", "12"])
    assert result["per_example"] == [0.0, 1.0, 1.0, 0.0]


def test_regex_match_uses_the_reference_as_a_pattern(loader):
    result = compute(loader, "regex_match", [" Yes. ", "yes, of course", "COLD"],
                     [r"(?i)^\W*yes\W*$", r"(?i)^\W*yes\W*$", "^[^a-z]*COLD[^a-z]*$"])
    assert result["per_example"] == [1.0, 0.0, 1.0]


def test_accuracy_on_labels(loader):
    assert compute(loader, "accuracy", [0, 2, 1, 1], [0, 1, 1, 3])["per_example"] == [1.0, 0.0, 1.0, 0.0]


def test_headline_equal_to_the_per_example_mean_gets_an_interval(loader):
    values = compute_text_metric(loader, "chrf", ["ab cd", "ab", "xy"], ["ab cd", "ab cd", "ab cd"], seed=0)
    assert values["chrf"].ci95 is not None and values["chrf"].per_example is not None
    assert values["corpus_chrf"].ci95 is None


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(1).random(50)
    first, second = bootstrap_ci(values, seed=3), bootstrap_ci(values, seed=3)
    assert first == second
    assert first[0] < values.mean() < first[1]
    assert bootstrap_ci(values, seed=4) != first
    assert bootstrap_ci([0.5] * 10, seed=0) == (0.5, 0.5)
    assert bootstrap_ci([1.0], seed=0) is None


def test_perplexity_is_token_weighted():
    value = perplexity_value(nll=[2.0, 10.0], tokens=[1, 4], seed=0)
    assert value.value == pytest.approx(np.exp(12.0 / 5))
    assert value.per_example == [pytest.approx(np.exp(2.0)), pytest.approx(np.exp(2.5))]
    assert value.ci95[0] <= value.value <= value.ci95[1]
