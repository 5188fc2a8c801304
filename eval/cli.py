"""`align eval`: thin over `eval.run.run_eval`. The lead registers `eval_command` under the `align` group."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from align.core.clitools import debug_option, handle_errors
from align.core.errors import AlignError
from eval.suites import builtin_suites


# A run that wrote its report but in which a task it was asked to run failed: not bad input (2) nor a bug (3), yet not
# a success that scripts and CI could take for one.
TASKS_FAILED_EXIT = 1


@click.command("eval")
@click.option("--suite", required=True, help=f"A suite YAML file or a built-in suite ({', '.join(builtin_suites())}).")
@click.option("--model", "models", multiple=True, required=True,
              help="NAME=SPEC or SPEC: a model dir, adapter dir, .gguf, hub id or smollm2-135m. Repeat to compare; "
                   "the first is the baseline for deltas.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Report dir.")
@click.option("--limit", type=click.IntRange(min=1), help="At most N examples per task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds sampling and bootstrap intervals.")
@click.option("--reference", help="Reference model for DPO implicit rewards (default: each adapter's run.json).")
@click.option("--beta", type=float, help="DPO beta for implicit rewards (default: run.json's, else 0.1).")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16, bf16-autocast, float16.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Override every generate task's limit.")
@click.option("--sample/--greedy", "do_sample", default=None, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), help="Sampling temperature (with --sample).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), help="Nucleus sampling (with --sample).")
@click.option("--lm-eval-tasks", help="Comma-separated lm-evaluation-harness tasks (needs lm-eval installed).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output dir.")
@debug_option
@handle_errors
def eval_command(suite: str, models: tuple[str, ...], output: Path, limit: int | None, batch_size: int, seed: int,
                 reference: str | None, beta: float | None, dtype: str, max_new_tokens: int | None,
                 do_sample: bool | None, temperature: float | None, top_p: float | None,
                 lm_eval_tasks: str | None, overwrite: bool, debug: bool) -> None:
    """Evaluate one or more models on a suite and compare them side by side."""
    from eval.run import EvalRequest, parse_model_args, run_eval

    overrides = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                 "top_p": top_p}
    request = EvalRequest(
        suite=suite, models=parse_model_args(list(models)), output=output, limit=limit, batch_size=batch_size,
        seed=seed, reference=reference, beta=beta, dtype=dtype,
        generation={k: v for k, v in overrides.items() if v is not None},
        lm_eval_tasks=[t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()], overwrite=overwrite,
    )
    path = run_eval(request)
    click.echo((path / "report.md").read_text(encoding="utf-8"))
    report = json.loads((path / "report.json").read_text())
    ok = any(o.get("status") == "ok" for tasks in report["results"].values() for o in tasks.values())
    if not ok:
        raise AlignError(f"every task failed (report written to {path})")
    click.echo(f"report: {path / 'report.json'}", err=True)
    if report["failed"]:
        first = report["failed"][0]
        click.echo(f"{len(report['failed'])} task(s) failed, first {first['model']}/{first['task']}: {first['error']} "
                   f"(see {path / 'report.json'})", err=True)
        sys.exit(TASKS_FAILED_EXIT)


def main() -> None:
    eval_command()
