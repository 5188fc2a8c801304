"""Export stages: an earlier stage's model (or the base) as RUNDIR/<stage>/model.gguf for llama.cpp / Ollama, with
`export.json` (type, size, EOS/EOT, and the round trip when `verify` is on) written last."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from align.pipeline.stages import ExportStage, Pipeline

GGUF_NAME = "model.gguf"


def run_export_stage(stage: ExportStage, pipeline: Pipeline) -> Path:
    from align.core.artifacts import output_dir
    from align.export import export_gguf, verify_round_trip

    source = pipeline.path(stage.model)
    with output_dir(pipeline.rundir / stage.name, overwrite=True) as handle:
        result = export_gguf(source, handle.path / GGUF_NAME, stage.type, overwrite=True)
        record: dict[str, Any] = {"source": source, "file": GGUF_NAME, "type": result.type, "bytes": result.bytes,
                                  "seconds": result.seconds, "eos_token": result.eos_token,
                                  "eos_token_id": result.eos_token_id, "eot_token_id": result.eot_token_id}
        if stage.verify:
            record["round_trip"] = verify_round_trip(source, handle.path / GGUF_NAME).describe()
        return handle.commit("export.json", record)


def export_lines(stage: ExportStage, pipeline: Pipeline, record: dict[str, Any]) -> list[str]:
    """report.md's lines for one export: the file (relative to the run dir) and what the round trip measured."""
    path = os.path.relpath(pipeline.rundir / stage.name / record["file"], pipeline.rundir)
    line = f"- `{path}` ({record['type']}, {record['bytes'] / 2**20:.1f} MiB) from `{stage.model}`"
    check = record.get("round_trip")
    if check:
        line += (f": round trip max |logit diff| {check['max_abs_diff']:.3g}, top-1 agreement "
                 f"{check['top1_agreement']:.3f}, mean KL {check['mean_kl']:.2g}")
    return [line]
