"""Data: loading rows from files, hub datasets and built-in generators; detecting and validating formats;
normalizing to one conversational form; tokenizing with loss masks.

Every SFT format becomes `{"messages": [{"role", "content"}, ...]}` (or `{"text": ...}` for raw language-modeling
text). Preference formats become `{"prompt": [...messages], "chosen": [...], "rejected": [...]}`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align.core.errors import AlignError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "tool": "tool",
                  "function_call": "assistant", "observation": "tool", "function": "tool"}

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

    def __len__(self) -> int:
        return len(self.rows)


# ---- reading -----------------------------------------------------------------------------------------------------


def read_rows(source: str, split: str | None = None, limit: int | None = None) -> Rows:
    """Read raw rows from a local jsonl/json/csv/parquet file, a built-in generator (`builtin:NAME`) or a hub dataset.

    `source` may carry a split as `NAME:SPLIT` for hub datasets; `--split` wins when both are given.
    """
    if source.startswith("builtin:"):
        from align.core.demo import builtin_dataset

        rows = builtin_dataset(source.removeprefix("builtin:"), split or "train")
        locations = [f"{source}: row {i + 1}" for i in range(len(rows))]
    else:
        path = Path(source).expanduser()
        if path.exists():
            rows, locations = _read_file(path)
        elif source.endswith((".jsonl", ".json", ".csv", ".parquet")) or "/" in source and source.startswith((".", "/")):
            raise DataError(f"data file not found: {source}")
        else:
            rows, locations = _read_hub(source, split)
    if limit is not None:
        rows, locations = rows[:limit], locations[:limit]
    if not rows:
        raise DataError(f"{source}: no rows")
    return Rows(source, rows, locations)


def _read_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .jsonl, .json, .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
        return rows, [f"{path}: row {i + 1}" for i in range(len(rows))]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return rows, [f"{path}: row {i + 1}" for i in range(len(rows))]
    raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows, locations = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            locations.append(f"{path}: line {number}")
    return rows, locations


def _read_json(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or one key holding a list)")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1}: expected a JSON object, got {type(row).__name__}")
    return data, [f"{path}: row {i + 1}" for i in range(len(data))]


def _read_hub(source: str, split: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    import datasets

    name, _, inline_split = source.partition(":")
    split = split or inline_split or "train"
    try:
        dataset = datasets.load_dataset(name, split=split)
    except FileNotFoundError:
        raise DataError(f"data not found: '{source}' is neither a local file nor a reachable hub dataset") from None
    except (ConnectionError, OSError) as exc:
        raise DataError(
            f"hub dataset '{name}' could not be loaded (offline and not cached?): {str(exc).splitlines()[0]}"
        ) from None
    except ValueError as exc:
        raise DataError(f"hub dataset '{name}': {str(exc).splitlines()[0]}") from None
    rows = [dict(r) for r in dataset]
    return rows, [f"{name}[{split}]: row {i + 1}" for i in range(len(rows))]


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


def _fail(where: str, fieldname: str, problem: str) -> DataError:
    return DataError(f"{where}: field '{fieldname}': {problem}")


def _text(value: Any, where: str, fieldname: str, allow_empty: bool = False) -> str:
    if value is None:
        raise _fail(where, fieldname, "missing")
    if not isinstance(value, str):
        raise _fail(where, fieldname, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _fail(where, fieldname, "empty content")
    return value


def check_messages(value: Any, where: str, fieldname: str, need_assistant: bool = True) -> list[dict[str, str]]:
    """Validate a list of {role, content} messages; return clean copies (only role and content)."""
    if value is None:
        raise _fail(where, fieldname, "missing")
    if not isinstance(value, list):
        raise _fail(where, fieldname, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise _fail(where, fieldname, "empty conversation")
    clean = []
    for i, message in enumerate(value):
        name = f"{fieldname}[{i}]"
        if not isinstance(message, dict):
            raise _fail(where, name, f"expected an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if role is None:
            raise _fail(where, f"{name}.role", "missing")
        if role not in ROLES:
            raise _fail(where, f"{name}.role", f"unknown role '{role}' (expected one of {', '.join(ROLES)})")
        clean.append({"role": role, "content": _text(message.get("content"), where, f"{name}.content")})
    if need_assistant and not any(m["role"] == "assistant" for m in clean):
        raise _fail(where, fieldname, "no assistant message to learn from")
    return clean


def _as_messages(value: Any, role: str, where: str, fieldname: str) -> list[dict[str, str]]:
    """A string becomes one message of `role`; a list is validated as messages."""
    if isinstance(value, str) or value is None:
        return [{"role": role, "content": _text(value, where, fieldname)}]
    return check_messages(value, where, fieldname, need_assistant=False)


def normalize_sft_row(row: dict[str, Any], fmt: SFTFormat, where: str) -> dict[str, Any]:
    if fmt == "messages":
        return {"messages": check_messages(row.get("messages"), where, "messages")}
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise _fail(where, "conversations", "missing" if turns is None else "expected a list of turns")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise _fail(where, f"conversations[{i}]", "expected an object with from and value")
            speaker = turn.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise _fail(where, f"conversations[{i}].from",
                            "missing" if speaker is None else f"unknown role '{speaker}' (expected human, gpt, system)")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
        return {"messages": check_messages(messages, where, "conversations")}
    if fmt == "alpaca":
        instruction = _text(row.get("instruction"), where, "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _fail(where, "input", f"expected a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(row.get("output"), where, "output")}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": _text(row["system"], where, "system")})
        return {"messages": messages}
    if fmt == "prompt_completion":
        prompt = _as_messages(row.get("prompt"), "user", where, "prompt")
        completion = _as_messages(row.get("completion"), "assistant", where, "completion")
        if not any(m["role"] == "assistant" for m in completion):
            raise _fail(where, "completion", "no assistant message")
        return {"messages": prompt + completion}
    if fmt == "text":
        return {"text": _text(row.get("text"), where, "text")}
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

        raise AlignError(f"unknown --format '{fmt}'{did_you_mean(fmt, formats)} (choose {', '.join(formats)})")
    chosen = fmt or detect(rows.rows[0])
    if chosen is None:
        raise DataError(
            f"{rows.locations[0]}: cannot detect the data format from fields {sorted(rows.rows[0])} "
            f"(expected one of {', '.join(formats)}; force one with --format)"
        )
    out = []
    for row, where in zip(rows.rows, rows.locations):
        try:
            out.append(normalize(row, chosen, where))
        except DataError as exc:
            if not skip_invalid:
                raise
            rows.skipped += 1
            rows.problems.append(str(exc))
    if not out:
        raise DataError(f"{rows.source}: every row is invalid (first: {rows.problems[0]})")
    return out, chosen


def load_sft_data(
    source: str,
    fmt: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> tuple[list[dict[str, Any]], str, Rows]:
    """Read and normalize SFT rows. Returns (normalized rows, detected format, raw Rows with skip counts)."""
    rows = read_rows(source, split, limit)
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


def inspect_data(source: str, tokenizer: Any, fmt: str | None = None, split: str | None = None,
                 limit: int | None = None, loss_on: LossOn = "assistant") -> dict[str, Any]:
    """Everything `align data inspect` prints: format, counts, token-length stats, one rendered example."""
    rows, detected, raw = load_sft_data(source, fmt, split, limit)
    tokenized = tokenize_sft_rows(tokenizer, rows, loss_on)
    lengths = [len(t["input_ids"]) for t in tokenized]
    loss_tokens = [sum(1 for label in t["labels"] if label != -100) for t in tokenized]
    return {
        "source": source,
        "format": detected,
        "rows": len(rows),
        "tokens": length_stats(lengths),
        "loss_tokens": length_stats(loss_tokens),
        "example": render_loss_tokens(tokenizer, tokenized[0]),
        "fingerprint": fingerprint_rows(rows),
    }


# ---- preference formats ------------------------------------------------------------------------------------------
#
# Every preference format becomes {"prompt": [messages ending in a user turn], "chosen": [assistant messages],
# "rejected": [assistant messages]}: TRL's conversational preference form, rendered with the model's chat template.

import re  # noqa: E402  (this section was appended to the module)

PreferenceFormat = Literal["explicit", "implicit", "hh", "scored"]
PREFERENCE_FORMATS: tuple[str, ...] = ("explicit", "implicit", "hh", "scored")
PairSelection = Literal["best_worst", "all"]

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
SCORED_TEXT_KEYS = ("response", "text", "completion", "content", "output")
SCORED_SCORE_KEYS = ("score", "overall_score", "rating", "fine-grained_score")


def detect_preference_format(row: dict[str, Any]) -> PreferenceFormat | None:
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys:
            return "explicit"
        chosen = row.get("chosen")
        return "hh" if isinstance(chosen, str) and "Assistant:" in chosen else "implicit"
    if "completions" in keys or {"responses", "scores"} <= keys:
        return "scored"
    return None


def parse_hh_transcript(text: Any, where: str, fieldname: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` into messages. Turn contents are stripped of surrounding whitespace."""
    text = _text(text, where, fieldname)
    if not text.startswith("\n\n"):
        text = "\n\n" + text  # some copies drop the leading blank line
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _fail(where, fieldname, "not an HH transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...' turns)")
    messages = [{"role": HH_ROLES[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]
    for i, message in enumerate(messages):
        if not message["content"] and i < len(messages) - 1:
            raise _fail(where, f"{fieldname} turn {i + 1}", "empty content")
    return messages


def split_shared_prompt(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]], where: str
) -> dict[str, list[dict[str, str]]]:
    """Two full conversations into the shared prompt (their longest common run of whole messages) and the two
    continuations, which must start with an assistant turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) and shared == len(rejected):
        raise _fail(where, "rejected", "identical to chosen")
    if shared == 0:
        raise _fail(where, "chosen", "chosen and rejected share no prompt (they differ from the first message)")
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        rest = conversation[shared:]
        if not rest:
            raise _fail(where, name, "empty completion (the conversation ends where the shared prompt ends)")
        if rest[0]["role"] != "assistant":
            raise _fail(where, f"{name}[{shared}]", f"the completion starts with a '{rest[0]['role']}' turn, "
                                                    "expected the assistant's answer to the shared prompt")
        for i, message in enumerate(rest):
            if not message["content"].strip():
                raise _fail(where, f"{name}[{shared + i}].content", "empty completion")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _completion(value: Any, prompt: list[dict[str, str]], where: str, fieldname: str) -> list[dict[str, str]]:
    """A completion as assistant messages; a full conversation that repeats the prompt is cut after it."""
    messages = _as_messages(value, "assistant", where, fieldname)
    if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if messages[0]["role"] != "assistant":
        raise _fail(where, fieldname, f"expected an assistant answer, got a '{messages[0]['role']}' turn")
    return messages


def _preference_pair(prompt: list[dict[str, str]], chosen: Any, rejected: Any, where: str,
                     names: tuple[str, str] = ("chosen", "rejected")) -> dict[str, Any]:
    if prompt[-1]["role"] == "assistant":
        raise _fail(where, "prompt", "ends with an assistant turn; the prompt must end with the turn being answered")
    pair = {"prompt": prompt, "chosen": _completion(chosen, prompt, where, names[0]),
            "rejected": _completion(rejected, prompt, where, names[1])}
    if pair["chosen"] == pair["rejected"]:
        raise _fail(where, names[1], f"identical to {names[0]}")
    return pair


def _scored_completions(row: dict[str, Any], where: str) -> list[tuple[float, Any, str]]:
    """(score, text, field name) for each completion of an UltraFeedback-style row."""
    if "completions" in row:
        items = row["completions"]
        if not isinstance(items, list) or not items:
            raise _fail(where, "completions", "missing" if items is None else "expected a non-empty list")
        out = []
        for i, item in enumerate(items):
            name = f"completions[{i}]"
            if not isinstance(item, dict):
                raise _fail(where, name, f"expected an object with a response and a score, got {type(item).__name__}")
            text_key = next((k for k in SCORED_TEXT_KEYS if k in item), None)
            score_key = next((k for k in SCORED_SCORE_KEYS if k in item), None)
            if text_key is None:
                raise _fail(where, name, f"no response text (expected one of {', '.join(SCORED_TEXT_KEYS)})")
            if score_key is None:
                raise _fail(where, name, f"no score (expected one of {', '.join(SCORED_SCORE_KEYS)})")
            out.append((_score(item[score_key], where, f"{name}.{score_key}"), item[text_key], f"{name}.{text_key}"))
        return out
    responses, scores = row.get("responses"), row.get("scores")
    if not isinstance(responses, list) or not isinstance(scores, list):
        raise _fail(where, "responses" if not isinstance(responses, list) else "scores", "expected a list")
    if len(responses) != len(scores):
        raise _fail(where, "scores", f"{len(scores)} scores for {len(responses)} responses")
    return [(_score(s, where, f"scores[{i}]"), r, f"responses[{i}]") for i, (r, s) in enumerate(zip(responses, scores))]


def _score(value: Any, where: str, fieldname: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _fail(where, fieldname, f"expected a number, got {type(value).__name__}")
    try:
        return float(value)
    except ValueError:
        raise _fail(where, fieldname, f"expected a number, got {value!r}") from None


def scored_pairs(row: dict[str, Any], where: str, selection: PairSelection = "best_worst",
                 margin: float = 0.0) -> list[dict[str, Any]]:
    """Preference pairs from scored completions: best vs worst, or every pair whose scores differ by more than
    `margin`. Rows whose completions all tie (within the margin) give no pair."""
    prompt = _as_messages(row.get("prompt", row.get("instruction")), "user", where,
                          "prompt" if "prompt" in row or "instruction" not in row else "instruction")
    completions = _scored_completions(row, where)
    if len(completions) < 2:
        raise _fail(where, "completions", "fewer than two completions to compare")
    ranked = sorted(completions, key=lambda c: -c[0])
    if selection == "best_worst":
        candidates = [(ranked[0], ranked[-1])]
    else:
        candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
    return [_preference_pair(prompt, better[1], worse[1], where, (better[2], worse[2]))
            for better, worse in candidates if better[0] - worse[0] > margin]


def normalize_preference_row(row: dict[str, Any], fmt: PreferenceFormat, where: str,
                             selection: PairSelection = "best_worst", margin: float = 0.0) -> dict[str, Any]:
    """One raw row into {"pairs": [...]}: a list, since a scored row can give several pairs (or none)."""
    if fmt == "explicit":
        prompt = _as_messages(row.get("prompt"), "user", where, "prompt")
        return {"pairs": [_preference_pair(prompt, row.get("chosen"), row.get("rejected"), where)]}
    if fmt == "implicit":
        chosen = check_messages(row.get("chosen"), where, "chosen")
        rejected = check_messages(row.get("rejected"), where, "rejected")
        return {"pairs": [split_shared_prompt(chosen, rejected, where)]}
    if fmt == "hh":
        chosen = parse_hh_transcript(row.get("chosen"), where, "chosen")
        rejected = parse_hh_transcript(row.get("rejected"), where, "rejected")
        return {"pairs": [split_shared_prompt(chosen, rejected, where)]}
    if fmt == "scored":
        return {"pairs": scored_pairs(row, where, selection, margin)}
    raise AlignError(f"unknown preference format '{fmt}'")


@dataclass
class PreferenceData:
    pairs: list[dict[str, Any]]
    format: str
    raw: Rows
    rows_without_pair: int


def load_preference_data(
    source: str,
    fmt: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
    selection: PairSelection = "best_worst",
    margin: float = 0.0,
) -> PreferenceData:
    """Read and normalize preference rows into conversational prompt/chosen/rejected pairs."""
    rows = read_rows(source, split, limit)

    def normalize(row: dict[str, Any], chosen_fmt: Any, where: str) -> dict[str, Any]:
        return normalize_preference_row(row, chosen_fmt, where, selection, margin)

    normalized, chosen = normalize_rows(rows, fmt, normalize, detect_preference_format, PREFERENCE_FORMATS,
                                        skip_invalid)
    pairs = [pair for row in normalized for pair in row["pairs"]]
    if not pairs:
        raise DataError(f"{source}: no preference pair (every row's completions tie within the score margin {margin})")
    return PreferenceData(pairs, chosen, rows, sum(1 for row in normalized if not row["pairs"]))
