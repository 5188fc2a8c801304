"""Data: loading rows from files, hub datasets and built-in generators; detecting and validating formats;
normalizing to one conversational form; tokenizing with loss masks.

Every SFT format becomes `{"messages": [{"role", "content"}, ...]}` (or `{"text": ...}` for raw language-modeling
text). Preference formats become `{"prompt": [...messages], "chosen": [...], "rejected": [...]}`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align.core.errors import AlignError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "tool": "tool",
                  "function_call": "assistant", "observation": "tool", "function": "tool"}

# Keys that make a JSON object a row of some format rather than one turn of a conversation.
ROW_KEYS = {"messages", "conversations", "instruction", "output", "prompt", "completion", "chosen", "rejected", "text"}
# Columns that carry content the model would see, which alignmerge does not put into the prompt: named once in a
# warning when rows hold them, so a tool-calling or image dataset is not trained on without them unnoticed.
UNUSED_CONTENT_COLUMNS = ("tools", "images", "videos", "audios")

log = logging.getLogger(__name__)

SFTFormat = Literal["messages", "sharegpt", "alpaca", "prompt_completion", "text"]
SFT_FORMATS: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
LossOn = Literal["assistant", "last", "all"]


class DataError(AlignError):
    """A bad row or file, located as `where: row N: field F: problem`."""


@dataclass
class Rows:
    """Rows read from one source, each remembering where it came from for error messages."""

    source: str
    rows: list[dict[str, Any]]
    locations: list[str]
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """Where each item the loader returned came from, in order: the locations of the rows that normalized (one
    per preference pair), for messages about rows the trainer later drops."""

    def __len__(self) -> int:
        return len(self.rows)


# ---- reading -----------------------------------------------------------------------------------------------------


def read_rows(source: str, split: str | None = None, limit: int | None = None, config: str | None = None) -> Rows:
    """Read raw rows from a local jsonl/json/csv/parquet file, a local dataset dir, a built-in generator
    (`builtin:NAME`) or a hub dataset.

    `source` may carry a split as `NAME:SPLIT` for hub datasets; `--split` wins when both are given. A dataset dir
    (a hub dataset's files copied locally: `train.jsonl`/`test.jsonl`, or `data/` plus a README that declares its
    configurations and splits) is read by `datasets` like a hub dataset, with its split and `config`. A single file
    has neither, so a `config` is noted and ignored there.
    """
    if source.startswith("builtin:"):
        from align.core.demo import builtin_dataset

        _note_config_ignored(source, config)
        rows = builtin_dataset(source.removeprefix("builtin:"), split or "train")
        locations = [f"{source}: row {i + 1}" for i in range(len(rows))]
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            rows, locations = _read_hub(str(path), split, _dir_config(path, config))
        elif path.exists():
            _note_config_ignored(source, config)
            rows, locations = _read_file(path)
        elif source.endswith((".jsonl", ".json", ".csv", ".parquet")) or "/" in source and source.startswith((".", "/")):
            raise DataError(f"data file not found: {source}")
        else:
            rows, locations = _read_hub(source, split, config)
    if limit is not None:
        rows, locations = rows[:limit], locations[:limit]
    if not rows:
        raise DataError(f"{source}: no rows")
    return Rows(source, rows, locations)


# Longest jsonl line (and largest .json/.csv file) read into memory: a multi-gigabyte line is a broken file, not a
# row, and reading it whole would exhaust memory before json could say so. Tests lower it.
MAX_LINE_BYTES = 256 * 1024 * 1024
MAX_FILE_BYTES = 4 * 1024 * 1024 * 1024


def _note_config_ignored(source: str, config: str | None) -> None:
    if config is not None:
        log.warning("%s: dataset configuration %r ignored (a single file has no configurations)", source, config)


def _dir_config(path: Path, config: str | None) -> str | None:
    """The configuration to read a local dataset dir with: `config` where the dir declares configurations (as a hub
    dataset's README does), else None with a note (datasets names the one configuration of a plain dir `default`)."""
    if config is None:
        return None
    import datasets

    try:
        names = datasets.get_dataset_config_names(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a dir it cannot read
        raise DataError(f"{path}: is a directory that cannot be read as a dataset ({_first_line(exc)})") from None
    if names == ["default"] and config != "default":
        _note_config_ignored(str(path), config)
        return None
    return config


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a local file. UTF-8 with or without a byte-order mark, LF or CRLF line ends (what Windows editors and
    Excel write); anything else is one DataError naming the file, the line or row, and what was wrong."""
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")
    try:
        return readers[suffix](path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to read") from None


def _decode(raw: bytes, path: Path, where: str | None = None) -> str:
    """UTF-8 text with a leading byte-order mark dropped. `where` names the line; for a whole file it is found
    from the offset of the undecodable byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        where = where or f"line {_line_of(raw, exc.start)}"
        raise DataError(f"{path}: {where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}; "
                        "save the file as UTF-8)") from None


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _read_whole(path: Path, what: str) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes is more than a {what} file can hold in memory here "
                        f"({MAX_FILE_BYTES} bytes; use .jsonl, which is read line by line)")
    return path.read_bytes()


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows, locations = [], []
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(f"{path}: line {number}: longer than {MAX_LINE_BYTES} bytes (not a JSON Lines file?)")
            line = _decode(raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw, path, f"line {number}")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: line {number}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            locations.append(f"{path}: line {number}")
    return rows, locations


def _read_json(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    raw = _read_whole(path, "JSON")
    text = _decode(raw, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}, or {"conversations": [turns]}
    if _all_turns(data):  # the turns of one conversation, as axolotl's fixtures store one
        data = [{"conversations" if "from" in data[0] else "messages": data}]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or one key holding a list), got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1}: expected a JSON object, got {type(row).__name__}")
    return data, [f"{path}: row {i + 1}" for i in range(len(data))]


