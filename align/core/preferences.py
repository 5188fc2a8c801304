"""Preference data: every preference format becomes {"prompt": [messages ending in a user turn], "chosen":
[assistant messages], "rejected": [assistant messages]}, TRL's conversational preference form, rendered with the
model's chat template. Formats: explicit prompt/chosen/rejected, implicit (two full conversations), Anthropic HH
transcripts, UltraFeedback-style scored completions, and LLaMA-Factory's ranking layouts (ShareGPT `conversations`
with one `chosen` and one `rejected` turn; Alpaca `instruction`/`input` with `chosen`/`rejected` strings).

Unpaired preference data (KTO: one completion and a true/false label) becomes TRL's conversational unpaired form
{"prompt": [...], "completion": [assistant messages], "label": bool}: any SFT layout plus LLaMA-Factory's `label` or
`kto_tag` column, the labelled turn being the last assistant turn. Files are read by align.core.data, as for SFT."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from align.core.data import (
    DataError, Rows, alpaca_prompt, as_messages, check_messages, detect_sft_format, field_error, normalize_rows,
    normalize_sft_row, read_rows, sharegpt_messages, sharegpt_turn, text_field,
)
from align.core.errors import AlignError

PreferenceFormat = Literal["explicit", "implicit", "hh", "scored", "sharegpt_ranking", "alpaca_ranking"]
PREFERENCE_FORMATS: tuple[str, ...] = ("explicit", "implicit", "hh", "scored", "sharegpt_ranking", "alpaca_ranking")
UNPAIRED_FORMATS: tuple[str, ...] = ("kto",)
LABEL_COLUMNS = ("kto_tag", "label")  # LLaMA-Factory's column name, and the name its demo files and TRL use
PairSelection = Literal["best_worst", "all"]

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
SCORED_TEXT_KEYS = ("response", "text", "completion", "content", "output")
SCORED_SCORE_KEYS = ("score", "overall_score", "rating", "fine-grained_score")


def detect_preference_format(row: dict[str, Any]) -> PreferenceFormat | None:
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        if "conversations" in keys:
            return "sharegpt_ranking"
        if "instruction" in keys:
            return "alpaca_ranking"
        if "prompt" in keys:
            return "explicit"
        chosen = row.get("chosen")
        return "hh" if isinstance(chosen, str) and "Assistant:" in chosen else "implicit"
    if "completions" in keys or {"responses", "scores"} <= keys:
        return "scored"
    return None


def parse_hh_transcript(text: Any, where: str, fieldname: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` into messages. Turn contents are stripped of surrounding whitespace."""
    text = text_field(text, where, fieldname)
    if not text.startswith("\n\n"):
        text = "\n\n" + text  # some copies drop the leading blank line
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise field_error(where, fieldname, "not an HH transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...' turns)")
    messages = [{"role": HH_ROLES[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]
    for i, message in enumerate(messages):
        if not message["content"] and i < len(messages) - 1:
            raise field_error(where, f"{fieldname} turn {i + 1}", "empty content")
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
        raise field_error(where, "rejected", "identical to chosen")
    if shared == 0:
        raise field_error(where, "chosen", "chosen and rejected share no prompt (they differ from the first message)")
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        rest = conversation[shared:]
        if not rest:
            raise field_error(where, name, "empty completion (the conversation ends where the shared prompt ends)")
        if rest[0]["role"] != "assistant":
            raise field_error(where, f"{name}[{shared}]", f"the completion starts with a '{rest[0]['role']}' turn, "
                                                    "expected the assistant's answer to the shared prompt")
        for i, message in enumerate(rest):
            if not message["content"].strip():
                raise field_error(where, f"{name}[{shared + i}].content", "empty completion")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _completion(value: Any, prompt: list[dict[str, str]], where: str, fieldname: str) -> list[dict[str, str]]:
    """A completion as assistant messages; a full conversation that repeats the prompt is cut after it."""
    messages = as_messages(value, "assistant", where, fieldname)
    if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if messages[0]["role"] != "assistant":
        raise field_error(where, fieldname, f"expected an assistant answer, got a '{messages[0]['role']}' turn")
    return messages


def _preference_pair(prompt: list[dict[str, str]], chosen: Any, rejected: Any, where: str,
                     names: tuple[str, str] = ("chosen", "rejected")) -> dict[str, Any]:
    if prompt[-1]["role"] == "assistant":
        raise field_error(where, "prompt", "ends with an assistant turn; the prompt must end with the turn being answered")
    pair = {"prompt": prompt, "chosen": _completion(chosen, prompt, where, names[0]),
            "rejected": _completion(rejected, prompt, where, names[1])}
    if pair["chosen"] == pair["rejected"]:
        raise field_error(where, names[1], f"identical to {names[0]}")
    return pair


def _scored_completions(row: dict[str, Any], where: str) -> list[tuple[float, Any, str]]:
    """(score, text, field name) for each completion of an UltraFeedback-style row."""
    if "completions" in row:
        items = row["completions"]
        if not isinstance(items, list) or not items:
            raise field_error(where, "completions", "missing" if items is None else "expected a non-empty list")
        out = []
        for i, item in enumerate(items):
            name = f"completions[{i}]"
            if not isinstance(item, dict):
                raise field_error(where, name, f"expected an object with a response and a score, got {type(item).__name__}")
            text_key = next((k for k in SCORED_TEXT_KEYS if k in item), None)
            score_key = next((k for k in SCORED_SCORE_KEYS if k in item), None)
            if text_key is None:
                raise field_error(where, name, f"no response text (expected one of {', '.join(SCORED_TEXT_KEYS)})")
            if score_key is None:
                raise field_error(where, name, f"no score (expected one of {', '.join(SCORED_SCORE_KEYS)})")
            out.append((_score(item[score_key], where, f"{name}.{score_key}"), item[text_key], f"{name}.{text_key}"))
        return out
    responses, scores = row.get("responses"), row.get("scores")
    if not isinstance(responses, list) or not isinstance(scores, list):
        raise field_error(where, "responses" if not isinstance(responses, list) else "scores", "expected a list")
    if len(responses) != len(scores):
        raise field_error(where, "scores", f"{len(scores)} scores for {len(responses)} responses")
    return [(_score(s, where, f"scores[{i}]"), r, f"responses[{i}]") for i, (r, s) in enumerate(zip(responses, scores))]


def _score(value: Any, where: str, fieldname: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise field_error(where, fieldname, f"expected a number, got {type(value).__name__}")
    try:
        return float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond float range (JSON has no limit)
        raise field_error(where, fieldname, f"expected a number, got {str(value)[:40]!r}") from None


def scored_pairs(row: dict[str, Any], where: str, selection: PairSelection = "best_worst",
                 margin: float = 0.0) -> list[dict[str, Any]]:
    """Preference pairs from scored completions: best vs worst, or every pair whose scores differ by more than
    `margin`. Rows whose completions all tie (within the margin) give no pair."""
    prompt = as_messages(row.get("prompt", row.get("instruction")), "user", where,
                          "prompt" if "prompt" in row or "instruction" not in row else "instruction")
    completions = _scored_completions(row, where)
    if len(completions) < 2:
        raise field_error(where, "completions", "fewer than two completions to compare")
    ranked = sorted(completions, key=lambda c: -c[0])
    if selection == "best_worst":
        candidates = [(ranked[0], ranked[-1])]
    else:
        candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
    return [_preference_pair(prompt, better[1], worse[1], where, (better[2], worse[2]))
            for better, worse in candidates if better[0] - worse[0] > margin]


def ranked_turn(value: Any, where: str, fieldname: str) -> list[dict[str, Any]]:
    """A LLaMA-Factory ranking answer: one ShareGPT turn (`{"from": "gpt", "value": ...}`), or a list of them."""
    turns = value if isinstance(value, list) else [value]
    if value is None or not turns:
        raise field_error(where, fieldname, "missing" if value is None else "empty")
    names = [fieldname] if not isinstance(value, list) else [f"{fieldname}[{i}]" for i in range(len(turns))]
    return check_messages([sharegpt_turn(t, where, n) for t, n in zip(turns, names)], where, fieldname,
                          need_assistant=False)


def normalize_preference_row(row: dict[str, Any], fmt: PreferenceFormat, where: str,
                             selection: PairSelection = "best_worst", margin: float = 0.0) -> dict[str, Any]:
    """One raw row into {"pairs": [...]}: a list, since a scored row can give several pairs (or none)."""
    if fmt == "sharegpt_ranking":
        prompt = sharegpt_messages(row, where, need_assistant=False)
        return {"pairs": [_preference_pair(prompt, ranked_turn(row.get("chosen"), where, "chosen"),
                                           ranked_turn(row.get("rejected"), where, "rejected"), where)]}
    if fmt == "alpaca_ranking":
        return {"pairs": [_preference_pair(alpaca_prompt(row, where), row.get("chosen"), row.get("rejected"), where)]}
    if fmt == "explicit":
        prompt = as_messages(row.get("prompt"), "user", where, "prompt")
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
    config: str | None = None,
) -> PreferenceData:
    """Read and normalize preference rows into conversational prompt/chosen/rejected pairs."""
    return normalize_preference_rows(read_rows(source, split, limit, config), fmt, skip_invalid, selection, margin)


def normalize_preference_rows(rows: Rows, fmt: str | None = None, skip_invalid: bool = False,
                              selection: PairSelection = "best_worst", margin: float = 0.0) -> PreferenceData:
    """Detect (or check) the preference format of raw rows and turn them into pairs, as `load_preference_data`."""
    def normalize(row: dict[str, Any], chosen_fmt: Any, where: str) -> dict[str, Any]:
        return normalize_preference_row(row, chosen_fmt, where, selection, margin)

    normalized, chosen = normalize_rows(rows, fmt, normalize, detect_preference_format, PREFERENCE_FORMATS,
                                        skip_invalid)
    pairs = [pair for row in normalized for pair in row["pairs"]]
    rows.kept = [where for row, where in zip(normalized, rows.kept) for _ in row["pairs"]]
    if not pairs:
        raise DataError(f"{rows.source}: no preference pair (every row's completions tie within the score margin "
                        f"{margin})")
    return PreferenceData(pairs, chosen, rows, sum(1 for row in normalized if not row["pairs"]))


# ---- unpaired preference data (KTO) --------------------------------------------------------------------------------


def detect_unpaired_format(row: dict[str, Any]) -> str | None:
    """`kto` for a row with LLaMA-Factory's `kto_tag`, or a `label` beside an SFT layout (a label that is not true
    or false is then refused by the normalizer, naming it, rather than the whole row going undetected)."""
    if "kto_tag" in row or ("label" in row and detect_sft_format(row) not in (None, "text")):
        return "kto"
    return None


def normalize_unpaired_row(row: dict[str, Any], fmt: str, where: str) -> dict[str, Any]:
    """One labelled completion: the row's conversation in any SFT layout, split before its last assistant turn
    (the completion the label judges), and the label."""
    if fmt != "kto":
        raise AlignError(f"unknown unpaired format '{fmt}'")
    column = next((c for c in LABEL_COLUMNS if c in row), LABEL_COLUMNS[0])
    label = row.get(column)
    if not isinstance(label, bool):
        raise field_error(where, column, "missing" if label is None else
                          f"expected true or false, got {type(label).__name__} {str(label)[:40]!r}")
    layout = detect_sft_format(row)
    if layout in (None, "text"):
        raise field_error(where, column, "no conversation to label (expected messages, conversations, "
                                         "instruction/output or prompt/completion beside it)")
    messages = normalize_sft_row(row, layout, where)["messages"]
    if messages[-1]["role"] != "assistant":
        raise field_error(where, layout, f"ends with a '{messages[-1]['role']}' turn; the labelled completion "
                                         "must be the last turn, the assistant's")
    if len(messages) < 2 or messages[-2]["role"] == "assistant":
        raise field_error(where, layout, "no prompt turn before the labelled completion")
    return {"prompt": messages[:-1], "completion": messages[-1:], "label": label}


@dataclass
class UnpairedData:
    rows: list[dict[str, Any]]
    format: str
    raw: Rows


def load_unpaired_data(source: str, fmt: str | None = None, split: str | None = None, limit: int | None = None,
                       skip_invalid: bool = False, config: str | None = None) -> UnpairedData:
    """Read and normalize labelled completions (KTO data) into TRL's conversational unpaired preference form."""
    return normalize_unpaired_rows(read_rows(source, split, limit, config), fmt, skip_invalid)


def normalize_unpaired_rows(rows: Rows, fmt: str | None = None, skip_invalid: bool = False) -> UnpairedData:
    normalized, chosen = normalize_rows(rows, fmt, normalize_unpaired_row, detect_unpaired_format, UNPAIRED_FORMATS,
                                        skip_invalid)
    return UnpairedData(normalized, chosen, rows)
