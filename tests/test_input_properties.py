"""Property tests: whatever bytes or JSON values reach a reader, format detector, recipe/suite loader or
`merge config`, the outcome is rows (or a recipe) or an AlignError, never another exception.

Example counts are modest so CI stays fast; `HYPOTHESIS_PROFILE=thorough` runs many more.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from align.core import data as data_module
from align.core.config import DPORecipe, SFTRecipe, build_recipe
from align.core.data import SFT_FORMATS, detect_sft_format, load_sft_data, normalize_sft_row, read_rows
from align.core.preferences import (
    PREFERENCE_FORMATS, UNPAIRED_FORMATS, detect_preference_format, detect_unpaired_format, load_preference_data,
    normalize_preference_row, normalize_unpaired_row,
)
from align.core.errors import AlignError

settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROW_KEYS = ("messages", "conversations", "instruction", "input", "output", "system", "prompt", "completion", "text",
            "chosen", "rejected", "completions", "responses", "scores", "role", "content", "from", "value", "score",
            "response", "label", "kto_tag", "type", "tools")
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(
    ["user", "assistant", "system", "human", "gpt", "\n\nHuman: hi\n\nAssistant: yo", "5", "", "text", "image_url"])
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(ROW_KEYS) | st.text(max_size=8),
                                                                inner, max_size=4),
    max_leaves=20,
)
rows = st.dictionaries(st.sampled_from(ROW_KEYS) | st.text(max_size=8), json_values, max_size=5)


def outcome(fn, *args, **kwargs):
    """Call `fn`; an AlignError is an acceptable outcome, anything else propagates and fails the test."""
    try:
        return fn(*args, **kwargs)
    except AlignError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        return exc


def fresh(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.unlink(missing_ok=True)
    return path


@given(raw=st.binary(max_size=512), suffix=st.sampled_from(SUFFIXES))
def test_arbitrary_bytes_give_rows_or_an_align_error(tmp_path, raw, suffix):
    path = fresh(tmp_path, "data" + suffix)
    path.write_bytes(raw)
    outcome(read_rows, str(path))
    outcome(load_sft_data, str(path))
    outcome(load_preference_data, str(path))


@given(values=st.lists(json_values, max_size=4), bom=st.booleans(), crlf=st.booleans())
def test_arbitrary_json_values_give_rows_or_an_align_error(tmp_path, values, bom, crlf):
    end = "\r\n" if crlf else "\n"
    prefix = "\ufeff" if bom else ""
    jsonl = fresh(tmp_path, "v.jsonl")
    jsonl.write_text(prefix + end.join(json.dumps(v) for v in values) + end, encoding="utf-8", newline="")
    document = fresh(tmp_path, "v.json")
    document.write_text(prefix + json.dumps(values[0] if len(values) == 1 else values), encoding="utf-8")
    for path in (jsonl, document):
        outcome(load_sft_data, str(path))
        outcome(load_preference_data, str(path), selection="all")


@given(row=rows)
@example(row={"prompt": "a", "responses": ["x", "y"], "scores": [10**400, 1]})  # beyond float range
@example(row={"conversations": [{"from": ["human"], "value": "v"}]})  # an unhashable role
@example(row={"messages": [{"role": "bot\nnext line", "content": "x"}]})  # a value with a line break
def test_format_detectors_and_normalizers_never_crash(row):
    assert detect_sft_format(row) in (*SFT_FORMATS, None)
    assert detect_preference_format(row) in (*PREFERENCE_FORMATS, None)
    for fmt in SFT_FORMATS:
        outcome(normalize_sft_row, row, fmt, "row 1")
    for fmt in PREFERENCE_FORMATS:
        outcome(normalize_preference_row, row, fmt, "row 1", "all", 0.0)
    assert detect_unpaired_format(row) in (*UNPAIRED_FORMATS, None)
    outcome(normalize_unpaired_row, row, "kto", "row 1")


@given(table_rows=st.lists(st.fixed_dictionaries({"prompt": st.text(max_size=10), "completion": st.text(max_size=10)}),
                           min_size=1, max_size=5),
       cut=st.floats(0.0, 0.99))
def test_truncated_parquet_is_one_line(tmp_path, table_rows, cut):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = fresh(tmp_path, "t.parquet")
    pq.write_table(pa.Table.from_pylist(table_rows), path)
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * cut)])
    result = outcome(read_rows, str(path))
    assert isinstance(result, AlignError) and str(path) in str(result)


def test_utf8_with_bom_and_crlf_loads_in_every_reader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pair = {"prompt": "flip ab", "completion": "ba"}
    (tmp_path / "w.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(pair) + "\r\n").encode() * 2)
    (tmp_path / "w.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([pair, pair], indent=1).replace("\n", "\r\n").encode())
    (tmp_path / "w.csv").write_bytes(b"\xef\xbb\xbfprompt,completion\r\nflip ab,ba\r\nflip ab,ba\r\n")
    pq.write_table(pa.Table.from_pylist([pair, pair]), tmp_path / "w.parquet")
    for suffix in SUFFIXES:
        loaded, fmt, _ = load_sft_data(str(tmp_path / f"w{suffix}"))
        assert fmt == "prompt_completion" and len(loaded) == 2, suffix
        assert loaded[0]["messages"][-1] == {"role": "assistant", "content": "ba"}, suffix


@pytest.mark.parametrize("suffix,content,expected", [
    (".jsonl", b'{"text": "a"}\n\x81\x82 not utf8\n', "line 2: not UTF-8"),
    (".jsonl", '{"text": "caf\u00e9"}\n'.encode("utf-16"), "line 1: not UTF-8"),
    (".json", b'[{"text": "a"},\n {"text": "\xff"}]', "line 2: not UTF-8"),
    (".csv", b"text\na\n\xe9t\xe9\n", "line 3: not UTF-8"),
    (".json", b"42", "got int"),
    (".jsonl", b'"just a string"\n', "line 1: expected a JSON object, got str"),
    (".csv", b"text\na,b,c\n", "more values than the 1 header columns"),
    (".csv", b"text\n\"" + b"a" * 200_000 + b"\"\n", "line 2: invalid CSV (field larger than field limit"),
    (".jsonl", b"[" * 100000 + b"\n", "line 1:"),
    (".parquet", b"PAR1 this is not parquet", "not a readable parquet file"),
])
def test_unreadable_files_are_one_line_naming_file_and_place(tmp_path, suffix, content, expected):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(AlignError) as caught:
        read_rows(str(path))
    message = str(caught.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_a_two_gigabyte_line_is_refused_without_reading_it(tmp_path, monkeypatch):
    """A sparse 2 GiB file of one line: refused at the line limit (lowered here so the test reads 1 MiB)."""
    monkeypatch.setattr(data_module, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "')
        f.truncate(2 * 1024 ** 3)  # sparse: no disk blocks for the zeros
    with pytest.raises(AlignError, match=r"huge.jsonl: line 1: longer than 1048576 bytes"):
        read_rows(str(path))


def test_a_huge_json_document_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_FILE_BYTES", 1 << 20)
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(2 * 1024 ** 3)
    with pytest.raises(AlignError, match=r"huge.json: 2147483648 bytes .* use .jsonl"):
        read_rows(str(path))


# ---- recipe, suite and merge-config loaders -------------------------------------------------------------------------


def _train_fields(config_cls) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(config_cls)]


@st.composite
def recipes(draw, config_cls):
    """Recipe mappings: known sections and keys with arbitrary values, and the odd unknown key."""
    from align.core.config import DataSpec, LoraSpec, ModelSpec

    sections = {"model": list(ModelSpec.model_fields), "data": list(DataSpec.model_fields),
                "lora": list(LoraSpec.model_fields), "train": _train_fields(config_cls)}
    recipe = {}
    for section in draw(st.lists(st.sampled_from([*sections, "output", "max_prompt_length", "ref"]), max_size=4,
                                 unique=True)):
        if section in sections:
            keys = st.sampled_from(sections[section]) | st.text(max_size=6)
            recipe[section] = draw(st.dictionaries(keys, json_values, max_size=4) | json_values)
        else:
            recipe[section] = draw(json_values)
    return recipe


@given(raw=st.binary(max_size=300))
def test_recipe_loader_on_arbitrary_bytes(tmp_path, raw):
    from trl import SFTConfig

    path = fresh(tmp_path, "r.yaml")
    path.write_bytes(raw)
    outcome(build_recipe, SFTRecipe, path, {}, (), trl_config=SFTConfig)


@given(sft=recipes(__import__("trl").SFTConfig), dpo=recipes(__import__("trl").DPOConfig))
def test_recipe_loader_on_arbitrary_recipes(tmp_path, sft, dpo):
    from trl import DPOConfig, SFTConfig

    for cls, config_cls, recipe in ((SFTRecipe, SFTConfig, sft), (DPORecipe, DPOConfig, dpo)):
        path = fresh(tmp_path, "r.yaml")
        path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
        built = outcome(build_recipe, cls, path, {}, (), trl_config=config_cls)
        if not isinstance(built, AlignError):  # what passed must be what TRL's config accepts
            assert isinstance(built.train, dict)


@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_suite_loader_on_arbitrary_bytes(tmp_path, raw):
    from eval.suites import load_suite

    path = fresh(tmp_path, "suite.yaml")
    path.write_bytes(raw)
    outcome(load_suite, path)


@given(suite=st.dictionaries(st.sampled_from(["name", "description", "tasks"]) | st.text(max_size=5),
                             json_values | st.lists(rows, max_size=3), max_size=3))
def test_suite_loader_on_arbitrary_mappings(tmp_path, suite):
    from eval.suites import load_suite

    path = fresh(tmp_path, "suite.yaml")
    path.write_text(yaml.safe_dump(suite, allow_unicode=True))
    outcome(load_suite, path)


MERGE_KEYS = ("merge_method", "models", "base_model", "slices", "parameters", "dtype", "tokenizer_source",
              "model", "layer_range", "sources")


@given(config=st.dictionaries(st.sampled_from(MERGE_KEYS) | st.text(max_size=5),
                              json_values | st.sampled_from(["linear", "slerp", "ties", "passthrough"]), max_size=5)
       | json_values,
       raw=st.none() | st.binary(max_size=200))
def test_merge_config_on_arbitrary_input(tmp_path, config, raw):
    from merge.run import run_config_file

    path = fresh(tmp_path, "merge.yaml")
    path.write_bytes(raw) if raw is not None else path.write_text(yaml.safe_dump(config, allow_unicode=True))
    out = tmp_path / "merged"
    result = outcome(run_config_file, path, out)
    assert isinstance(result, AlignError)  # no model named here exists, so nothing can merge
    assert not out.exists() and not (tmp_path / "merged.partial").exists()
