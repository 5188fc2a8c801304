"""The schema of an `align run` recipe: one pydantic model per stage kind, how stages name each other, and the
`Pipeline` wiring that turns a stage name into the path of its output."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, create_model, field_validator, model_validator

from align.core.config import ModelSpec, Section
from align.core.errors import AlignError, did_you_mean
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
    """On-policy preference pairs: sample the adapter `samples` times on each prompt and judge the samples. The rule
    judge keeps wrong answers as `rejected` against the reference answer as `chosen` (tasks whose answers can be
    checked by exact match); a scoring judge (a reward model or a reward function) pairs each prompt's best sample,
    as `chosen`, against its worst, so the data needs no reference answer."""

    kind: Literal["pairs"]
    adapter: str
    data: str = "builtin:pig-latin"
    """Judge rule: conversations whose last assistant message is the reference answer. A scoring judge: prompts
    (rows with a `prompt` column, or conversations, whose last assistant message is then the answer `exact` reads)."""
    split: str | None = None
    limit: int = Field(default=256, gt=0)
    samples: int = Field(default=4, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=64, gt=0)
    seed: int = 0
    judge: str = "rule"
    """rule (a sample equal to the reference answer is right), rm:DIR or rm:STAGE (a reward model's score: an `align
    rm` dir or an earlier rm stage, on the adapter's tokenizer), or a reward as `align grpo --reward` takes it
    (pig-latin, exact, regex:PATTERN, length[:N], FILE.py:FUNCTION)."""
    min_margin: float = Field(default=0.1, gt=0)
    """A scoring judge's least score difference between a prompt's best and worst sample; a prompt whose samples
    differ by less gives no pair (skipped and counted). A tenth of the [0, 1] range of the built-in rewards; for a
    reward model, sigmoid(margin) is the Bradley-Terry probability that the chosen sample is preferred (0.52 at
    0.1), so a stricter judge takes a larger margin."""

    @field_validator("judge")
    @classmethod
    def _known_judge(cls, value: str) -> str:
        if value == "rule" or value.startswith("rm:"):
            if value == "rm:":
                raise ValueError("judge rm: names no reward model (rm:DIR or rm:STAGE)")
            return value
        from align.train.rewards import parse_reward

        try:  # rewards are checked (a user's file imported) as the recipe loads, not after sampling
            parse_reward(value, 1)
        except AlignError as exc:
            raise ValueError(f"judge {str(exc).removeprefix('--reward ')} (or rule)") from None
        return value

    def reward_model(self) -> str | None:
        """The reward model a judge `rm:X` names (a stage or a dir), else None."""
        return self.judge.removeprefix("rm:") if self.judge.startswith("rm:") else None


def reward_models(stage: Any) -> list[str]:
    """The reward models a stage reads (a stage name or a dir each): a pairs stage's judge `rm:X`, a GRPO stage's
    rewards `rm:X`."""
    if isinstance(stage, PairsStage):
        return [stage.reward_model()] if stage.reward_model() else []
    return [r.removeprefix("rm:") for r in getattr(stage, "rewards", None) or [] if r.startswith("rm:")]


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
            known = [*MERGE_METHODS, *OWN_FIELDS]
            raise ValueError(f"unknown merge method {value!r}{did_you_mean(value, known)}")
        return value

    @model_validator(mode="after")
    def _sweep_needs_selection(self) -> MergeStage:
        if len(self.candidates()) > 1 and self.select is None:
            raise ValueError("a sweep (several t or weight sets) needs a `select` section")
        return self


class MoEExpert(Section):
    """One expert of a `method: moe` merge stage and the prompts that route tokens to it."""

    model: str
    """An earlier stage (an SFT/DPO adapter, merged into its base first, or a merged model) or a model/adapter path."""
    prompts: list[str] | str | None = None
    """Routing prompts: a list, or a text file with one prompt per line (relative to the recipe)."""
    prompts_from_data: int | None = Field(default=None, gt=0)
    """Instead of `prompts`: the first user message of each of the first N rows of stage `model`'s training data
    (`data.path`, at most its `data.limit` rows), as raw text."""

    @model_validator(mode="after")
    def _one_source_of_prompts(self) -> MoEExpert:
        if self.prompts is not None and self.prompts_from_data is not None:
            raise ValueError(f"expert {self.model!r}: give `prompts` or `prompts_from_data`, not both")
        return self


class MoEStage(StageSpec):
    """`merge moe` as a stage: a mixture of experts by mergekit-moe (merge/moe.py), on the recipe's model as base."""

    kind: Literal["merge"]
    method: Literal["moe"]
    experts: list[MoEExpert]
    gate_mode: str = "hidden"
    """hidden (router vectors from the prompts' hidden states; runs the base), cheap_embed, or random."""
    experts_per_token: int = 2
    seed: int | None = None
    """For gate mode random."""
    allow_base_mismatch: bool = False
    """Take adapters trained on another base than the recipe's model (refused otherwise)."""

    @model_validator(mode="after")
    def _counts(self) -> MoEStage:
        from merge.moe import check_counts

        if self.gate_mode != "random" and any(e.prompts is None and e.prompts_from_data is None for e in self.experts):
            missing = next(e.model for e in self.experts if e.prompts is None and e.prompts_from_data is None)
            raise ValueError(f"expert {missing!r} has no `prompts` or `prompts_from_data` "
                             f"(gate mode {self.gate_mode} routes by them)")
        # prompts read later (a file, a stage's data) stand in as one distinct placeholder each; run_moe checks them
        known = [e.prompts if isinstance(e.prompts, list) else [f"<{e.model}>"] if self.gate_mode != "random" else []
                 for e in self.experts]
        try:
            check_counts(self.gate_mode, self.experts_per_token, len(self.experts), known)
        except AlignError as exc:
            raise ValueError(str(exc)) from None
        return self


class ExtractStage(StageSpec):
    """`merge extract-lora` as a stage: an earlier model stage minus the base, as a PEFT LoRA adapter on the base
    (merge/extract.py); later stages and eval take it as any adapter."""

    kind: Literal["merge"]
    method: Literal["extract-lora"]
    model: str
    """The stage (or model/adapter path) whose difference from the base is extracted."""
    base: str = BASE
    """The full model the adapter applies to: the recipe's model unless named."""
    rank: int | Literal["auto"]
    min_agreement: float | None = None
    """With rank auto: the top-1 agreement with `model` on fixed prompts to keep (merge extract-lora's default)."""

    @model_validator(mode="after")
    def _rank(self) -> ExtractStage:
        from merge.extract import ExtractRequest, check_request

        request = ExtractRequest(self.model, self.base, Path(), None if self.rank == "auto" else self.rank,
                                 self.min_agreement)
        try:
            check_request(request)
        except AlignError as exc:
            raise ValueError(str(exc).replace("--min-agreement", "min_agreement").replace("--rank", "rank")) from None
        return self


OWN_FIELDS: dict[str, type[StageSpec]] = {"moe": MoEStage, "extract-lora": ExtractStage}
"""Merge methods that are their own commands (`merge moe`, `merge extract-lora`), so their stages have own fields."""


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


def stage_tag(data: Any) -> str | None:
    """Which stage model reads a stage: its `kind`, or `merge/METHOD` for the merge methods with own fields."""
    def get(key: str) -> Any:
        return data.get(key) if isinstance(data, dict) else getattr(data, key, None)

    kind, method = get("kind"), get("method")
    return f"merge/{method}" if kind == "merge" and method in OWN_FIELDS else kind


KINDS = [*TRAINING_STAGES, "pairs", "merge", "eval", "export"]
Stage = Annotated[Union[(*(Annotated[cls, Tag(kind)] for kind, cls in TRAINING_STAGES.items()),  # type: ignore[valid-type]
                         Annotated[PairsStage, Tag("pairs")], Annotated[MergeStage, Tag("merge")],
                         *(Annotated[cls, Tag(f"merge/{m}")] for m, cls in OWN_FIELDS.items()),
                         Annotated[EvalStage, Tag("eval")], Annotated[ExportStage, Tag("export")])],
                  Discriminator(stage_tag, custom_error_type="stage_kind",
                                custom_error_message=f"a stage's kind must be one of {', '.join(KINDS)}")]


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

    @model_validator(mode="after")
    def _judges_are_reward_models(self) -> PipelineRecipe:
        kinds = {stage.name: stage.kind for stage in self.stages}
        for stage in self.stages:
            what = "judge" if isinstance(stage, PairsStage) else "reward"
            for target in reward_models(stage):
                if target in kinds and kinds[target] != "rm":
                    raise ValueError(f"stage '{stage.name}': {what} rm:{target} names a {kinds[target]} stage, not a "
                                     "reward model (an rm stage)")
        return self


def stage_refs(stage: Any) -> list[str]:
    """Names a stage reads from (earlier stages or 'base'), for validation, fingerprints and wiring.
    Paths, hub ids and `builtin:` sources are not names."""
    return [ref for ref in _referenced(stage) if re.fullmatch(r"[A-Za-z0-9_-]+", ref)]


def _referenced(stage: Any) -> list[str]:
    if isinstance(stage, PairsStage):
        return [stage.adapter, *reward_models(stage)]
    if isinstance(stage, TrainStage):
        data = [stage.data.path] if isinstance(stage, PreferenceStage) else []
        return [r for r in (stage.model, getattr(stage, "adapter", None), *data, *reward_models(stage)) if r]
    if isinstance(stage, MergeStage):
        return [*stage.models, *([stage.base] if stage.base else []), *(split_slice(s)[0] for s in stage.slices)]
    if isinstance(stage, MoEStage):
        return [e.model for e in stage.experts]
    if isinstance(stage, ExtractStage):
        return [stage.model, stage.base]
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

    def reward_spec(self, spec: str) -> str:
        """A reward (or judge) as `--reward` takes it: `rm:STAGE` becomes `rm:RUNDIR/STAGE`; a dir stays as written."""
        return f"rm:{self.path(spec.removeprefix('rm:'))}" if spec.startswith("rm:") else spec

