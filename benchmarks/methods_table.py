"""The preference methods' table for a finished `align run recipes/methods.yaml -o RUNDIR`, with 95% bootstrap CIs.

    python benchmarks/methods_table.py runs/methods

Per evaluated model (SFT, then DPO, IPO, KTO, ORPO, SimPO, GRPO and DPO on the reward model's pairs): greedy word
accuracy on both held-out splits with its 95% percentile bootstrap CI, the paired difference against SFT (the same
resampled items for both models), the stage's wall time and peak RSS (each stage's own: `align run` resets the peak
before each stage), and the reference forwards a training step runs (0 for a precomputed or absent reference; KTO
scores each completion and a mismatched one for its KL estimate, so 2; GRPO scores each completion once when it is
sampled, so 1 / num_iterations).

Under the table, the stages that train no policy: each pairs stage (its judge, pairs kept, prompts skipped) and each
reward model (held-out pair accuracy with its Wilson 95% interval, wall time, peak RSS), and GRPO's sampling share and
step-0 check; then each model's words by kind: vowel-initial words right and written in the `ay` dialect (the SFT
data's flaw), consonant-initial words right.
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


def reference_forwards(record: dict[str, Any]) -> float:
    """Reference forward passes per training step: none without a reference (GRPO's beta 0 records mode None) or
    with precomputed log-probs; else one over the batch, two for KTO (the completions and the mismatched KL
    completions). GRPO scores a generation batch's completions once, when they are sampled, and TRL reuses them for
    num_iterations updates, so 1 / num_iterations (1 at TRL's default; steps_per_generation does not change it: a
    generation batch spans that many steps' rows)."""
    method = METHODS[record["stage"]]
    reference = record.get("reference")
    if not method.reference or reference is None or reference["mode"] in (None, "precompute"):
        return 0
    if method.data == "prompts":
        return 1 / int(record["trainer_args"].get("num_iterations", 1))
    return method.sequences_per_row if method.data == "unpaired" else 1


def describe(record: dict[str, Any]) -> str:
    """The method as it ran: its name, loss types (and rewards), reference, and the judge of its pairs."""
    losses = record.get("loss_type")
    losses = "+".join(losses) if isinstance(losses, list) else losses
    rewards = "+".join(r["reward"] for r in record.get("rewards") or [])  # as the recipe spells them
    what = ", ".join(part for part in (losses, f"reward {rewards}" if rewards else "") if part)
    reference = record.get("reference")
    ref = f", ref {reference['mode']}" if reference and reference["mode"] else ", no reference"
    return f"{record['stage']}{f' ({what})' if what else ''}{ref}{judged_by(record)}"


def judged_by(record: dict[str, Any]) -> str:
    """`, pairs judged by J` for a method trained on a pairs stage whose judge is not the house rule."""
    path = (record.get("recipe") or {}).get("data", {}).get("path")
    pairs = Path(path).parent / "pairs.json" if path else None
    if pairs is None or not pairs.is_file():
        return ""
    judge = json.loads(pairs.read_text())["judge"]
    return "" if judge == "rule" else f", pairs judged by {judge}"


def stage_notes(rundir: Path, stages: list[str], timings: dict[str, float]) -> list[str]:
    """One line per stage that trains no evaluated policy (pairs, reward models) and GRPO's sampling and step-0
    check, in run order."""
    notes = []
    for stage in stages:
        pairs, run = rundir / stage / "pairs.json", rundir / stage / "run.json"
        if pairs.is_file():
            record = json.loads(pairs.read_text())
            line = (f"- `{stage}` (pairs, judge {record['judge']}): {record['pairs']} pairs from {record['prompts']} "
                    f"prompts x {record['samples_per_prompt']} samples")
            if record["judge"] == "rule":
                line += f", sample accuracy {record['sample_accuracy']:.3f}"
            else:
                skipped = record["skipped"]
                line += (f", {record['skipped_prompts']} prompts skipped ({skipped['fewer_than_two']} with fewer than "
                         f"two distinct samples, {skipped['below_margin']} below min_margin {record['min_margin']:g}); "
                         f"mean score chosen {record['mean_chosen_score']:.3f}, rejected "
                         f"{record['mean_rejected_score']:.3f}")
            notes.append(line)
            continue
        if not run.is_file():
            continue
        record = json.loads(run.read_text())
        if record["stage"] == "rm":
            accuracy = record.get("pair_accuracy")
            held = (f"held-out pair accuracy {accuracy['accuracy']:.3f} [{accuracy['ci95'][0]:.3f}, "
                    f"{accuracy['ci95'][1]:.3f}] (Wilson 95%, {accuracy['correct']}/{accuracy['pairs']} pairs, "
                    f"mean margin {accuracy['mean_margin']:.2f})" if accuracy else "no held-out pairs")
            notes.append(f"- `{stage}` (reward model, not a policy): {held}; {timings[stage] / 60:.1f} min, peak RSS "
                         f"{record['memory']['peak_rss_bytes'] / 2**30:.2f} GiB")
        elif record["stage"] == "grpo":
            share, check = record["generation"]["share_of_train"], record["step0_check"]
            notes.append(f"- `{stage}` (GRPO): {record['num_generations']} completions per prompt, "
                         f"{f'{share:.0%}' if share is not None else 'unknown share'} of training spent sampling; "
                         f"step-0 check {'passed' if check['passed'] else 'failed'} (largest deviation "
                         f"{check['max_deviation']:.2g})")
    return notes


def word_kinds(rundir: Path, models: list[str]) -> list[str]:
    """Where each model's words go right or wrong, per held-out split, from the eval's samples: vowel-initial words
    right (the SFT data's flaw is writing them in the `ay` dialect, `eat` -> `eatay`), written in that dialect, and
    consonant-initial words right (spelling: a rule the flaw does not touch). Words are compared by position, as
    word accuracy compares them."""
    from align.core.demo import PROMPT, VOWELS, ay_dialect_word, pig_latin_word

    prefix = PROMPT.format(sentence="")
    lines = ["| model | split | vowel-initial words right | vowel-initial written `ay` | consonant-initial words "
             "right |", "|---|---|---:|---:|---:|"]
    for model in models:
        for split in ("seen", "unseen"):
            counts = {"vowel": 0, "vowel_right": 0, "ay": 0, "consonant": 0, "consonant_right": 0}
            path = rundir / "eval" / "pig-latin" / "samples" / model / f"{split}.jsonl"
            for row in map(json.loads, path.read_text().splitlines()):
                english = row["prompt"].rsplit(prefix, 1)[1].split("<|im_end|>")[0].split()
                produced = row["output"].split()
                for i, word in enumerate(english):
                    got = produced[i] if i < len(produced) else None
                    kind = "vowel" if word[0] in VOWELS else "consonant"
                    counts[kind] += 1
                    counts[f"{kind}_right"] += got == pig_latin_word(word)
                    counts["ay"] += kind == "vowel" and got == ay_dialect_word(word)
            lines.append(f"| {model} | {split} | {counts['vowel_right']}/{counts['vowel']} | {counts['ay']}/"
                         f"{counts['vowel']} | {counts['consonant_right']}/{counts['consonant']} |")
    return lines


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
                     f"{record['memory']['peak_rss_bytes'] / 2**30:.2f} GiB | {reference_forwards(record):.3g} |")
    lines += ["", f"Total wall time of the stages: {sum(timings.values()) / 60:.1f} min "
                  f"({', '.join(f'{stage} {seconds / 60:.1f}' for stage, seconds in timings.items())}). "
                  f"CIs: 95% percentile bootstrap, {RESAMPLES} resamples of the items (paired: the same items for "
                  "both models)."]
    notes = stage_notes(rundir, list(timings), timings)
    if notes:
        lines += ["", "Stages that train no evaluated policy, and GRPO's sampling:", *notes]
    lines += ["", "Words by kind (greedy samples of the eval, compared by position):", "",
              *word_kinds(rundir, list(results))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rundir", type=Path)
    print(table(parser.parse_args().rundir))


if __name__ == "__main__":
    main()