def _all_turns(items: Any) -> bool:
    """Whether a JSON list holds the turns of one conversation (ShareGPT `from`/`value` or `role`/`content`
    objects) rather than rows: a single conversation saved as a .json file, as axolotl's fixtures are."""
    return (isinstance(items, list) and bool(items)
            and all(isinstance(t, dict) and ({"from", "value"} <= set(t) or {"role", "content"} <= set(t))
                    and not set(t) & ROW_KEYS for t in items))


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    raw = _read_whole(path, "CSV")
    text = _decode(raw, path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[dict[str, Any]] = []
    try:
        for row in reader:
            if None in row:  # DictReader files values beyond the header under the key None
                raise DataError(f"{path}: row {len(rows) + 1} (line {reader.line_num}): more values than the "
                                f"{len(reader.fieldnames or [])} header columns")
            rows.append(dict(row))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num + 1}: invalid CSV ({exc})") from None  # not yet counted
    return rows, [f"{path}: row {i + 1}" for i in range(len(rows))]


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable parquet file ({first})") from None
    return rows, [f"{path}: row {i + 1}" for i in range(len(rows))]


def _read_hub(source: str, split: str | None, config: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """A hub dataset, or a local dataset dir (which `datasets` reads the same way)."""
    import datasets

    local = Path(source).is_dir()
    name, _, inline_split = (source, "", "") if local else source.partition(":")
    split = split or inline_split or "train"
    what = f"dataset dir {name}" if local else f"hub dataset '{name}'"
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except FileNotFoundError as exc:
        if local:
            raise DataError(f"{name}: is a directory with no data files datasets can read "
                            f"({_first_line(exc)})") from None
        raise DataError(f"data not found: '{source}' is neither a local file nor a reachable hub dataset") from None
    except (ConnectionError, OSError) as exc:
        raise DataError(f"{what} could not be loaded (offline and not cached?): {_first_line(exc)}") from None
    except (ValueError, KeyError) as exc:  # an unknown split or configuration; files datasets cannot parse
        raise DataError(f"{what}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - datasets' own errors (a dir of mixed files, a broken data file)
        if not local:
            raise
        raise DataError(f"{name}: is a directory that cannot be read as a dataset ({_first_line(exc)})") from None
    rows = [dict(r) for r in dataset]
    where = f"{name}[{config}/{split}]" if config else f"{name}[{split}]"
    return rows, [f"{where}: row {i + 1}" for i in range(len(rows))]


# ---- SFT formats -------------------------------------------------------------------------------------------------


def detect_sft_format(row: dict[str, Any]) -> SFTFormat | None:
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def field_error(where: str, fieldname: str, problem: str) -> DataError:
    return DataError(f"{where}: field '{fieldname}': {problem}")


def text_field(value: Any, where: str, fieldname: str, allow_empty: bool = False) -> str:
    if value is None:
        raise field_error(where, fieldname, "missing")
    if not isinstance(value, str):
        raise field_error(where, fieldname, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise field_error(where, fieldname, "empty content")
    return value


def message_content(value: Any, where: str, fieldname: str) -> str:
    """A message's content: a string, or a list of parts as OpenAI writes them (`{"type": "text", "text": ...}`;
    LLaMA-Factory's v1 data writes `"value"`), whose text parts are joined. Only text is trained on, so any other
    part (an image, audio) is refused rather than dropped."""
    if not isinstance(value, list):
        return text_field(value, where, fieldname)
    texts = []
    for j, part in enumerate(value):
        name = f"{fieldname}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"a {kind!r} part" if isinstance(kind, str) else f"a part without a text type ({_shown(part)})"
            raise field_error(where, name, f"{what}: only text content is supported")
        key = "text" if "text" in part else "value"
        texts.append(text_field(part.get(key), where, f"{name}.{key}", allow_empty=True))
    return text_field("".join(texts), where, fieldname)


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_messages(value: Any, where: str, fieldname: str, need_assistant: bool = True) -> list[dict[str, str]]:
    """Validate a list of {role, content} messages; return clean copies (only role and content)."""
    if value is None:
        raise field_error(where, fieldname, "missing")
    if not isinstance(value, list):
        raise field_error(where, fieldname, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise field_error(where, fieldname, "empty conversation")
    clean = []
    for i, message in enumerate(value):
        name = f"{fieldname}[{i}]"
        if not isinstance(message, dict):
            raise field_error(where, name, f"expected an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if role is None:
            raise field_error(where, f"{name}.role", "missing")
        if role not in ROLES:
            raise field_error(where, f"{name}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        clean.append({"role": role, "content": message_content(message.get("content"), where, f"{name}.content")})
    if need_assistant and not any(m["role"] == "assistant" for m in clean):
        raise field_error(where, fieldname, "no assistant message to learn from")
    return clean


def as_messages(value: Any, role: str, where: str, fieldname: str) -> list[dict[str, str]]:
    """A string becomes one message of `role`; a list is validated as messages."""
    if isinstance(value, str) or value is None:
        return [{"role": role, "content": text_field(value, where, fieldname)}]
    return check_messages(value, where, fieldname, need_assistant=False)


def sharegpt_turn(turn: Any, where: str, fieldname: str) -> dict[str, Any]:
    """One ShareGPT turn (`from`/`value`) as a message; roles as ShareGPT and LLaMA-Factory name them (human, gpt,
    system, function_call, observation, ...). The content is checked with the conversation."""
    if not isinstance(turn, dict):
        raise field_error(where, fieldname, "expected an object with from and value")
    speaker = turn.get("from")
    if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
        raise field_error(where, f"{fieldname}.from", "missing" if speaker is None else
                          f"unknown role {speaker!r} (expected human, gpt, system, function_call or observation)")
    return {"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")}


def sharegpt_messages(row: dict[str, Any], where: str, need_assistant: bool = True) -> list[dict[str, str]]:
    """A row's `conversations` (plus its optional `system` column) as checked messages."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise field_error(where, "conversations", "missing" if turns is None else "expected a list of turns")
    messages = [sharegpt_turn(turn, where, f"conversations[{i}]") for i, turn in enumerate(turns)]
    if row.get("system"):
        messages.insert(0, {"role": "system", "content": row["system"]})
    return check_messages(messages, where, "conversations", need_assistant)


def alpaca_prompt(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Alpaca's `instruction` (with its optional `input` below it, and `system`) as the prompt's messages."""
    instruction = text_field(row.get("instruction"), where, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise field_error(where, "input", f"expected a string, got {type(extra).__name__}")
    prompt = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction}]
    if row.get("system"):
        prompt.insert(0, {"role": "system", "content": text_field(row["system"], where, "system")})
    return prompt


def normalize_sft_row(row: dict[str, Any], fmt: SFTFormat, where: str) -> dict[str, Any]:
    if fmt == "messages":
        return {"messages": check_messages(row.get("messages"), where, "messages")}
    if fmt == "sharegpt":
        return {"messages": sharegpt_messages(row, where)}
    if fmt == "alpaca":
        answer = {"role": "assistant", "content": text_field(row.get("output"), where, "output")}
        return {"messages": alpaca_prompt(row, where) + [answer]}
    if fmt == "prompt_completion":
        prompt = as_messages(row.get("prompt"), "user", where, "prompt")
        completion = as_messages(row.get("completion"), "assistant", where, "completion")
        if not any(m["role"] == "assistant" for m in completion):
            raise field_error(where, "completion", "no assistant message")
        return {"messages": prompt + completion}
    if fmt == "text":
        return {"text": text_field(row.get("text"), where, "text")}
    raise AlignError(f"unknown data format '{fmt}'")


def normalize_rows(
    rows: Rows,
    fmt: str | None,
    normalize: Callable[[dict[str, Any], Any, str], dict[str, Any]],
    detect: Callable[[dict[str, Any]], str | None],
    formats: tuple[str, ...],
    skip_invalid: bool = False,
) -> tuple[list[dict[str, Any]], str]:
    """Detect (or check) the format and normalize every row. Bad rows raise, or are dropped with `skip_invalid`."""
    if fmt is not None and fmt not in formats:
        from align.core.errors import did_you_mean

        raise AlignError(f"unknown --format {fmt!r}{did_you_mean(fmt, formats)} (choose {', '.join(formats)})")
    chosen = fmt or detect(rows.rows[0])
    if chosen is None:
        raise DataError(
            f"{rows.locations[0]}: cannot detect the data format from fields {sorted(rows.rows[0])} "
            f"(expected one of {', '.join(formats)}; force one with --format)"
        )
    warn_unused_columns(rows)
    out = []
    rows.kept = []
    for row, where in zip(rows.rows, rows.locations):
        try:
            out.append(normalize(row, chosen, where))
            rows.kept.append(where)
        except DataError as exc:
            if not skip_invalid:
                raise
            rows.skipped += 1
            rows.problems.append(str(exc))
    if not out:
        raise DataError(f"{rows.source}: every row is invalid (first: {rows.problems[0]})")
    return out, chosen


def warn_unused_columns(rows: Rows) -> None:
    """Name, once per source, each column that holds content no format here puts into the prompt."""
    for column in UNUSED_CONTENT_COLUMNS:
        holding = sum(1 for row in rows.rows if _holds(row.get(column)))
        if holding:
            log.warning("%s: column '%s' (in %d of %d rows) is not used: alignmerge trains on the conversation's "
                        "text only", rows.source, column, holding, len(rows))


def _holds(value: Any) -> bool:
    """Whether a column's value has content: LLaMA-Factory writes no tools as the JSON text "[]"."""
    if isinstance(value, str):
        value = value.strip()
        return value not in ("", "[]", "{}", "null")
    return value not in (None, [], {})


def hold_out(rows: list[Any], size: float, seed: int, where: str) -> tuple[list[Any], list[Any]]:
    """(kept, held out): a seeded random `size` of the rows, a share below 1 (at least one row) or a row count, as
    the handbook's `test_split_size` is written either way. Both keep the rows' order. Which positions are held out
    depends only on the count, so rows and their locations split alike."""
    count = int(size) if size >= 1 else max(1, int(len(rows) * size))
    if count >= len(rows):
        raise DataError(f"{where}: eval_size {size:g} holds out {count} of {len(rows)} rows, leaving none to train on")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_sft_data(
    source: str,
    fmt: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
    config: str | None = None,
) -> tuple[list[dict[str, Any]], str, Rows]:
    """Read and normalize SFT rows. Returns (normalized rows, detected format, raw Rows with skip counts)."""
    return normalize_sft_rows(read_rows(source, split, limit, config), fmt, skip_invalid)


def normalize_sft_rows(rows: Rows, fmt: str | None = None, skip_invalid: bool = False
                       ) -> tuple[list[dict[str, Any]], str, Rows]:
    """Detect (or check) the SFT format of raw rows and normalize them, as `load_sft_data` returns them."""
    normalized, chosen = normalize_rows(rows, fmt, normalize_sft_row, detect_sft_format, SFT_FORMATS, skip_invalid)
    return normalized, chosen, rows


def fingerprint_rows(rows: Iterable[dict[str, Any]]) -> str:
    """Content hash of normalized rows: the same data gives the same fingerprint whatever file it came from."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


# ---- tokenization with loss masks ------------------------------------------------------------------------------


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]], loss_on: LossOn) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character spans of the assistant turns that carry loss.

    Each assistant turn i spans from the end of `render(messages[:i], add_generation_prompt=True)` (the prompt up to
    and including the assistant header) to the end of `render(messages[:i+1])` (its content plus end-of-turn token).
    This works for any template that renders prefixes as prefixes, with or without `{% generation %}` markers;
    TRL's `assistant_only_loss` needs those markers, which most shipped templates (SmolLM2's among them) lack.
    """
    text = render_chat(tokenizer, messages)
    if loss_on == "all":
        return text, [(0, len(text))]
    spans = []
    indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last":
        indices = indices[-1:]
    for i in indices:
        prefix = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise AlignError(
                "the chat template does not render conversation prefixes as prefixes, so assistant turns cannot be "
                "located for the loss mask; train with --loss-on all, or use a template that does"
            )
        spans.append((len(prefix), len(upto)))
    return text, spans


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], loss_on: LossOn = "assistant") -> dict[str, list[int]]:
    """`input_ids` and `labels` (-100 where no loss) for one conversation.

    A token carries loss when its first character lies inside an assistant span; the template's own special
    tokens are in the rendered text, so it is tokenized without adding more.
    """
    text, spans = assistant_char_spans(tokenizer, messages, loss_on)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [
        token if any(start <= begin < end for start, end in spans) else -100
        for token, (begin, _) in zip(ids, offsets)
    ]
    return {"input_ids": ids, "labels": labels}


def tokenize_text(tokenizer: Any, text: str) -> dict[str, list[int]]:
    """Raw language-modeling text: loss on every token, with EOS appended so the model learns to stop."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def tokenize_sft_rows(tokenizer: Any, rows: list[dict[str, Any]], loss_on: LossOn = "assistant") -> list[dict[str, list[int]]]:
    return [
        tokenize_text(tokenizer, row["text"]) if "text" in row else tokenize_conversation(tokenizer, row["messages"], loss_on)
        for row in rows
    ]


def length_stats(lengths: list[int]) -> dict[str, float]:
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"count": len(ordered), "mean": sum(ordered) / len(ordered), "p50": pct(0.5), "p95": pct(0.95),
            "max": ordered[-1]}


def render_loss_tokens(tokenizer: Any, example: dict[str, list[int]]) -> str:
    """Show one tokenized example with loss-carrying tokens in [[ ]], for `align data inspect`."""
    parts, in_loss = [], False
    for token, label in zip(example["input_ids"], example["labels"]):
        piece = tokenizer.decode([token])
        if (label != -100) != in_loss:
            parts.append("[[" if not in_loss else "]]")
            in_loss = not in_loss
        parts.append(piece)
    if in_loss:
        parts.append("]]")
    return "".join(parts)
