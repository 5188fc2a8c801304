"""What truncation leaves to learn from, counted on the trainer's own prepared data.

TRL truncates while it prepares a dataset (SFT: every row to max_length, then it drops the rows left without a loss
token; DPO: it drops the pairs whose prompt alone fills max_length) and while it collates (DPO's completions). To
TRL none of that is an error: a run with nothing left crashed deep in the data loader, and one that lost half its
rows said nothing. So rows are numbered before the trainer sees them (`numbered`) and counted after it prepared them:
run.json records the rows read, the rows dropped (where they came from) and the tokens actually trained on; nothing
left is one line naming --max-length, and losing more than `WARN_SHARE` of the rows or tokens warns once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from align.core.errors import AlignError

log = logging.getLogger(__name__)

ROW_COLUMN = "alignmerge_row"
"""The row's position in the list handed to the trainer; the Trainer removes it before batches are collated."""
WARN_SHARE = 0.1
"""Truncation that drops more than this share of the rows, or cuts more of the tokens that carry loss, warns."""
SHOWN = 5
"""Dropped rows named in the warning and in run.json."""
COLLATE_CHUNK = 256


def numbered(rows: list[dict[str, Any]]) -> Any:
    """A datasets.Dataset of the rows, each carrying its position (`ROW_COLUMN`)."""
    from datasets import Dataset

    return Dataset.from_list([{**row, ROW_COLUMN: i} for i, row in enumerate(rows)])


@dataclass(frozen=True)
class Truncation:
    """What the trainer kept of the rows it was given."""

    unit: str
    """'rows' (SFT), 'pairs' (DPO) or 'examples' (KTO)."""
    tokens_name: str
    """'loss_tokens' (SFT) or 'completion_tokens' (DPO)."""
    max_length: int | None
    read: int
    dropped: list[int]
    """Positions of the rows the trainer dropped."""
    locations: list[str]
    """Where each row read came from (file and line)."""
    tokens_before: int
    tokens_after: int

    def record(self) -> dict[str, Any]:
        """run.json's `data.truncation`."""
        return {"max_length": self.max_length, f"{self.unit}_read": self.read,
                f"{self.unit}_dropped": len(self.dropped), f"{self.unit}_trained": self.read - len(self.dropped),
                "first_dropped": self.first_dropped(), self.tokens_name: self.tokens_after,
                f"{self.tokens_name}_before_truncation": self.tokens_before}

    def first_dropped(self) -> list[str]:
        return [self.locations[i] for i in self.dropped[:SHOWN]]

    def lost_share(self) -> float:
        rows = len(self.dropped) / self.read if self.read else 0.0
        tokens = 1 - self.tokens_after / self.tokens_before if self.tokens_before else 0.0
        return max(rows, tokens)


def kept_positions(dataset: Any, rows: int) -> list[int]:
    """Positions of the rows a prepared dataset still holds. Packing drops the numbering but no row (it only cuts
    rows to max_length), so then every row is kept."""
    if ROW_COLUMN not in dataset.column_names:
        return list(range(rows))
    return [int(i) for i in dataset[ROW_COLUMN]]


def dropped_positions(dataset: Any, rows: int) -> list[int]:
    return sorted(set(range(rows)) - set(kept_positions(dataset, rows)))


def sft_truncation(trainer: Any, rows: list[dict[str, list[int]]], locations: list[str]) -> Truncation:
    """SFT: rows and loss tokens as SFTTrainer prepared them (truncated, fully masked rows dropped, maybe packed)."""
    import pyarrow.compute as pc

    labels = pc.list_flatten(trainer.train_dataset.with_format("arrow")[:]["labels"])
    after = int(pc.sum(pc.not_equal(labels, -100)).as_py() or 0)
    before = sum(sum(1 for label in row["labels"] if label != -100) for row in rows)
    return Truncation("rows", "loss_tokens", trainer.args.max_length, len(rows),
                      dropped_positions(trainer.train_dataset, len(rows)), locations, before, after)


