"""`align run RECIPE`: the whole loop as named stages (sft, pairs, dpo, merge (moe, extract-lora too), eval), each a call of the same
plain function the single commands use, with outputs in RUNDIR/<stage>/.

A stage is skipped when its output is complete (its final record exists) and its fingerprint, which covers its
resolved config, the model and every upstream stage's fingerprint, is unchanged; `--from` forces a stage and all
after it, `--only` runs one stage.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from align.core.artifacts import reset_peak_memory, is_complete, read_json_record, write_json
from align.core.config import ModelSpec, TrainRecipe, check_trl_keys, load_yaml, parse_set, validate
from align.core.dotted import set_path
from align.core.errors import AlignError
from align.core.trl_fields import check_trl_values
from align.pipeline.export import run_export_stage
from align.pipeline.moe import read_prompt_files, run_extract_stage, run_moe_stage
from align.pipeline.pairs import run_pairs_stage
from align.pipeline.report import run_eval_stage, write_report
from align.pipeline.stages import (RECORDS, EvalStage, ExtractStage, MergeStage, MoEStage, Pipeline, PipelineRecipe,
                                   PreferenceStage, TrainStage, reward_models, stage_refs)
from align.pipeline.sweep import run_merge_stage
from align.pipeline.template import check_sft_template
from align.train.methods import METHODS


def load_pipeline(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> PipelineRecipe:
    """Read a pipeline recipe; `--set STAGE.key=value` (or `model.key=value`) overrides it."""
    data = load_yaml(path)
    stages = {s.get("name"): s for s in data.get("stages", []) if isinstance(s, dict)}
    for key, value in parse_set(sets):
        head, _, rest = key.partition(".")
        if head == "model":
            set_path(data, key, value)
        elif head in stages and rest:
            set_path(stages[head], rest, value)
        else:
            raise AlignError(f"--set {key}: '{head}' is neither 'model' nor a stage of {path} "
                             f"({', '.join(n for n in stages if n)})")
    recipe = validate(PipelineRecipe, data, str(path))
    anchor_suite_paths(recipe, Path(path).parent)
    read_prompt_files(recipe, Path(path).parent, str(path))
    for stage in recipe.stages:
        check_stage_train(stage, f"{path}: stage '{stage.name}'")
    return recipe


def check_stage_train(stage: Any, where: str) -> None:
    """A training stage's `train` section checked as its command checks it, before any stage runs: keys against the
    method's TRL config, values coerced and in range (`align.core.trl_fields`)."""
    if isinstance(stage, TrainStage):
        config = METHODS[stage.kind].config_class()
        check_trl_keys(stage.train, config, where)
        check_trl_values(stage, config, where)  # refuses; the stage's own validation already typed its fields


def anchor_suite_paths(recipe: PipelineRecipe, base: Path) -> None:
    """Suite files named in a recipe are relative to the recipe, not to wherever `align run` was started."""
    def anchored(suite: str) -> str:
        return str(base / suite) if suite.endswith((".yaml", ".yml")) and not Path(suite).is_absolute() else suite

    for stage in recipe.stages:
        if isinstance(stage, EvalStage):
            stage.suites = [anchored(s) for s in stage.suites]
        if isinstance(stage, MergeStage) and stage.select is not None:
            stage.select.suite = anchored(stage.select.suite)


