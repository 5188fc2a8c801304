"""Dataset mixtures: several sources, each taken whole, as `rows` of it, or as a `weight` share of it.

Each source is read on its own, sampled with a seeded random generator of its own (so one source's size never
changes what is drawn from another), and only then normalized, sources possibly differing in format. Sampled rows
keep their order in the source and sources follow each other in recipe order; the trainer shuffles. A `limit` cuts
the mix before any row is checked, as `--limit` cuts a single file before its rows are read: rows that are not
used are never validated, whether there is one source or several.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from align.core.config import MixtureSource
from align.core.data import DataError, Rows, fingerprint_rows, read_rows

# Normalizes one source's taken raw rows: (normalized items, detected format). It may count skipped rows on the Rows.
SourceNormalizer = Callable[[MixtureSource, Rows], tuple[list[dict[str, Any]], str]]


@dataclass
class Mixture:
    rows: list[dict[str, Any]]
    sources: list[dict[str, Any]]
    """Per source: path, split, format, rows available, rows taken, and the fingerprint of what was taken."""
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        return "+".join(dict.fromkeys(s["format"] for s in self.sources))

    locations: list[str] = field(default_factory=list)
    """Where each row came from (its source's file and line)."""

    def as_loaded(self) -> tuple[list[dict[str, Any]], str, Rows]:
        """The same triple a single source's loader returns, for code that handles both alike."""
        return self.rows, self.format, Rows("data.mixture", self.rows, self.locations, self.skipped, self.problems,
                                            kept=self.locations)


def mix_sources(sources: list[MixtureSource], normalize: SourceNormalizer, seed: int,
                limit: int | None = None) -> Mixture:
    """Read every source, take what each asks for, keep the first `limit` rows of the mix, normalize them."""
    mixed: list[dict[str, Any]] = []
    locations: list[str] = []
    record: list[dict[str, Any]] = []
    skipped, problems, used = 0, [], 0
    for index, source in enumerate(sources):
        left = None if limit is None else limit - used  # rows, as --limit counts a single file's
        if left == 0:
            break
        raw = read_rows(source.path, source.split, config=source.config)
        picked = take_indices(len(raw), source, seed, f"data.mixture[{index}] ({source.path})")[:left]
        used += len(picked)
        taken = Rows(raw.source, [raw.rows[i] for i in picked], [raw.locations[i] for i in picked])
        items, fmt = normalize(source, taken)
        mixed += items
        locations += taken.kept
        skipped += taken.skipped
        problems += taken.problems
        record.append({"path": source.path, "split": source.split, "format": fmt, "available": len(raw),
                       "taken": len(items), "rows": source.rows, "weight": source.weight,
                       "fingerprint": fingerprint_rows(items)})
    return Mixture(mixed, record, skipped, problems, locations)


def take_indices(available: int, source: MixtureSource, seed: int, where: str) -> list[int]:
    """Which of a source's rows it contributes: all, `source.rows` of them, or a `source.weight` share (whole
    repeats plus a sample for the fraction).

    The generator is seeded with the seed and the source's path, so the draw depends on nothing else."""
    rng = random.Random(f"{seed}:{source.path}:{source.split}")
    everything = list(range(available))
    if source.rows is not None:
        if source.rows > available:
            raise DataError(f"{where}: rows {source.rows} asked, but the source has only {available}")
        return sample_in_order(available, source.rows, rng)
    if source.weight is None:
        return everything
    repeats = math.floor(source.weight)
    extra = round((source.weight - repeats) * available)
    taken = everything * repeats + sample_in_order(available, extra, rng)
    if not taken:
        raise DataError(f"{where}: weight {source.weight} of {available} rows takes no row")
    return taken


def sample_in_order(available: int, count: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(range(available), count))
