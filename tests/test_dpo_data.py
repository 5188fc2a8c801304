"""Preference formats: detection, normalization to conversational prompt/chosen/rejected, row-and-field errors."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from align.core.data import DataError
from align.core.preferences import detect_preference_format, load_preference_data, parse_hh_transcript
from align.core.errors import AlignError


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def load(tmp_path, rows, **kw):
    return load_preference_data(str(write_jsonl(tmp_path / "prefs.jsonl", rows)), **kw)


def test_explicit_strings_become_conversations(tmp_path):
    data = load(tmp_path, [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    assert data.format == "explicit"
    assert data.pairs == [{"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}]


def test_explicit_message_lists_and_full_conversations_lose_the_repeated_prompt(tmp_path):
    prompt = [{"role": "system", "content": "be brief"}, user("2+2?")]
    data = load(tmp_path, [
        {"prompt": prompt, "chosen": [bot("4")], "rejected": [bot("5")]},
        {"prompt": "3+3?", "chosen": [user("3+3?"), bot("6")], "rejected": [user("3+3?"), bot("7")]},
    ])
    assert data.pairs[0] == {"prompt": prompt, "chosen": [bot("4")], "rejected": [bot("5")]}
    assert data.pairs[1] == {"prompt": [user("3+3?")], "chosen": [bot("6")], "rejected": [bot("7")]}


def test_implicit_prompt_is_the_longest_shared_run_of_messages(tmp_path):
    shared = [user("hi"), bot("hello"), user("2+2?")]
    data = load(tmp_path, [{"chosen": shared + [bot("4")], "rejected": shared + [bot("5"), user("sure?"), bot("yes")]}])
    assert data.format == "implicit"
    assert data.pairs == [{"prompt": shared, "chosen": [bot("4")], "rejected": [bot("5"), user("sure?"), bot("yes")]}]


def test_anthropic_hh_transcripts_are_parsed_and_split(tmp_path):
    chosen = "\n\nHuman: What is 2+2?\n\nAssistant: Four.\n\nHuman: And 3+3?\n\nAssistant: Six."
    rejected = "\n\nHuman: What is 2+2?\n\nAssistant: Four.\n\nHuman: And 3+3?\n\nAssistant: I won't say."
    data = load(tmp_path, [{"chosen": chosen, "rejected": rejected}])
    assert data.format == "hh"
    assert data.pairs == [{"prompt": [user("What is 2+2?"), bot("Four."), user("And 3+3?")],
                           "chosen": [bot("Six.")], "rejected": [bot("I won't say.")]}]


def test_hh_without_leading_blank_line_and_not_a_transcript():
    assert parse_hh_transcript("Human: a\n\nAssistant: b", "r1", "chosen") == [user("a"), bot("b")]
    with pytest.raises(DataError, match=r"r1: field 'chosen': not an HH transcript"):
        parse_hh_transcript("just some text", "r1", "chosen")


ULTRA = {"instruction": "name a colour",
         "completions": [{"response": "red", "overall_score": 9}, {"response": "rd", "overall_score": 2},
                         {"response": "blue", "overall_score": 8.5}]}


def test_scored_best_vs_worst_by_default(tmp_path):
    data = load(tmp_path, [ULTRA])
    assert data.format == "scored"
    assert data.pairs == [{"prompt": [user("name a colour")], "chosen": [bot("red")], "rejected": [bot("rd")]}]


def test_scored_all_pairs_above_margin_and_ties_give_no_pair(tmp_path):
    tie = {"prompt": "x", "responses": ["a", "b"], "scores": [1, 1]}
    data = load(tmp_path, [ULTRA, tie], selection="all", margin=1.0)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in data.pairs] == [("red", "rd"), ("blue", "rd")]
    assert data.rows_without_pair == 1


def test_detection_and_forced_format():
    assert detect_preference_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "explicit"
    assert detect_preference_format({"chosen": [bot("a")], "rejected": [bot("b")]}) == "implicit"
    assert detect_preference_format({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}) == "hh"
    assert detect_preference_format({"prompt": "p", "responses": [], "scores": []}) == "scored"
    assert detect_preference_format({"text": "t"}) is None


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"line 1: field 'rejected': identical to chosen"),
    ({"prompt": "p", "chosen": "   ", "rejected": "b"}, r"line 1: field 'chosen': empty content"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, r"line 1: field 'prompt': missing"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, r"line 1: field 'rejected': expected a list of messages, got int"),
    ({"chosen": [user("a"), bot("b")], "rejected": [user("z"), bot("c")]}, r"field 'chosen': chosen and rejected share no prompt"),
    ({"chosen": [user("a"), bot("b")], "rejected": [user("a")]}, r"field 'rejected': no assistant message"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: "}, r"field 'rejected\[1\].content': empty"),
    ({"prompt": "p", "completions": [{"response": "a", "score": "high"}, {"response": "b", "score": 1}]},
     r"field 'completions\[0\].score': expected a number"),
    ({"prompt": "p", "completions": [{"response": "a", "score": 1}]}, r"fewer than two completions"),
])
def test_invalid_rows_name_row_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load(tmp_path, [row])


def test_skip_invalid_counts_and_unknown_format(tmp_path):
    data = load(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "a", "rejected": "b"}],
                skip_invalid=True)
    assert len(data.pairs) == 1 and data.raw.skipped == 1
    with pytest.raises(AlignError, match="unknown --format 'hhh'.*did you mean 'hh'"):
        load(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}], fmt="hhh")


def test_builtin_demo_preferences():
    data = load_preference_data("builtin:pig-latin-prefs", split="seen", limit=5)
    assert data.format == "explicit" and len(data.pairs) == 5
    pair = data.pairs[0]
    assert pair["prompt"][0]["content"].startswith("Translate to Pig Latin: ")
    assert pair["chosen"] != pair["rejected"]
