"""What `align data inspect` reports, for SFT, preference and unpaired (KTO) data alike: the format, detected from the
first row (or forced) through the same readers `align sft` and `align dpo` use; the rows and what they became; token
lengths as the trainer tokenizes them; how many rows `max_length` would truncate, and how many it would leave with
nothing to learn from (TRL drops those); the invalid rows and the first of them; one rendered example."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from align.core.data import (
    SFT_FORMATS, LossOn, Rows, fingerprint_rows, length_stats, normalize_sft_rows, read_rows, render_loss_tokens,
    tokenize_sft_rows,
)
from align.core.errors import AlignError, did_you_mean
from align.core.preferences import (
    PREFERENCE_FORMATS, UNPAIRED_FORMATS, detect_preference_format, detect_unpaired_format,
    normalize_preference_rows, normalize_unpaired_rows,
)

DataKind = Literal["sft", "preference", "unpaired"]
KINDS: dict[DataKind, tuple[str, ...]] = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS,
                                          "unpaired": UNPAIRED_FORMATS}


def data_kind(row: dict[str, Any], fmt: str | None) -> DataKind:
    """Which reader a source needs: the family of the forced format, else of the first row's fields (preference
    pairs first, since a ShareGPT ranking row holds `conversations` too; then labelled completions; then SFT)."""
    if fmt is not None:
        for kind, formats in KINDS.items():
            if fmt in formats:
                return kind
        every = [f for formats in KINDS.values() for f in formats]
        raise AlignError(f"unknown --format {fmt!r}{did_you_mean(fmt, every)} (choose {', '.join(every)})")
    if detect_preference_format(row) is not None:
        return "preference"
    if detect_unpaired_format(row) is not None:
        return "unpaired"
    return "sft"


def inspect_data(source: str, tokenizer: Any, fmt: str | None = None, split: str | None = None,
                 limit: int | None = None, loss_on: LossOn = "assistant", max_length: int | None = None
                 ) -> dict[str, Any]:
    """Everything `align data inspect` prints. Invalid rows are counted (the first one named), not raised."""
    rows = read_rows(source, split, limit)
    kind = data_kind(rows.rows[0], fmt)
    inspect: dict[DataKind, Callable[..., dict[str, Any]]] = {
        "sft": inspect_sft, "preference": inspect_preferences, "unpaired": inspect_unpaired}
    report = inspect[kind](rows, tokenizer, fmt, max_length, loss_on)
    return {"source": source, "kind": kind, "rows": len(rows), "invalid": rows.skipped,
            "first_invalid": rows.problems[0] if rows.problems else None, "max_length": max_length, **report}


def inspect_sft(rows: Rows, tokenizer: Any, fmt: str | None, max_length: int | None, loss_on: LossOn
                ) -> dict[str, Any]:
    normalized, detected, _ = normalize_sft_rows(rows, fmt, skip_invalid=True)
    tokenized = tokenize_sft_rows(tokenizer, normalized, loss_on)
    cut = [t["labels"][:max_length] for t in tokenized if max_length is not None and len(t["labels"]) > max_length]
    return {
        "format": detected,
        "examples": len(normalized),
        "tokens": length_stats([len(t["input_ids"]) for t in tokenized]),
        "loss_tokens": length_stats([_learned(t["labels"]) for t in tokenized]),
        "truncated": len(cut),  # keeping the start, TRL's default; those left with no loss token TRL drops
        "emptied": sum(1 for labels in cut if not _learned(labels)),
        "example": render_loss_tokens(tokenizer, tokenized[0]),
        "fingerprint": fingerprint_rows(normalized),
    }


def _learned(labels: list[int]) -> int:
    return sum(1 for label in labels if label != -100)


def inspect_preferences(rows: Rows, tokenizer: Any, fmt: str | None, max_length: int | None, loss_on: LossOn
                        ) -> dict[str, Any]:
    data = normalize_preference_rows(rows, fmt, skip_invalid=True)
    tokenized = [tokenize_completions(tokenizer, pair["prompt"], [pair["chosen"], pair["rejected"]])
                 for pair in data.pairs]
    start, (chosen, rejected) = tokenized[0]
    return {
        "format": data.format,
        "examples": len(data.pairs),
        "rows_without_pair": data.rows_without_pair,
        "prompt_tokens": length_stats([start for start, _ in tokenized]),
        "chosen_tokens": length_stats([len(full[0]) - start for start, full in tokenized]),
        "rejected_tokens": length_stats([len(full[1]) - start for start, full in tokenized]),
        **truncation(tokenized, max_length),
        "example": (f"chosen:\n{_rendered(tokenizer, start, chosen)}\n"
                    f"rejected:\n{_rendered(tokenizer, start, rejected)}"),
        "fingerprint": fingerprint_rows(data.pairs),
    }


def inspect_unpaired(rows: Rows, tokenizer: Any, fmt: str | None, max_length: int | None, loss_on: LossOn
                     ) -> dict[str, Any]:
    data = normalize_unpaired_rows(rows, fmt, skip_invalid=True)
    tokenized = [tokenize_completions(tokenizer, row["prompt"], [row["completion"]]) for row in data.rows]
    desirable = sum(1 for row in data.rows if row["label"])
    start, (completion,) = tokenized[0]
    return {
        "format": data.format,
        "examples": len(data.rows),
        "desirable": desirable,
        "undesirable": len(data.rows) - desirable,
        "prompt_tokens": length_stats([start for start, _ in tokenized]),
        "completion_tokens": length_stats([len(full[0]) - start for start, full in tokenized]),
        **truncation(tokenized, max_length),
        "example": f"label {data.rows[0]['label']}:\n{_rendered(tokenizer, start, completion)}",
        "fingerprint": fingerprint_rows(data.rows),
    }


def tokenize_completions(tokenizer: Any, prompt: list[dict[str, str]], completions: list[list[dict[str, str]]]
                         ) -> tuple[int, list[list[int]]]:
    """(prompt tokens, each prompt + completion tokenized whole), as TRL's DPOTrainer tokenizes a conversational
    pair: the prompt with the generation prompt, each conversation whole, and the completion starting where the
    tokens of all of them stop agreeing."""
    from trl.data_utils import common_prefix_length

    def ids(messages: list[dict[str, str]], generation: bool = False) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  add_generation_prompt=generation)["input_ids"])

    prompt_ids = ids(prompt, generation=True)
    full = [ids(prompt + completion) for completion in completions]
    return min(common_prefix_length(prompt_ids, f) for f in full), full


def truncation(tokenized: list[tuple[int, list[list[int]]]], max_length: int | None) -> dict[str, int]:
    """Examples `max_length` cuts (keeping the start, TRL's default), and those whose prompt alone fills it: TRL
    drops these, since no completion token is left."""
    if max_length is None:
        return {"truncated": 0, "emptied": 0}
    return {"truncated": sum(1 for _, full in tokenized if max(len(f) for f in full) > max_length),
            "emptied": sum(1 for start, _ in tokenized if start >= max_length)}


def _rendered(tokenizer: Any, start: int, ids: list[int]) -> str:
    return render_loss_tokens(tokenizer, {"input_ids": ids, "labels": [-100] * start + ids[start:]})
