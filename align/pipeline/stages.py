"""The schema of an `align run` recipe: one pydantic model per stage kind, how stages name each other, and the
`Pipeline` wiring that turns a stage name into the path of its output."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, create_model, field_validator, model_validator

from align.core.config import ModelSpec, Section
from align.core.errors import did_you_mean
from align.train.methods import METHODS, TrainingMethod

BASE = "base"
RECORDS = {**{name: method.record for name, method in METHODS.items()}, "pairs": "pairs.json", "merge": "merge.json",
           "eval": "report.json", "export": "export.json"}
"""The record each stage kind writes last: its presence means the stage's output is complete."""


class StageSpec(Section):
    name: str
    """How later stages refer to this one; also its dir under RUNDIR."""


class TrainStage(StageSpec):
    """A training stage is its command's recipe (every field `align sft`/`align dpo` takes, with the same defaults
    and checks), except what the pipeline owns: the model (the recipe's, or an earlier stage's) and the output."""

    model: str | None = None  # type: ignore[assignment]  # a stage name here, the recipe's ModelSpec otherwise
    """Train on an earlier stage's model (e.g. a stacked one, to heal it) instead of the recipe's model."""

    @model_validator(mode="before")
    @classmethod
    def _pipeline_owns_the_output(cls, data: Any) -> Any:
        for key in PIPELINE_OWNED:
            if isinstance(data, dict) and key in data:
                raise ValueError(f"'{key}' is set by the pipeline (a stage writes RUNDIR/<name>), not by a stage")
        return data

    def recipe_fields(self) -> dict[str, Any]:
        """The fields the stage passes on to its command's recipe: those it sets, so the recipe tells a value the
        stage asked for from a default (a lora.* value is checked against an adapter being continued)."""
        return self.model_dump(exclude={"name", "kind", "model", *PIPELINE_OWNED}, exclude_unset=True)


PIPELINE_OWNED = ("output", "resume", "overwrite", "force")


class PairsStage(StageSpec):
    """On-policy preference pairs: sample the adapter on training prompts, keep wrong answers as `rejected`
    against the reference answer as `chosen` (for tasks whose answers can be checked by exact match)."""

    kind: Literal["pairs"]
    adapter: str
    data: str = "builtin:pig-latin"
    """Conversations whose last assistant message is the reference answer."""
    split: str | None = None
    limit: int = Field(default=256, gt=0)
    samples: int = Field(default=4, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=64, gt=0)
    seed: int = 0


