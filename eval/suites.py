"""Suites: a YAML file (or a built-in name) listing tasks. Validated once here; everything later trusts it.

A task is data (a file, hub dataset or `builtin:NAME`) + a kind + metrics:

    tasks:
      - name: seen
        kind: generate            # generate | choice | perplexity | preference
        data: builtin:pig-latin
        split: seen
        metrics: [exact_match, word_accuracy, chrf]
        generation: {max_new_tokens: 48}

Relative data paths are read relative to the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from align.core.config import load_yaml, validate
from align.core.errors import AlignError, did_you_mean

BUILTIN_SUITES_DIR = Path(__file__).parent / "builtin"
METRICS_DIR = Path(__file__).parent / "metrics"

TaskKind = Literal["generate", "choice", "perplexity", "preference"]

# What each kind reports when the suite names no metrics; only `generate` takes text metrics from the suite,
# the other kinds compute their scores from log-probabilities.
DEFAULT_METRICS: dict[str, list[str]] = {
    "generate": ["exact_match"],
    "choice": ["accuracy", "accuracy_norm"],
    "perplexity": ["perplexity"],
    "preference": ["preference_accuracy", "logprob_margin"],
}


def shipped_metrics() -> list[str]:
    """Names of the `evaluate` modules that ship in eval/metrics/<name>/<name>.py."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationSpec(Section):
    max_new_tokens: int = Field(default=64, gt=0)
    do_sample: bool = False
    """Greedy unless set; sampling is seeded by `--seed`."""
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class TaskSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: TaskKind
    data: str
    """A local jsonl/json/csv/parquet file, a hub dataset id, or `builtin:NAME`."""
    split: str | None = None
    limit: int | None = Field(default=None, gt=0)
    metrics: list[str] = []
    """`generate` only: shipped metric names, paths to `evaluate` module dirs, or `hub:NAME` (needs the network)."""
    system: str | None = None
    """A system message put before every prompt."""
    generation: GenerationSpec = GenerationSpec()
    max_length: int = Field(default=1024, gt=1)
    """`perplexity`: texts are truncated to this many tokens."""

    @model_validator(mode="after")
    def check_metrics(self) -> TaskSpec:
        if self.metrics and self.kind != "generate":
            raise ValueError(f"task '{self.name}': only generate tasks take metrics; {self.kind} always reports "
                             f"{', '.join(DEFAULT_METRICS[self.kind])}")
        shipped = shipped_metrics()
        for metric in self.metrics:
            if metric in shipped or metric.startswith("hub:") or Path(metric).is_dir():
                continue
            raise ValueError(f"task '{self.name}': unknown metric '{metric}'{did_you_mean(metric, shipped)} "
                             f"(shipped: {', '.join(shipped)}; or a module dir, or hub:NAME)")
        return self

    @property
    def metric_names(self) -> list[str]:
        return self.metrics or DEFAULT_METRICS[self.kind]


class SuiteSpec(Section):
    name: str
    description: str = ""
    tasks: list[TaskSpec] = Field(min_length=1)

    @field_validator("tasks")
    @classmethod
    def unique_names(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique: {', '.join(duplicates)} repeated")
        return tasks


def builtin_suites() -> list[str]:
    return sorted(p.stem for p in BUILTIN_SUITES_DIR.glob("*.yaml"))


def load_suite(name_or_path: str | Path) -> SuiteSpec:
    """A built-in suite by name, or a YAML file. Relative data paths become paths next to the YAML file."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        if str(name_or_path) not in builtin_suites():
            raise AlignError(f"--suite {name_or_path}: neither a YAML file nor a built-in suite"
                             f"{did_you_mean(str(name_or_path), builtin_suites())} "
                             f"(built-in: {', '.join(builtin_suites())})")
        path = BUILTIN_SUITES_DIR / f"{name_or_path}.yaml"
    # the recipes' reader: one-line errors, and YAML 1.2 numbers (`lr: 1e-4` is a float, not a string)
    raw = load_yaml(path, "suite", "expected a mapping with 'name' and 'tasks'")
    raw.setdefault("name", path.stem)
    suite = validate(SuiteSpec, raw, str(path))
    for task in suite.tasks:
        task.data = _anchor(task.data, path.parent)
    return suite


def _anchor(data: str, base: Path) -> str:
    """A relative file path in a suite means a file beside the suite, not beside the current directory."""
    if data.startswith("builtin:") or Path(data).is_absolute():
        return data
    candidate = base / data
    return str(candidate) if candidate.exists() or data.endswith((".jsonl", ".json", ".csv", ".parquet")) else data
