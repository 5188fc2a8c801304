"""The template contract between stages: DPO starts from the SFT adapter's own tokenizer, and merged models render
and stop where the SFT model did."""

from __future__ import annotations

import json
from pathlib import Path

from align.core.artifacts import is_complete
from align.core.errors import AlignError
from align.pipeline.stages import Pipeline, SFTStage


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