def fingerprint(stage: Any, pipeline: Pipeline, model: ModelSpec) -> str:
    upstream = {ref: pipeline.fingerprints.get(ref, ref) for ref in stage_refs(stage)}
    payload = json.dumps({"stage": stage.model_dump(mode="json"), "model": model.model_dump(mode="json"),
                          "model_fingerprint": pipeline.model_fingerprint, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_pipeline(recipe: PipelineRecipe, rundir: Path, start_from: str | None = None, only: str | None = None,
                 progress: bool = True) -> Path:
    from align.core.models import resolve_model

    names = [s.name for s in recipe.stages]
    for wanted, flag in ((start_from, "--from"), (only, "--only")):
        if wanted is not None and wanted not in names:
            raise AlignError(f"{flag} {wanted}: no such stage (stages: {', '.join(names)})")
    rundir.mkdir(parents=True, exist_ok=True)
    state_path = rundir / "pipeline.json"
    state = read_state(state_path)
    pipeline = Pipeline(recipe, rundir, resolve_model(recipe.model.name).fingerprint, {})
    forced = False
    say = _say if progress else (lambda _: None)
    timings: dict[str, float] = dict(state.get("timings_s", {}))
    for stage in recipe.stages:
        forced = forced or stage.name == start_from
        stage_dir = rundir / stage.name
        fp = fingerprint(stage, pipeline, recipe.model)
        pipeline.fingerprints[stage.name] = fp
        done = is_complete(stage_dir, RECORDS[stage.kind]) and state["stages"].get(stage.name) == fp
        if only is not None and stage.name != only:
            if not done:
                if names.index(stage.name) < names.index(only):
                    raise AlignError(f"--only {only}: upstream stage '{stage.name}' is not complete; run it first")
            continue
        if done and not forced and only is None:
            say(f"[{stage.name}] up to date, skipped")
            continue
        say(f"[{stage.name}] running {stage.kind}")
        started = time.perf_counter()
        reset_peak_memory()  # each stage's record holds its own peak, not the largest of the stages before it
        run_stage(stage, pipeline)
        timings[stage.name] = time.perf_counter() - started
        state["stages"][stage.name] = fp
        state["timings_s"] = timings
        write_json(state_path, state)
    write_report(pipeline, timings)
    return rundir


def read_state(path: Path) -> dict[str, Any]:
    """pipeline.json: each stage's fingerprint when it last finished, and wall times. Missing, empty or unreadable
    (a crash while it was written) is a run with no stage known to be up to date, so each is checked again."""
    state = read_json_record(path) or {}
    stages, timings = state.get("stages"), state.get("timings_s")
    return {"stages": stages if isinstance(stages, dict) else {},
            "timings_s": timings if isinstance(timings, dict) else {}}


def _say(message: str) -> None:
    import click

    click.echo(message, err=True)


def run_stage(stage: Any, pipeline: Pipeline) -> Path:
    """Run one stage into RUNDIR/<name>, replacing what was there (the caller decided it is out of date)."""
    if isinstance(stage, TrainStage):
        return run_training_stage(stage, pipeline)
    if isinstance(stage, MoEStage):
        return run_moe_stage(stage, pipeline)
    if isinstance(stage, ExtractStage):
        return run_extract_stage(stage, pipeline)
    runners = {"pairs": run_pairs_stage, "merge": run_merge_stage, "eval": run_eval_stage, "export": run_export_stage}
    return runners[stage.kind](stage, pipeline)


def run_training_stage(stage: TrainStage, pipeline: Pipeline) -> Path:
    """A training method's stage: its recipe with earlier stages' outputs wired in, run by the method's own run
    function. An SFT adapter handed on is checked for the template SFT recorded."""
    method = METHODS[stage.kind]
    wired: dict[str, Any] = {}
    adapter = getattr(stage, "adapter", None)
    if adapter:
        wired["adapter"] = pipeline.path(adapter)
        check_sft_template(Path(wired["adapter"]))
    if isinstance(stage, PreferenceStage):
        wired["data"] = {**stage.data.model_dump(), "path": pipeline.path(stage.data.path)}
    if reward_models(stage):
        wired["rewards"] = [pipeline.reward_spec(r) for r in stage.rewards]
    return method.run(stage_recipe(method.recipe, stage, pipeline, wired))


def stage_recipe(cls: type[TrainRecipe], stage: TrainStage, pipeline: Pipeline, wired: dict[str, Any]) -> Any:
    """The command's recipe for a training stage: the stage's own fields, the pipeline's model (or an earlier
    stage's), stage names in `wired` turned into paths, and the output RUNDIR/<name>, always replaced."""
    model = pipeline.recipe.model
    if stage.model:
        model = model.model_copy(update={"name": pipeline.path(stage.model)})
    fields = {**stage.recipe_fields(), **wired, "model": model.model_dump(),
              "output": str(pipeline.rundir / stage.name), "overwrite": True}
    # the tracker groups a run's stages: one experiment per run dir, one run per stage (unless the stage names them)
    fields["train"] = {"project": pipeline.rundir.resolve().name, "run_name": stage.name, **fields.get("train", {})}
    return validate(cls, fields, f"stage '{stage.name}'")

