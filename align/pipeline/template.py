"""The template contract between stages (its rules are align.core.template): DPO starts from the SFT adapter's own
tokenizer, and merged models take the last SFT stage's tokenizer, so they render and stop where the SFT model did."""

from __future__ import annotations

from pathlib import Path

from align.core.artifacts import is_complete, read_json_record
from align.core.template import check_template_contract
from align.pipeline.stages import Pipeline, SFTStage


def check_sft_template(sft_dir: Path) -> None:
    """The tokenizer DPO will use (the SFT adapter's own) must render and stop exactly as the SFT stage recorded."""
    from align.core.models import load_tokenizer, resolve_model

    recorded = (read_json_record(sft_dir / "run.json") or {}).get("template")
    if recorded:
        check_template_contract(recorded, load_tokenizer(resolve_model(str(sft_dir))), "dpo",
                                f"the SFT stage ({sft_dir})")


def sft_stage_dir(pipeline: Pipeline, before: str) -> Path | None:
    """The last complete SFT stage that runs before stage `before` (the template contract's source), if any."""
    found = None
    for stage in pipeline.recipe.stages:
        if stage.name == before:
            break
        if isinstance(stage, SFTStage) and is_complete(pipeline.rundir / stage.name):
            found = pipeline.rundir / stage.name
    return found
