"""The README's results table for a finished `align run recipes/pig-latin.yaml -o RUNDIR`.

    python benchmarks/pig_latin_table.py runs/pig-latin

Reads RUNDIR/eval/report.json, RUNDIR/pipeline.json, the pairs and merge records, and prints markdown: per model,
exact match and word accuracy on both splits, preference accuracy, the retention score (the mean of facts accuracy,
arithmetic and instruction following, in points) with its parts, then wall time per stage and the targets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RETENTION_PARTS = (("facts", "accuracy"), ("arithmetic", "contains"), ("instructions", "regex_match"))


def metric(results: dict[str, Any], model: str, task: str, name: str) -> float:
    return results[model][task]["metrics"][name]["value"]


def rows_per_model(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    suites = report["suites"]
    pig, prefs, retention = (suites[s]["results"] for s in ("pig-latin", "prefs", "retention"))
    rows: dict[str, dict[str, float]] = {}
    for model in pig:
        row = {f"{split} {m}": metric(pig, model, split, m)
               for split in ("seen", "unseen") for m in ("exact_match", "word_accuracy")}
        for split in ("seen", "unseen"):
            row[f"prefs-{split}"] = metric(prefs, model, f"prefs-{split}", "preference_accuracy")
        parts = {task: metric(retention, model, task, m) for task, m in RETENTION_PARTS}
        row.update(parts)
        row["retention"] = 100 * sum(parts.values()) / len(parts)
        row["perplexity"] = metric(retention, model, "text", "perplexity")
        rows[model] = row
    return rows


def pig_latin_score(row: dict[str, float]) -> float:
    """What "the pig-latin score" means in the targets: mean word accuracy over both splits."""
    return (row["seen word_accuracy"] + row["unseen word_accuracy"]) / 2


def targets(rows: dict[str, dict[str, float]]) -> list[str]:
    sft, dpo, merged, base = rows["sft"], rows["dpo"], rows["merged"], rows["base"]
    kept = pig_latin_score(merged) / pig_latin_score(dpo) if pig_latin_score(dpo) else float("nan")

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    return [
        f"- SFT >= 0.80 exact match on the seen split: {sft['seen exact_match']:.3f}, "
        f"{mark(sft['seen exact_match'] >= 0.8)}",
        f"- DPO above SFT on word accuracy, both splits: seen {dpo['seen word_accuracy']:.3f} vs "
        f"{sft['seen word_accuracy']:.3f}, unseen {dpo['unseen word_accuracy']:.3f} vs "
        f"{sft['unseen word_accuracy']:.3f}, {mark(all(dpo[k] > sft[k] for k in ('seen word_accuracy', 'unseen word_accuracy')))}",
        f"- merged within 2 points of base on retention: {merged['retention']:.1f} vs {base['retention']:.1f}, "
        f"{mark(merged['retention'] >= base['retention'] - 2)}",
        f"- merged keeps >= 90% of DPO's pig-latin score (mean word accuracy of both splits): {100 * kept:.0f}%, "
        f"{mark(kept >= 0.9)}",
    ]


def table(rundir: Path) -> str:
    rows = rows_per_model(json.loads((rundir / "eval" / "report.json").read_text()))
    timings = json.loads((rundir / "pipeline.json").read_text())["timings_s"]
    columns = ["seen exact_match", "seen word_accuracy", "unseen exact_match", "unseen word_accuracy",
               "prefs-seen", "prefs-unseen", "retention", "facts", "arithmetic", "instructions", "perplexity"]
    heads = ["seen EM", "seen word acc", "unseen EM", "unseen word acc", "pref acc seen", "pref acc unseen",
             "retention (pts)", "facts", "arithmetic", "instructions", "text ppl"]
    lines = ["| model | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for model, row in rows.items():
        cells = [f"{row[c]:.1f}" if c in ("retention", "perplexity") else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| stage | wall time |", "|---|---|"]
    lines += [f"| {stage} | {seconds / 60:.1f} min |" for stage, seconds in timings.items()]
    lines.append(f"| total | {sum(timings.values()) / 60:.1f} min |")
    pairs = json.loads((rundir / "pairs" / "pairs.json").read_text())
    sweep = json.loads((rundir / "merged" / "sweep.json").read_text())
    lines += ["", f"Pairs: {pairs['pairs']} from {pairs['prompts']} prompts x {pairs['samples_per_prompt']} samples "
              f"(SFT sample accuracy {pairs['sample_accuracy']:.2f}). Merge sweep: "
              + ", ".join(f"{c['candidate']} -> {c['score']:.3f}" for c in sweep["candidates"])
              + f"; kept {sweep['selected']}.", ""]
    return "\n".join(lines + targets(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rundir", type=Path)
    print(table(parser.parse_args().rundir))


if __name__ == "__main__":
    main()
