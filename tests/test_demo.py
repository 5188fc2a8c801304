"""The built-in Pig Latin data: the README's rules, deterministic splits, and held-out splits that really are."""

import hashlib
import json

import pytest

from align.core.demo import PigLatinSpec, builtin_dataset, pig_latin, pig_latin_sentences, vocabularies
from align.core.errors import AlignError


@pytest.mark.parametrize("word,expected", [("the", "ethay"), ("string", "ingstray"), ("queen", "eenquay"),
                                           ("rhythm", "ythmrhay"), ("eat", "eatway"), ("yellow", "ellowyay"),
                                           ("squeal", "ealsquay"), ("a", "away")])
def test_rules_from_the_readme(word, expected):
    assert pig_latin(word) == expected


def test_rejects_what_is_not_lower_case_words():
    with pytest.raises(ValueError, match="not a lower-case"):
        pig_latin("The cat")


def test_splits_are_deterministic_and_held_out():
    spec = PigLatinSpec(train_sentences=300, eval_sentences=40)
    splits = pig_latin_sentences(spec)
    assert splits == pig_latin_sentences(spec)
    seen_vocab, unseen_vocab = vocabularies(spec)
    assert not set(seen_vocab) & set(unseen_vocab)
    train_words = {w for s in splits["train"] for w in s.split()}
    for name in ("seen", "dev-seen"):
        assert not set(splits[name]) & set(splits["train"])
        assert {w for s in splits[name] for w in s.split()} <= set(seen_vocab)
    assert not set(splits["seen"]) & set(splits["dev-seen"])
    assert not set(splits["unseen"]) & set(splits["dev-unseen"])
    for name in ("unseen", "dev-unseen"):
        assert not {w for s in splits[name] for w in s.split()} & train_words
    assert all(len(splits[name]) == 40 for name in ("seen", "unseen", "dev-seen", "dev-unseen"))


# sha256 of the train/seen/unseen sentences as the code drew them before the dev splits existed (commit 95be5d5's
# parent), for the built-in spec (the README's runs) and a small one: the README's figures were measured on these.
REPORTED_SPLITS = {PigLatinSpec(): "d6a61a50c8c1f71a",
                   PigLatinSpec(train_sentences=300, eval_sentences=40): "44585e105f7a062a"}


@pytest.mark.parametrize("spec", REPORTED_SPLITS, ids=["builtin", "small"])
def test_dev_splits_left_the_reported_splits_unchanged(spec):
    """The dev splits are drawn after the others, so runs measured before they existed stay comparable."""
    splits = pig_latin_sentences(spec)
    reported = json.dumps({name: splits[name] for name in ("train", "seen", "unseen")})
    assert hashlib.sha256(reported.encode()).hexdigest()[:16] == REPORTED_SPLITS[spec]


def test_builtin_rows_carry_the_translation():
    row = builtin_dataset("pig-latin", "unseen")[0]
    english = row["messages"][0]["content"].split(": ", 1)[1]
    assert row["messages"][1]["content"] == pig_latin(english)
    with pytest.raises(AlignError, match="no split 'test'"):
        builtin_dataset("pig-latin", "test")


def test_dialect_demonstrations_differ_from_the_house_rule_only_on_vowel_initial_words():
    from align.core.demo import DIALECT_SHARE, VOWELS, in_ay_dialect

    spec = PigLatinSpec(train_sentences=600, eval_sentences=10)
    sentences = pig_latin_sentences(spec)["train"]
    rows = builtin_dataset("pig-latin-dialects", "train", spec)
    dialect = 0
    for sentence, row in zip(sentences, rows):
        assert row["messages"][0]["content"].endswith(sentence)
        answer, house = row["messages"][1]["content"].split(), pig_latin(sentence).split()
        for english, got, right in zip(sentence.split(), answer, house):
            if english[0] in VOWELS and in_ay_dialect(sentence):
                assert (got, right) == (english + "ay", english + "way")
            else:
                assert got == right
        dialect += in_ay_dialect(sentence)
    assert abs(dialect / len(sentences) - DIALECT_SHARE) < 0.06  # 600 draws: 3 standard errors at p=0.7 is 0.056
    # A sentence's demonstration depends on the sentence alone, not on which split or how many rows are read.
    assert builtin_dataset("pig-latin-dialects", "train", spec)[:5] == builtin_dataset(
        "pig-latin-dialects", "train", PigLatinSpec(train_sentences=5, eval_sentences=10))[:5]
