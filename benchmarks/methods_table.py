"""The preference methods' table for a finished `align run recipes/methods.yaml -o RUNDIR`, with 95% bootstrap CIs.

    python benchmarks/methods_table.py runs/methods

Per training stage after SFT (DPO, IPO, KTO, ORPO, SimPO): greedy word accuracy on both held-out splits with its 95%
percentile bootstrap CI, the paired difference against SFT (the same resampled items for both models), the stage's
wall time and peak RSS (each stage's own: `align run` resets the peak before each stage), and the reference forwards a
training step runs (0 for a precomputed or absent reference; KTO scores each completion and a mismatched one for its
KL estimate, so 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pig_latin_table import RESAMPLES, SKILL, Scores, metric  # noqa: E402

from align.train.methods import METHODS  # noqa: E402


def reference_forwards(record: dict[str, Any]) -> int:
    """Reference forward passes per training step: none without a reference or with precomputed log-probs; else
    one over the batch, two for KTO (the completions and the mismatched KL completions)."""
    method = METHODS[record["stage"]]
    reference = record.get("reference")
    if not method.reference or reference is None or reference["mode"] == "precompute":
        return 0
    return method.sequences_per_row if method.data == "unpaired" else 1


def describe(record: dict[str, Any]) -> str:
    """The method as it ran: its name, loss types and reference."""
    losses = record.get("loss_type")
    losses = "+".join(losses) if isinstance(losses, list) else losses
    reference = record.get("reference")
    ref = f", ref {reference['mode']}" if reference else ", no reference"
    return f"{record['stage']}{f' ({losses})' if losses else ''}{ref}"


def table(rundir: Path, baseline: str = "sft") -> str:
    report = json.loads((rundir / "eval" / "report.json").read_text())
    results = report["suites"]["pig-latin"]["results"]
    timings = json.loads((rundir / "pipeline.json").read_text())["timings_s"]
    scores = Scores(rundir)
    lines = ["| stage | method | seen word acc [95% CI] | unseen word acc [95% CI] | seen vs SFT [paired 95% CI] | "
             "unseen vs SFT [paired 95% CI] | wall time | peak RSS | reference forwards / step |",
             "|---|---|---|---|---|---|---:|---:|---:|"]
    for model in results:
        record = json.loads((rundir / model / "run.json").read_text())
        cells = []
        for split in ("seen", "unseen"):
            low, high = scores.value_ci(model, f"{split} {SKILL}")
            cells.append(f"{metric(results, model, split, SKILL):.3f} [{low:.3f}, {high:.3f}]")
        for split in ("seen", "unseen"):
            if model == baseline:
                cells.append("-")
                continue
            value, (low, high) = scores.difference(baseline, model, split)
            cells.append(f"{value:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {model} | {describe(record)} | {' | '.join(cells)} | {timings[model] / 60:.1f} min | "
                     f"{record['memory']['peak_rss_bytes'] / 2**30:.2f} GiB | {reference_forwards(record)} |")
    lines += ["", f"Total wall time of the stages: {sum(timings.values()) / 60:.1f} min "
                  f"({', '.join(f'{stage} {seconds / 60:.1f}' for stage, seconds in timings.items())}). "
                  f"CIs: 95% percentile bootstrap, {RESAMPLES} resamples of the items (paired: the same items for "
                  "both models)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rundir", type=Path)
    print(table(parser.parse_args().rundir))


if __name__ == "__main__":
    main()