class PreferenceStage(TrainStage):
    """A training stage of a method that reads pairs: `adapter` is a stage name (or adapter dir); `data.path` (or
    `data` alone) a `pairs` stage name, or any preference data source."""

    @field_validator("data", mode="before", check_fields=False)
    @classmethod
    def _data_may_be_a_name(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


def training_stage(method: TrainingMethod) -> type[TrainStage]:
    """The stage kind of a training method: its command's recipe, with `kind: NAME` and what the pipeline owns."""
    base = TrainStage if method.data == "sft" else PreferenceStage
    return create_model(f"{method.name.upper()}Stage", __base__=(base, method.recipe), __module__=__name__,
                        kind=(Literal[method.name], ...))  # type: ignore[valid-type]


TRAINING_STAGES: dict[str, type[TrainStage]] = {name: training_stage(m) for name, m in METHODS.items()}
SFTStage = TRAINING_STAGES["sft"]
DPOStage = TRAINING_STAGES["dpo"]


class SelectSpec(Section):
    """How a merge sweep picks its candidate: an eval suite and a metric (or a weighted sum of metrics)."""

    suite: str = "pig-latin"
    metric: str | dict[str, float] = "seen/exact_match"
    """`task/metric`, or {`task/metric`: weight, ...} for a weighted sum."""
    limit: int | None = 50
    batch_size: int = Field(default=16, gt=0)
    """Generation batch size of the selection eval (larger is faster on CPU, up to memory)."""


class MergeStage(StageSpec):
    kind: Literal["merge"]
    method: str = "slerp"
    """A `merge` method (merge/methods.py's registry), checked when the recipe loads, not after training."""
    models: list[str] = []
    base: str | None = None
    slices: list[str] = []
    """For method `stack`: `NAME:START-END` layer ranges, NAME a stage or `base`."""
    t: float | list[float] | None = None
    weights: list[float] | list[list[float]] | None = None
    density: float | None = None
    as_adapter: bool = False
    allow_base_mismatch: bool = False
    """Merge adapters against a base they were not trained on (refused otherwise)."""
    select: SelectSpec | None = None
    """Required when t or weights list several candidates."""

    def candidates(self) -> list[dict[str, Any]]:
        if isinstance(self.t, list):
            return [{"t": t} for t in self.t]
        if self.weights and isinstance(self.weights[0], list):
            return [{"weights": w} for w in self.weights]  # type: ignore[union-attr]
        return [{"t": self.t} if self.t is not None else {"weights": self.weights}]

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from merge.methods import METHODS as MERGE_METHODS

        if value not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {value!r}{did_you_mean(value, list(MERGE_METHODS))}")
        return value

    @model_validator(mode="after")
    def _sweep_needs_selection(self) -> MergeStage:
        if len(self.candidates()) > 1 and self.select is None:
            raise ValueError("a sweep (several t or weight sets) needs a `select` section")
        return self


class EvalStage(StageSpec):
    kind: Literal["eval"]
    suites: list[str]
    models: list[str]
    limit: int | None = None
    batch_size: int = 16


class ExportStage(StageSpec):
    """An earlier stage's model (or `base`) as one GGUF file, RUNDIR/<name>/model.gguf (what `align export` writes)."""

    kind: Literal["export"]
    model: str
    """The stage whose model is exported: a merge, or an SFT/DPO adapter (merged into its base at full precision)."""
    type: Literal["f16", "q8_0"] = "f16"
    verify: bool = True
    """Load the file back through transformers' GGUF loader and record the logit comparison in export.json."""


Stage = Annotated[Union[(*TRAINING_STAGES.values(), PairsStage, MergeStage, EvalStage, ExportStage)],  # type: ignore[valid-type]
                  Field(discriminator="kind")]


class PipelineRecipe(Section):
    model: ModelSpec = ModelSpec()
    stages: list[Stage]

    @model_validator(mode="after")
    def _names_resolve(self) -> PipelineRecipe:
        seen: set[str] = {BASE}
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stage name '{stage.name}' is used twice (or is the reserved name 'base')")
            for ref in stage_refs(stage):
                if ref not in seen and not Path(ref).exists() and not ref.startswith("builtin:"):
                    raise ValueError(f"stage '{stage.name}' refers to '{ref}', which is not an earlier stage")
            seen.add(stage.name)
        return self


def stage_refs(stage: Any) -> list[str]:
    """Names a stage reads from (earlier stages or 'base'), for validation, fingerprints and wiring.
    Paths, hub ids and `builtin:` sources are not names."""
    return [ref for ref in _referenced(stage) if re.fullmatch(r"[A-Za-z0-9_-]+", ref)]


def _referenced(stage: Any) -> list[str]:
    if isinstance(stage, PairsStage):
        return [stage.adapter]
    if isinstance(stage, TrainStage):
        data = [stage.data.path] if isinstance(stage, PreferenceStage) else []
        return [r for r in (stage.model, getattr(stage, "adapter", None), *data) if r]
    if isinstance(stage, MergeStage):
        return [*stage.models, *([stage.base] if stage.base else []), *(split_slice(s)[0] for s in stage.slices)]
    if isinstance(stage, EvalStage):
        return list(stage.models)
    if isinstance(stage, ExportStage):
        return [stage.model]
    return []


def split_slice(text: str) -> tuple[str, str]:
    name, _, layers = text.rpartition(":")
    return name, layers


@dataclass
class Pipeline:
    recipe: PipelineRecipe
    rundir: Path
    model_fingerprint: str
    fingerprints: dict[str, str]

    def path(self, name: str) -> str:
        """What a name means as a model/adapter/data argument."""
        if name == BASE:
            return self.recipe.model.name
        if any(s.name == name for s in self.recipe.stages):
            stage = next(s for s in self.recipe.stages if s.name == name)
            out = self.rundir / name
            return str(out / "pairs.jsonl") if isinstance(stage, PairsStage) else str(out)
        return name

