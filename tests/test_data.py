"""Data formats, validation messages and loss masks, on hand-made rows and a char-level tokenizer."""

from __future__ import annotations

import json

import pytest

from align.core.data import (
    DataError, fingerprint_rows, load_sft_data, read_rows, tokenize_conversation, tokenize_text,
)
from align.core.inspection import inspect_data
from align.core.errors import AlignError
from conftest import write_jsonl

IM_START, IM_END = 2, 3  # the char tokenizer's special-token ids


def mask_positions(example):
    return [i for i, label in enumerate(example["labels"]) if label != -100]


def test_single_turn_mask_covers_answer_and_end_of_turn(char_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    example = tokenize_conversation(char_tokenizer, messages)
    # <s_im>user\nhi<e_im>\n = 1+4+1+2+1+1 = 10 tokens; <s_im>assistant\n = 11 tokens -> answer starts at 21
    assert example["input_ids"][0] == IM_START
    assert mask_positions(example) == [21, 22, 23, 24]  # y, o, <|im_end|>, \n
    assert example["input_ids"][23] == IM_END
    assert char_tokenizer.decode(example["input_ids"][21:23]) == "yo"


def test_multi_turn_masks_every_assistant_turn_and_nothing_else(char_tokenizer):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "dd"},
    ]
    example = tokenize_conversation(char_tokenizer, messages)
    # system turn: 1+6+1+1+1+1 = 11; user: 1+4+1+1+1+1 = 9 -> 20; assistant header 11 -> "b" at 31
    # first answer: b, <e>, \n = 31..33; user turn 34..42; header 43..53; "dd" at 54, 55, <e> 56, \n 57
    assert mask_positions(example) == [31, 32, 33, 54, 55, 56, 57]
    assert len(example["input_ids"]) == 58


def test_loss_on_last_and_all(char_tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    last = tokenize_conversation(char_tokenizer, messages, loss_on="last")
    every = tokenize_conversation(char_tokenizer, messages, loss_on="all")
    assistant = tokenize_conversation(char_tokenizer, messages, loss_on="assistant")
    assert mask_positions(last) == mask_positions(assistant)[3:]
    assert mask_positions(every) == list(range(len(every["input_ids"])))


def test_raw_text_has_loss_everywhere_and_ends_with_eos(char_tokenizer):
    example = tokenize_text(char_tokenizer, "abc")
    assert example["input_ids"][-1] == char_tokenizer.eos_token_id
    assert example["labels"] == example["input_ids"]


FORMAT_ROWS = {
    "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "alpaca": {"instruction": "q", "input": "", "output": "a"},
    "prompt_completion": {"prompt": "q", "completion": "a"},
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_ROWS))
def test_every_conversational_format_normalizes_to_the_same_messages(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [FORMAT_ROWS[fmt]])
    rows, detected, _ = load_sft_data(str(path))
    assert detected == fmt
    assert rows == [FORMAT_ROWS["messages"]]


def test_alpaca_input_and_system_and_sharegpt_system(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "input": "x", "output": "o", "system": "s"}])
    rows, _, _ = load_sft_data(str(path))
    assert rows[0]["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "i\n\nx"},
                                   {"role": "assistant", "content": "o"}]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "system", "value": "s"},
                                                                  {"from": "human", "value": "q"},
                                                                  {"from": "gpt", "value": "a"}]}])
    rows, _, _ = load_sft_data(str(path))
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]


def test_prompt_completion_with_message_lists(tmp_path):
    row = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
           "completion": [{"role": "assistant", "content": "a"}]}
    rows, fmt, _ = load_sft_data(str(write_jsonl(tmp_path / "p.jsonl", [row])))
    assert fmt == "prompt_completion"
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]


def test_text_format(tmp_path):
    rows, fmt, _ = load_sft_data(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])))
    assert (fmt, rows) == ("text", [{"text": "hello"}])


def test_forced_format_and_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a", "text": "t"}])
    assert load_sft_data(str(path), fmt="text")[0] == [{"text": "t"}]
    with pytest.raises(AlignError, match="unknown --format 'mesages'.*did you mean 'messages'"):
        load_sft_data(str(path), fmt="mesages")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
         r"line 2: field 'messages\[1\].role': unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
         r"line 2: field 'messages\[1\].content': empty content"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
         r"line 2: field 'messages\[1\].content': expected a string, got int"),
        ({"messages": "hello"}, r"line 2: field 'messages': expected a list of messages, got str"),
        ({"messages": [{"role": "user", "content": "q"}]}, r"line 2: field 'messages': no assistant message"),
        ({"messages": [{"content": "q"}]}, r"line 2: field 'messages\[0\].role': missing"),
    ],
)
def test_validation_names_file_row_and_field(tmp_path, row, message):
    good = FORMAT_ROWS["messages"]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=message) as info:
        load_sft_data(str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_alpaca_missing_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": None}])
    with pytest.raises(DataError, match="line 2: field 'output': missing"):
        load_sft_data(str(path))


def test_skip_invalid_drops_and_counts(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [FORMAT_ROWS["messages"], bad, bad, FORMAT_ROWS["messages"]])
    rows, _, raw = load_sft_data(str(path), skip_invalid=True)
    assert len(rows) == 2 and raw.skipped == 2
    assert "line 2" in raw.problems[0] and "line 3" in raw.problems[1]


def test_malformed_json_line_is_located(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(FORMAT_ROWS["messages"]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl: line 2: invalid JSON"):
        read_rows(str(path))


def test_missing_file_and_undetectable_format(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        read_rows(str(tmp_path / "nope.jsonl"))
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"cannot detect the data format from fields \['answer', 'question'\]"):
        load_sft_data(str(path))


def test_json_csv_parquet_and_limit_give_identical_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(5)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    write_jsonl(tmp_path / "d.jsonl", rows)
    loaded = {ext: load_sft_data(str(tmp_path / f"d.{ext}"), limit=3)[0] for ext in ("json", "csv", "parquet", "jsonl")}
    assert all(len(v) == 3 for v in loaded.values())
    assert len({fingerprint_rows(v) for v in loaded.values()}) == 1


def test_builtin_dataset_and_fingerprint_changes_with_content():
    rows, fmt, _ = load_sft_data("builtin:pig-latin", limit=4)
    assert fmt == "messages" and len(rows) == 4
    other, _, _ = load_sft_data("builtin:pig-latin", split="seen", limit=4)
    assert fingerprint_rows(rows) != fingerprint_rows(other)


def test_inspect_reports_format_lengths_and_loss_tokens(tmp_path, char_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "c"}, {"prompt": "abcd", "completion": "ef"}])
    report = inspect_data(str(path), char_tokenizer)
    assert report["format"] == "prompt_completion" and report["rows"] == 2
    # row 1: user turn 1+4+1+2+1+1 = 10, header 11, "c" <e> \n = 3 -> 24 tokens; row 2: 12 + 11 + 4 = 27
    assert report["tokens"]["max"] == 27 and report["tokens"]["p50"] in (24, 27)
    assert report["loss_tokens"]["max"] == 4
    assert report["example"].endswith("[[c<|im_end|>\n]]")
