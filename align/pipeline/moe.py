"""`method: moe` and `method: extract-lora` merge stages: `merge moe` and `merge extract-lora` (merge/moe.py,
merge/extract.py) with earlier stages' outputs wired in, and the MoE's routing prompts read when the recipe loads."""

from __future__ import annotations

from pathlib import Path

from align.core.errors import AlignError
from align.pipeline.stages import BASE, ExtractStage, MoEStage, Pipeline, PipelineRecipe, PreferenceStage, TrainStage
from align.pipeline.template import sft_stage_dir


def read_prompt_files(recipe: PipelineRecipe, recipe_dir: Path, where: str) -> None:
    """At load time: each expert's prompt file (relative to the recipe) becomes its list of prompts, so the stage's
    fingerprint covers the prompts and a missing file fails before any stage runs; `prompts_from_data` must name a
    training stage that reads one SFT data source."""
    from merge.moe import read_prompts

    stages = {s.name: s for s in recipe.stages}
    for stage in recipe.stages:
        if not isinstance(stage, MoEStage):
            continue
        for expert in stage.experts:
            here = f"{where}: stage '{stage.name}', expert '{expert.model}'"
            if isinstance(expert.prompts, str):
                path = Path(expert.prompts) if Path(expert.prompts).is_absolute() else recipe_dir / expert.prompts
                if not path.is_file():
                    raise AlignError(f"{here}: prompts file {path} not found (give a list, or a file with one "
                                     "prompt per line)")
                expert.prompts = read_prompts(str(path))
            source = stages.get(expert.model)
            if expert.prompts_from_data is not None and (not isinstance(source, TrainStage)
                                                         or isinstance(source, PreferenceStage)
                                                         or source.data.mixture is not None):  # type: ignore[attr-defined]
                raise AlignError(f"{here}: prompts_from_data needs the expert to be an SFT-data training stage "
                                 "reading one data.path (give `prompts` instead)")


def expert_prompts(stage: MoEStage, pipeline: Pipeline) -> list[list[str]]:
    """Each expert's routing prompts; `prompts_from_data: N` is the first user message of the first N rows of the
    expert stage's training data (no more than its `data.limit`), as raw text (mergekit-moe tokenizes prompts without
    a chat template)."""
    from align.core.data import load_sft_data
    from merge.moe import read_prompts

    prompts = []
    for expert in stage.experts:
        if isinstance(expert.prompts, str):  # a recipe built without load_pipeline: the file, relative to here
            prompts.append(read_prompts(expert.prompts))
            continue
        if expert.prompts_from_data is None:
            prompts.append(list(expert.prompts or []))
            continue
        data = next(s for s in pipeline.recipe.stages if s.name == expert.model).data  # type: ignore[attr-defined]
        limit = min(expert.prompts_from_data, data.limit or expert.prompts_from_data)  # only rows it trained on
        rows, _, _ = load_sft_data(pipeline.path(data.path), data.format, data.split, limit, config=data.config)
        prompts.append([next(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows
                        if any(m["role"] == "user" for m in row["messages"])])
    return prompts


def run_moe_stage(stage: MoEStage, pipeline: Pipeline) -> Path:
    """The recipe's model as base, the experts' outputs as experts; the tokenizer and chat template of the last SFT
    stage before this one (as merges take it), else the base's."""
    from merge.moe import MoERequest, run_moe

    template = sft_stage_dir(pipeline, stage.name)
    return run_moe(MoERequest(base=pipeline.path(BASE), experts=[pipeline.path(e.model) for e in stage.experts],
                              prompts=expert_prompts(stage, pipeline), out=pipeline.rundir / stage.name,
                              gate_mode=stage.gate_mode, experts_per_token=stage.experts_per_token, seed=stage.seed,
                              overwrite=True, allow_base_mismatch=stage.allow_base_mismatch,
                              template_source=str(template) if template else None))


def run_extract_stage(stage: ExtractStage, pipeline: Pipeline) -> Path:
    """`model` minus `base` as a LoRA adapter in RUNDIR/<name> (adapter files, tokenizer, merge.json)."""
    from merge.extract import ExtractRequest, run_extract_lora

    return run_extract_lora(ExtractRequest(
        model=pipeline.path(stage.model), base=pipeline.path(stage.base), out=pipeline.rundir / stage.name,
        rank=None if stage.rank == "auto" else stage.rank, min_agreement=stage.min_agreement, overwrite=True))
