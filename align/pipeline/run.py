"""`align run RECIPE`: the whole loop as named stages (sft, pairs, dpo, merge, eval), each a call of the same
plain function the single commands use, with outputs in RUNDIR/<stage>/.

A stage is skipped when its output is complete (its final record exists) and its fingerprint, which covers its
resolved config, the model and every upstream stage's fingerprint, is unchanged; `--from` forces a stage and all
after it, `--only` runs one stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from align.core.artifacts import is_complete, plot_series, write_json
from align.core.config import DataSpec, LoraSpec, ModelSpec, Section, load_yaml, parse_set, set_path, validate
from align.core.errors import AlignError

log = logging.getLogger(__name__)

BASE = "base"
RECORDS = {"sft": "run.json", "dpo": "run.json", "pairs": "pairs.json", "merge": "merge.json", "eval": "report.json"}


# ---- recipe ------------------------------------------------------------------------------------------------------


class StageSpec(Section):
    name: str
    """How later stages refer to this one; also its dir under RUNDIR."""


class SFTStage(StageSpec):
    kind: Literal["sft"]
    model: str | None = None
    """Train on an earlier stage's model (e.g. a stacked one, to heal it) instead of the recipe's model."""
    data: DataSpec = DataSpec()
    lora: LoraSpec = LoraSpec()
    train: dict[str, Any] = {}


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


class DPOStage(StageSpec):
    kind: Literal["dpo"]
    adapter: str | None = None
    """A stage name (or adapter dir) the policy starts from and, with ref=adapter, the reference."""
    data: str
    """A `pairs` stage name, or any preference data source."""
    ref: str | None = None
    lora: LoraSpec = LoraSpec()
    train: dict[str, Any] = {}


class SelectSpec(Section):
    """How a merge sweep picks its candidate: an eval suite and a metric (or a weighted sum of metrics)."""

    suite: str = "pig-latin"
    metric: str | dict[str, float] = "seen/exact_match"
    """`task/metric`, or {`task/metric`: weight, ...} for a weighted sum."""
    limit: int | None = 50


class MergeStage(StageSpec):
    kind: Literal["merge"]
    method: str = "slerp"
    models: list[str] = []
    base: str | None = None
    slices: list[str] = []
    """For method `stack`: `NAME:START-END` layer ranges, NAME a stage or `base`."""
    t: float | list[float] | None = None
    weights: list[float] | list[list[float]] | None = None
    density: float | None = None
    as_adapter: bool = False
    select: SelectSpec | None = None
    """Required when t or weights list several candidates."""

    def candidates(self) -> list[dict[str, Any]]:
        if isinstance(self.t, list):
            return [{"t": t} for t in self.t]
        if self.weights and isinstance(self.weights[0], list):
            return [{"weights": w} for w in self.weights]  # type: ignore[union-attr]
        return [{"t": self.t} if self.t is not None else {"weights": self.weights}]

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


Stage = Annotated[SFTStage | PairsStage | DPOStage | MergeStage | EvalStage, Field(discriminator="kind")]


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
    if isinstance(stage, DPOStage):
        return [r for r in (stage.adapter, stage.data) if r]
    if isinstance(stage, MergeStage):
        return [*stage.models, *([stage.base] if stage.base else []), *(split_slice(s)[0] for s in stage.slices)]
    if isinstance(stage, SFTStage):
        return [stage.model] if stage.model else []
    if isinstance(stage, EvalStage):
        return list(stage.models)
    return []


def split_slice(text: str) -> tuple[str, str]:
    name, _, layers = text.rpartition(":")
    return name, layers


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
    return recipe


def anchor_suite_paths(recipe: PipelineRecipe, base: Path) -> None:
    """Suite files named in a recipe are relative to the recipe, not to wherever `align run` was started."""
    def anchored(suite: str) -> str:
        return str(base / suite) if suite.endswith((".yaml", ".yml")) and not Path(suite).is_absolute() else suite

    for stage in recipe.stages:
        if isinstance(stage, EvalStage):
            stage.suites = [anchored(s) for s in stage.suites]
        if isinstance(stage, MergeStage) and stage.select is not None:
            stage.select.suite = anchored(stage.select.suite)


# ---- running -----------------------------------------------------------------------------------------------------


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
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"stages": {}}
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
        run_stage(stage, pipeline, overwrite=True)
        timings[stage.name] = time.perf_counter() - started
        state["stages"][stage.name] = fp
        state["timings_s"] = timings
        write_json(state_path, state)
    write_report(pipeline, timings)
    return rundir


def _say(message: str) -> None:
    import click

    click.echo(message, err=True)


def run_stage(stage: Any, pipeline: Pipeline, overwrite: bool) -> Path:
    runners = {"sft": run_sft_stage, "pairs": run_pairs_stage, "dpo": run_dpo_stage, "merge": run_merge_stage,
               "eval": run_eval_stage}
    return runners[stage.kind](stage, pipeline, overwrite)


def run_sft_stage(stage: SFTStage, pipeline: Pipeline, overwrite: bool) -> Path:
    from align.core.config import SFTRecipe
    from align.train.sft import run_sft

    model = pipeline.recipe.model
    if stage.model:
        model = model.model_copy(update={"name": pipeline.path(stage.model)})
    recipe = SFTRecipe(model=model, data=stage.data, lora=stage.lora, train=stage.train,
                       output=str(pipeline.rundir / stage.name), overwrite=overwrite)
    return run_sft(recipe)


def run_dpo_stage(stage: DPOStage, pipeline: Pipeline, overwrite: bool) -> Path:
    from align.core.config import DPORecipe
    from align.train.dpo import run_dpo

    adapter = pipeline.path(stage.adapter) if stage.adapter else None
    if adapter:
        check_template_contract(Path(adapter))
    recipe = DPORecipe.model_validate({
        "model": pipeline.recipe.model.model_dump(), "data": {"path": pipeline.path(stage.data)},
        "lora": stage.lora.model_dump(), "train": stage.train, "adapter": adapter, "ref": stage.ref,
        "output": str(pipeline.rundir / stage.name), "overwrite": overwrite,
    })
    return run_dpo(recipe)


# ---- template contract -------------------------------------------------------------------------------------------


def check_template_contract(sft_dir: Path) -> None:
    """The tokenizer DPO will use (the SFT adapter's own) must render and stop exactly as the SFT stage recorded."""
    from align.core.models import load_tokenizer, resolve_model, template_contract

    recorded = json.loads((sft_dir / "run.json").read_text()).get("template") if (sft_dir / "run.json").is_file() else None
    if not recorded:
        return
    current = template_contract(load_tokenizer(resolve_model(str(sft_dir))))
    for key in ("chat_template", "eos_token", "pad_token"):
        if recorded.get(key) != current[key]:
            raise AlignError(f"template contract broken at dpo: {key} is {current[key]!r} but the SFT stage "
                             f"({sft_dir}) recorded {recorded.get(key)!r}")


# ---- on-policy pairs ---------------------------------------------------------------------------------------------


def run_pairs_stage(stage: PairsStage, pipeline: Pipeline, overwrite: bool) -> Path:
    """Sample the adapter `samples` times per prompt; every distinct wrong answer becomes a rejected completion."""
    from align.core.artifacts import output_dir
    from align.core.data import load_sft_data, render_chat
    from align.core.models import resolve_model
    from eval.generate import free, generate_texts, load_for_eval
    from eval.suites import GenerationSpec

    rows, _, _ = load_sft_data(stage.data, split=stage.split, limit=stage.limit)
    prompts, references = [], []
    for row in rows:
        messages = row["messages"]
        if messages[-1]["role"] != "assistant":
            raise AlignError(f"{stage.data}: pairs need conversations that end with the reference answer")
        prompts.append(messages[:-1])
        references.append(messages[-1]["content"].strip())
    with output_dir(pipeline.rundir / stage.name, overwrite=overwrite) as handle:
        lm = load_for_eval(stage.adapter, resolve_model(pipeline.path(stage.adapter)))
        texts = [render_chat(lm.tokenizer, p, add_generation_prompt=True) for p in prompts]
        settings = GenerationSpec(max_new_tokens=stage.max_new_tokens, do_sample=True, temperature=stage.temperature,
                                  top_p=1.0)
        samples = [generate_texts(lm, texts, settings, seed=stage.seed + k) for k in range(stage.samples)]
        free(lm)
        pairs, correct = [], 0
        for i, (prompt, reference) in enumerate(zip(prompts, references)):
            wrong = []
            for k in range(stage.samples):
                answer = samples[k][i].strip()
                if answer == reference:
                    correct += 1
                elif answer and answer not in wrong:
                    wrong.append(answer)
            pairs += [{"prompt": prompt, "chosen": [{"role": "assistant", "content": reference}],
                       "rejected": [{"role": "assistant", "content": w}]} for w in wrong]
        if not pairs:
            raise AlignError(f"pairs stage '{stage.name}': every sample was correct, so there is nothing to prefer "
                             "against (raise temperature or samples, or use harder prompts)")
        (handle.path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        record = {"prompts": len(prompts), "samples_per_prompt": stage.samples, "pairs": len(pairs),
                  "sample_accuracy": correct / (len(prompts) * stage.samples), "adapter": pipeline.path(stage.adapter),
                  "config": stage.model_dump(mode="json")}
        return handle.commit("pairs.json", record)


# ---- merge with sweeps -------------------------------------------------------------------------------------------


def run_merge_stage(stage: MergeStage, pipeline: Pipeline, overwrite: bool) -> Path:
    """One merge, or a sweep: every candidate is merged and scored; the best becomes the stage's output and
    `sweep.json`/`sweep.png` beside it record every candidate's metrics."""
    candidates = stage.candidates()
    out = pipeline.rundir / stage.name
    if len(candidates) == 1:
        result = merge_candidate(stage, pipeline, candidates[0], out, overwrite)
        write_sft_template(pipeline, result, stage.name)
        return result
    scratch = pipeline.rundir / f".{stage.name}.sweep"
    shutil.rmtree(scratch, ignore_errors=True)
    try:  # the scratch dir goes whether the sweep finishes or a candidate fails
        return keep_best_candidate(stage, out, overwrite, score_candidates(stage, pipeline, candidates, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def score_candidates(stage: MergeStage, pipeline: Pipeline, candidates: list[dict[str, Any]],
                     scratch: Path) -> list[dict[str, Any]]:
    """Merge every candidate into `scratch` and score it on the stage's selection metric."""
    scored = []
    for i, candidate in enumerate(candidates):
        path = merge_candidate(stage, pipeline, candidate, scratch / f"candidate-{i}", True)
        write_sft_template(pipeline, path, stage.name)
        metrics = score_candidate(stage.select, path, scratch / f"eval-{i}")  # type: ignore[arg-type]
        scored.append({"candidate": candidate, "path": str(path), "metrics": metrics,
                       "score": selection_score(stage.select.metric, metrics)})  # type: ignore[union-attr]
        log.info("merge sweep %s: %s", candidate, scored[-1]["score"])
    return scored


def keep_best_candidate(stage: MergeStage, out: Path, overwrite: bool, scored: list[dict[str, Any]]) -> Path:
    """Move the best-scoring candidate into the stage's output with sweep.json/sweep.png and the sweep in merge.json."""
    from align.core.artifacts import output_dir

    best = max(range(len(scored)), key=lambda i: (scored[i]["score"], -i))
    with output_dir(out, overwrite=overwrite) as handle:
        shutil.rmtree(handle.path)
        shutil.move(scored[best]["path"], handle.path)
        sweep = {"selected": scored[best]["candidate"], "select": stage.select.model_dump(),  # type: ignore[union-attr]
                 "candidates": [{k: v for k, v in s.items() if k != "path"} for s in scored]}
        write_json(handle.path / "sweep.json", sweep)
        plot_sweep(handle.path / "sweep.png", scored, best)
        record = json.loads((handle.path / "merge.json").read_text())
        record["sweep"] = sweep
        (handle.path / "merge.json").unlink()
        return handle.commit("merge.json", record)


def merge_candidate(stage: MergeStage, pipeline: Pipeline, candidate: dict[str, Any], out: Path,
                    overwrite: bool) -> Path:
    from merge.methods import MergeParams
    from merge.run import MergeRequest, run_merge_request

    params: dict[str, Any] = {}
    if candidate.get("t") is not None:
        params["t"] = [candidate["t"]]
    if candidate.get("weights") is not None:
        params["weights"] = list(candidate["weights"])
    if stage.density is not None:
        params["density"] = [stage.density]
    slices = [f"{pipeline.path(name)}:{layers}" for name, layers in map(split_slice, stage.slices)]
    request = MergeRequest(method=stage.method, models=[pipeline.path(m) for m in stage.models], out=out,
                           slices=slices,
                           base=pipeline.path(stage.base) if stage.base else None, params=MergeParams(**params),
                           mode="adapter" if stage.as_adapter else "auto", overwrite=overwrite)
    return run_merge_request(request)


def sft_stage_dir(pipeline: Pipeline, before: str) -> Path | None:
    """The last complete SFT stage that runs before stage `before` (the template contract's source), if any."""
    found = None
    for stage in pipeline.recipe.stages:
        if stage.name == before:
            break
        if isinstance(stage, SFTStage) and is_complete(pipeline.rundir / stage.name):
            found = pipeline.rundir / stage.name
    return found


def write_sft_template(pipeline: Pipeline, merged: Path, stage_name: str) -> None:
    """Merged outputs render and stop where the SFT model did: its chat template, EOS/PAD and generation EOS."""
    sft = sft_stage_dir(pipeline, stage_name)
    if sft is None or not (merged / "config.json").is_file():
        return
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(sft))
    tokenizer.save_pretrained(str(merged))
    try:
        generation = GenerationConfig.from_pretrained(str(merged))
    except OSError:
        generation = GenerationConfig()
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(str(merged))


def score_candidate(select: SelectSpec, model: Path, out: Path) -> dict[str, float]:
    from eval.run import EvalRequest, run_eval

    report_dir = run_eval(EvalRequest(suite=select.suite, models=[("candidate", str(model))], output=out,
                                      limit=select.limit, overwrite=True))
    return flat_metrics(json.loads((report_dir / "report.json").read_text()), "candidate")


def flat_metrics(report: dict[str, Any], model: str) -> dict[str, float]:
    """`task/metric` -> value for one model of an eval report."""
    flat: dict[str, float] = {}
    for task, result in report_model_results(report, model).items():
        for metric, value in (result.get("metrics") or {}).items():
            number = value.get("value") if isinstance(value, dict) else value
            if isinstance(number, int | float):
                flat[f"{task}/{metric}"] = float(number)
    return flat


def report_model_results(report: dict[str, Any], model: str) -> dict[str, Any]:
    results = report.get("results", {})
    if isinstance(results, dict) and model in results:
        return results[model]
    raise AlignError(f"eval report has no results for model '{model}'")


def selection_score(metric: str | dict[str, float], metrics: dict[str, float]) -> float:
    weights = {metric: 1.0} if isinstance(metric, str) else metric
    missing = [m for m in weights if m not in metrics]
    if missing:
        raise AlignError(f"selection metric {missing[0]} is not in the eval results ({', '.join(sorted(metrics))})")
    return sum(w * metrics[m] for m, w in weights.items())


def plot_sweep(path: Path, scored: list[dict[str, Any]], best: int) -> None:
    """Every metric and the selection score against the swept value; the title names the candidate kept."""
    xs = [next(iter(s["candidate"].values())) for s in scored]
    if not all(isinstance(x, int | float) for x in xs):
        xs = list(range(len(scored)))
    names = sorted({m for s in scored for m in s["metrics"]})
    series = {m: [(x, s["metrics"][m]) for x, s in zip(xs, scored) if not math.isnan(s["metrics"].get(m, math.nan))]
              for m in names}
    series["selection score"] = [(x, s["score"]) for x, s in zip(xs, scored)]
    kept = ", ".join(f"{k}={v}" for k, v in scored[best]["candidate"].items())
    plot_series(path, series, f"merge sweep (kept {kept})", xlabel=next(iter(scored[0]["candidate"])))


# ---- eval and the run report -------------------------------------------------------------------------------------


def run_eval_stage(stage: EvalStage, pipeline: Pipeline, overwrite: bool) -> Path:
    """All suites in one report dir per suite, under RUNDIR/<stage>/<suite>/; report.json of the stage sums them."""
    from align.core.artifacts import output_dir
    from eval.run import EvalRequest, run_eval

    models = [(m, pipeline.path(m)) for m in stage.models]
    with output_dir(pipeline.rundir / stage.name, overwrite=overwrite) as handle:
        combined: dict[str, Any] = {"suites": {}}
        for suite in stage.suites:
            name = Path(suite).stem if suite.endswith((".yaml", ".yml")) else suite
            out = run_eval(EvalRequest(suite=suite, models=models, output=handle.path / name, limit=stage.limit,
                                       batch_size=stage.batch_size, overwrite=True))
            combined["suites"][name] = json.loads((out / "report.json").read_text())
        return handle.commit("report.json", combined)


def write_report(pipeline: Pipeline, timings: dict[str, float]) -> None:
    """RUNDIR/report.md: every eval stage's table of models x metrics, plus wall time per stage."""
    lines = ["# Pipeline report", ""]
    for stage in pipeline.recipe.stages:
        if not isinstance(stage, EvalStage):
            continue
        path = pipeline.rundir / stage.name / "report.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        for suite, suite_report in report["suites"].items():
            rows = {m: flat_metrics(suite_report, m) for m in stage.models
                    if m in suite_report.get("results", {})}
            metrics = sorted({k for r in rows.values() for k in r})
            lines += [f"## {suite}", "", "| model | " + " | ".join(metrics) + " |",
                      "| --- |" + " --- |" * len(metrics)]
            lines += [f"| {m} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in metrics) + " |"
                      for m, r in rows.items()]
            lines.append("")
    lines += ["## Wall time per stage", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
    (pipeline.rundir / "report.md").write_text("\n".join(lines) + "\n")
