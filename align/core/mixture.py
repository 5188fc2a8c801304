"""Dataset mixtures: several sources, each taken whole, as `rows` of it, or as a `weight` share of it.

Each source is read and normalized on its own (sources may differ in format), then sampled with a seeded random
generator of its own, so one source's size never changes what is drawn from another. Sampled rows keep their
order in the source and sources follow each other in recipe order; the trainer shuffles.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from align.core.config import MixtureSource
from align.core.data import DataError, Rows, fingerprint_rows

# Reads one source: (normalized rows, detected format, the raw Rows with skip counts), as load_sft_data returns.
SourceLoader = Callable[[MixtureSource], tuple[list[dict[str, Any]], str, Rows]]


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


def mix_sources(sources: list[MixtureSource], load: SourceLoader, seed: int, limit: int | None = None) -> Mixture:
    """Read every source with `load`, take what each asks for, and concatenate (the first `limit` rows)."""
    mixed: list[dict[str, Any]] = []
    locations: list[str] = []
    record: list[dict[str, Any]] = []
    skipped, problems = 0, []
    for index, source in enumerate(sources):
        rows, fmt, raw = load(source)
        picked = take_rows(list(range(len(rows))), source, seed, f"data.mixture[{index}] ({source.path})")
        taken = [rows[i] for i in picked]
        mixed += taken
        locations += [raw.kept[i] for i in picked]
        skipped += raw.skipped
        problems += raw.problems
        record.append({"path": source.path, "split": source.split, "format": fmt, "available": len(rows),
                       "taken": len(taken), "rows": source.rows, "weight": source.weight,
                       "fingerprint": fingerprint_rows(taken)})
    return Mixture(mixed[:limit], record, skipped, problems, locations[:limit])


def take_rows(rows: list[Any], source: MixtureSource, seed: int, where: str) -> list[Any]:
    """All rows, `source.rows` of them, or a `source.weight` share (whole repeats plus a sample for the fraction).

    The generator is seeded with the seed and the source's path, so the draw depends on nothing else."""
    rng = random.Random(f"{seed}:{source.path}:{source.split}")
    if source.rows is not None:
        if source.rows > len(rows):
            raise DataError(f"{where}: rows {source.rows} asked, but the source has only {len(rows)}")
        return sample_in_order(rows, source.rows, rng)
    if source.weight is None:
        return list(rows)
    repeats = math.floor(source.weight)
    extra = round((source.weight - repeats) * len(rows))
    taken = rows * repeats + sample_in_order(rows, extra, rng)
    if not taken:
        raise DataError(f"{where}: weight {source.weight} of {len(rows)} rows takes no row")
    return taken


def sample_in_order(rows: list[Any], count: int, rng: random.Random) -> list[Any]:
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), count))]