def completion_truncation(trainer: Any, unit: str, columns: tuple[str, ...], read: int,
                          locations: list[str]) -> Truncation:
    """A preference trainer's rows kept, and the completion tokens of those rows before and after its collator
    truncates them: the mask the loss is summed over."""
    import pyarrow.compute as pc

    dataset = trainer.train_dataset
    table = dataset.with_format("arrow")[:]
    before = sum(int(pc.sum(pc.list_value_length(table[name])).as_py() or 0) for name in columns)
    after = 0
    for start in range(0, len(dataset), COLLATE_CHUNK):
        chunk = dataset[start:start + COLLATE_CHUNK]
        examples = [dict(zip(chunk, values)) for values in zip(*chunk.values())]
        after += int(trainer.data_collator(examples)["completion_mask"].sum())
    return Truncation(unit, "completion_tokens", trainer.args.max_length, read, dropped_positions(dataset, read),
                      locations, before, after)


def dpo_truncation(trainer: Any, pairs: int, locations: list[str]) -> Truncation:
    """DPO: the pairs DPOTrainer kept and their completion tokens (through ours collator, when prompt or completion
    lengths are limited)."""
    return completion_truncation(trainer, "pairs", ("chosen_ids", "rejected_ids"), pairs, locations)


def kto_truncation(trainer: Any, examples: int, locations: list[str]) -> Truncation:
    """KTO: the labelled examples KTOTrainer kept (it drops those whose prompt fills max_length) and their
    completion tokens."""
    return completion_truncation(trainer, "examples", ("completion_ids",), examples, locations)


def check_truncation(kept: Truncation, first_needs: int | None) -> dict[str, Any]:
    """Refuse a run that truncation left nothing to learn from, warn once when it cut away much; the record.
    `first_needs`: the shortest --max-length that keeps the first row's learning signal."""
    left = kept.read - len(kept.dropped)
    if left == 0 or kept.tokens_after == 0:
        need = f"; the first ({kept.locations[0]}) needs --max-length {first_needs} or more" if first_needs else ""
        raise AlignError(f"--max-length {kept.max_length} leaves nothing to train on: truncation removes the "
                         f"{kept.tokens_name.replace('_', ' ')} of all {kept.read} {kept.unit}{need}")
    if kept.lost_share() > WARN_SHARE:
        losses = []
        if kept.dropped:
            losses.append(f"drops {len(kept.dropped)} of {kept.read} {kept.unit} ({', '.join(kept.first_dropped())})")
        if kept.tokens_after < kept.tokens_before:
            losses.append(f"cuts {1 - kept.tokens_after / kept.tokens_before:.0%} of the "
                          f"{kept.tokens_name.replace('_', ' ')}")
        log.warning("--max-length %s %s; raise it to train on them", kept.max_length, " and ".join(losses))
    return kept.record()


def check_eval_kept(trainer: Any, rows: int) -> None:
    """Eval rows go through the same truncation; an eval set it empties would crash the first evaluation."""
    if rows and trainer.eval_dataset is not None and len(trainer.eval_dataset) == 0:
        raise AlignError(f"--max-length {trainer.args.max_length} leaves none of the {rows} eval rows: truncation "
                         "removes everything they would be scored on")


def shortest_keeping(labels: list[int], mode: str) -> int | None:
    """The shortest max_length at which one loss token of a row survives truncation (keep_start keeps the first
    tokens, keep_end the last); None for a row without any."""
    marked = [i for i, label in enumerate(labels) if label != -100]
    if not marked:
        return None
    return len(labels) - marked[-1] if mode == "keep_end" else marked[0] + 1


def check_prompts_fit(prompt_lengths: Any, locations: list[str], max_length: int | None, mode: str) -> None:
    """DPO, before any model loads: DPOTrainer drops every pair whose prompt alone fills max_length (keep_start) and,
    with none left, fails while precomputing or at its first batch. `prompt_lengths` yields each pair's prompt
    token count, in order, lazily: the first that fits ends the check."""
    if max_length is None or mode != "keep_start":
        return
    first = None
    for length in prompt_lengths:
        if length < max_length:
            return
        first = length if first is None else first
    if first is not None:
        raise AlignError(f"--max-length {max_length} leaves nothing to train on: every prompt is at least that long, "
                         f"so no completion token is left; the first ({locations[0]}) needs --max-length {first + 1} "
                         "or more")


def prompt_lengths(tokenizer: Any, pairs: list[dict[str, Any]]) -> Iterator[int]:
    """Each pair's prompt in tokens, as DPOTrainer tokenizes a conversational prompt: the chat template with the
    generation prompt, no special tokens added."""
    from align.core.data import render_chat

    for pair in pairs:
        text = render_chat(tokenizer, pair["prompt"], add_generation_prompt=True)
        yield len(tokenizer(text, add_special_tokens=False)["input_ids"])
