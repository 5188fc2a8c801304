"""Merge speed and memory on the embedded model (SmolLM2-135M), as ratios against baselines run by this script.

    .venv/bin/python benchmarks/merge_speed.py [--repeats 3] [--work DIR]

1. `merge slerp` (our checks + mergekit + generation config + merge.json) against calling mergekit's `run_merge`
   directly with the same configuration and options.            goal: ≤ 1.1× its time
2. Peak RSS of `merge slerp` relative to one input model's size. goal: ≤ 1.5×
   (also: growth over the post-import RSS, anonymous memory only, and with `--shard-size 100M`)
3. Adapter-space `merge linear` of two LoRAs against materialize-then-merge (`--materialize`). goal: ≥ 10× faster
4. `merge moe` (2 experts, hidden gates from 4 prompts each, 1 expert per token) against mergekit-moe's own command
   on the same configuration.                                     goal: ≤ 1.1× its time; peak RSS beside it
5. `merge extract-lora --rank 16` of a model that is the base with a rank-16 LoRA merged in, against
   mergekit-extract-lora's own command (`--max-rank 16`). Ours also loads both models and scores the fixed prompts
   for `merge.json`'s logit agreement and per-module reconstruction error, which mergekit does not; both are in the
   time.                                                          goal: ≤ 1.1× its time; peak RSS beside it

Each measurement runs in a fresh subprocess (so peak RSS is its own), alternating A/B, median of `--repeats`.
The second model is the first plus small noise; the adapters are PEFT LoRAs with random non-zero B (no training).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from align.core.artifacts import proc_status_bytes  # noqa: E402


class AnonymousPeak:
    """Samples RssAnon every 20 ms: the kernel tracks only the total peak (VmHWM), which also counts the
    file-backed pages of mmapped inputs (page cache the kernel can drop), not just memory the merge allocated."""

    def __init__(self) -> None:
        import threading

        self.peak = proc_status_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, proc_status_bytes("RssAnon"))

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---- setup ------------------------------------------------------------------------------------------------------


def prepare(work: Path) -> dict[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.core.models import resolve_model

    base = Path(resolve_model("smollm2-135m").base)
    other = work / "smollm2-noisy"
    if not (other / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * p.std() * 0.05)
        model.save_pretrained(other)
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(other)
        shutil.copy(base / "generation_config.json", other / "generation_config.json")
    adapters = []
    for name, rank, seed in (("lora-r16", 16, 1), ("lora-r8", 8, 2)):
        path = work / name
        adapters.append(str(path))
        if (path / "adapter_config.json").is_file():
            continue
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        get_peft_model(model, config).save_pretrained(path)
    return {"base": str(base), "other": str(other), "lora_a": adapters[0], "lora_b": adapters[1],
            "tuned": str(merged_adapter(base, Path(adapters[0]), work / "smollm2-lora-r16-merged"))}


def merged_adapter(base: Path, adapter: Path, out: Path) -> Path:
    """The base with an adapter merged in: a "fully tuned" model whose change has a known rank (16)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (out / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype="float32")
        PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(out)
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
    return out


MOE_PROMPTS = (["Translate into Pig Latin: the cat sat", "Say it in Pig Latin: good morning",
                "Pig Latin please: open the door", "In Pig Latin: where is the train"],
               ["Reverse the word order: the cat sat", "Words backwards: good morning",
                "Reverse these words: open the door", "Backwards order: where is the train"])


def moe_config(paths: dict[str, str]) -> dict[str, object]:
    """The mergekit-moe configuration `merge moe` builds for these experts (its `_config`), for the direct run."""
    return {"base_model": paths["base"], "gate_mode": "hidden", "experts_per_token": 1,
            "experts": [{"source_model": paths[name], "positive_prompts": list(prompts)}
                        for name, prompts in zip(("base", "other"), MOE_PROMPTS)]}


def mergekit_command(command: object, args: list[str]) -> None:
    """A mergekit click command as its console script runs it (in this process, so its peak RSS is measured)."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    command.main(args=args, standalone_mode=False)  # type: ignore[attr-defined]


# ---- one measurement per subprocess -----------------------------------------------------------------------------


def child(task: str, paths: dict[str, str], out: Path) -> dict[str, float]:
    from merge.methods import MergeParams, build_config
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from mergekit.scripts.extract_lora import main as mergekit_extract_lora
    from mergekit.scripts.moe import main as mergekit_moe

    from merge.extract import ExtractRequest, run_extract_lora
    from merge.moe import MoERequest, run_moe
    from merge.run import MergeRequest, run_merge_request

    shutil.rmtree(out, ignore_errors=True)
    baseline, anon_baseline = proc_status_bytes("VmRSS"), proc_status_bytes("RssAnon")
    sampler = AnonymousPeak().__enter__()
    start = time.perf_counter()
    if task == "slerp-cli":
        run_merge_request(MergeRequest("slerp", [paths["base"], paths["other"]], out, params=MergeParams(t=[0.5])))
    elif task == "slerp-cli-100M-shards":
        run_merge_request(MergeRequest("slerp", [paths["base"], paths["other"]], out, params=MergeParams(t=[0.5]),
                                       shard_size="100M"))
    elif task == "slerp-mergekit":  # the same configuration and options, straight into mergekit
        config = MergeConfiguration.model_validate(
            build_config("slerp", [paths["base"], paths["other"]], None, MergeParams(t=[0.5])))
        run_merge(config, str(out), MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=True))
    elif task == "moe-cli":
        run_moe(MoERequest(paths["base"], [paths["base"], paths["other"]], [list(p) for p in MOE_PROMPTS], out,
                           gate_mode="hidden", experts_per_token=1))
    elif task == "moe-mergekit":
        config = out.with_name(out.name + ".yml")
        config.write_text(json.dumps(moe_config(paths)))  # JSON is YAML
        mergekit_command(mergekit_moe, [str(config), str(out), "--copy-tokenizer", "--quiet"])
    elif task == "extract-cli":
        run_extract_lora(ExtractRequest(paths["tuned"], paths["base"], out, rank=16))
    elif task == "extract-mergekit":
        mergekit_command(mergekit_extract_lora, ["--model", paths["tuned"], "--base-model", paths["base"],
                                                 "--out-path", str(out), "--max-rank", "16", "--quiet"])
    elif task == "linear-adapter":
        run_merge_request(MergeRequest("linear", [paths["lora_a"], paths["lora_b"]], out, mode="adapter"))
    elif task == "linear-materialize":
        run_merge_request(MergeRequest("linear", [paths["lora_a"], paths["lora_b"]], out, mode="materialize"))
    else:
        raise ValueError(task)
    seconds = time.perf_counter() - start
    sampler.__exit__()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak_rss_bytes": peak, "rss_before_bytes": baseline,
            "peak_anon_bytes": sampler.peak, "anon_before_bytes": anon_baseline}


def measure(task: str, paths: dict[str, str], work: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", task, "--paths", json.dumps(paths), "--work", str(work)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{task} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


TASKS = ("slerp-cli", "slerp-mergekit", "slerp-cli-100M-shards", "linear-adapter", "linear-materialize",
         "moe-cli", "moe-mergekit", "extract-cli", "extract-mergekit")


def slerp_figures(runs: dict[str, list[dict[str, float]]], model_bytes: int) -> dict[str, float]:
    cli, direct = median_of(runs["slerp-cli"], "seconds"), median_of(runs["slerp-mergekit"], "seconds")
    peak = median_of(runs["slerp-cli"], "peak_rss_bytes")
    before = median_of(runs["slerp-cli"], "rss_before_bytes")
    shards = runs["slerp-cli-100M-shards"]
    return {
        "slerp_cli_s": cli, "slerp_mergekit_s": direct, "slerp_time_ratio": cli / direct,
        "slerp_peak_rss_bytes": peak, "slerp_peak_rss_over_model": peak / model_bytes,
        "slerp_rss_growth_over_model": (peak - before) / model_bytes,
        "slerp_anon_growth_over_model": (median_of(runs["slerp-cli"], "peak_anon_bytes")
                                         - median_of(runs["slerp-cli"], "anon_before_bytes")) / model_bytes,
        "mergekit_peak_rss_over_model": median_of(runs["slerp-mergekit"], "peak_rss_bytes") / model_bytes,
        "slerp_100M_shards_s": median_of(shards, "seconds"),
        "slerp_100M_shards_peak_rss_over_model": median_of(shards, "peak_rss_bytes") / model_bytes,
        "slerp_100M_shards_anon_growth_over_model":
            (median_of(shards, "peak_anon_bytes") - median_of(shards, "anon_before_bytes")) / model_bytes,
    }


def against_mergekit(ours: list[dict[str, float]], theirs: list[dict[str, float]], name: str,
                     model_bytes: int) -> dict[str, float]:
    """Our command against mergekit's: median seconds, their ratio, and each side's peak RSS over one model's size."""
    seconds = median_of(ours, "seconds"), median_of(theirs, "seconds")
    return {f"{name}_cli_s": seconds[0], f"{name}_mergekit_s": seconds[1],
            f"{name}_time_ratio": seconds[0] / seconds[1],
            f"{name}_peak_rss_over_model": median_of(ours, "peak_rss_bytes") / model_bytes,
            f"{name}_mergekit_peak_rss_over_model": median_of(theirs, "peak_rss_bytes") / model_bytes}


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child", default=None)
    parser.add_argument("--paths", default=None)
    parser.add_argument("--tasks", default=None, help="comma-separated subset of " + ",".join(TASKS))
    args = parser.parse_args()
    if args.child:
        out = args.work / f"out-{args.child}-{os.getpid()}"
        print(json.dumps(child(args.child, json.loads(args.paths), out)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work)
    parser_tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    tasks = tuple(t for t in TASKS if t in parser_tasks)
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in tasks}
    for i in range(args.repeats):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for task in order:
            runs[task].append(measure(task, paths, work))
            print(f"  {task:20s} {runs[task][-1]['seconds']:7.2f} s  peak RSS "
                  f"{runs[task][-1]['peak_rss_bytes'] / 2**20:7.0f} MiB", file=sys.stderr)

    from align.core.artifacts import machine_info, package_versions

    model_bytes = sum(f.stat().st_size for f in Path(paths["base"]).glob("*.safetensors"))
    report: dict[str, object] = {"model": "smollm2-135m (fp32 safetensors)", "model_bytes": model_bytes,
                                 "repeats": args.repeats}
    if {"slerp-cli", "slerp-mergekit", "slerp-cli-100M-shards"} <= set(tasks):
        report.update(slerp_figures(runs, model_bytes))
    if {"linear-adapter", "linear-materialize"} <= set(tasks):
        adapter, materialize = (median_of(runs[t], "seconds") for t in ("linear-adapter", "linear-materialize"))
        report.update({"linear_adapter_space_s": adapter, "linear_materialize_s": materialize,
                       "adapter_space_speedup": materialize / adapter})
    for ours, theirs, name in (("moe-cli", "moe-mergekit", "moe"), ("extract-cli", "extract-mergekit", "extract")):
        if {ours, theirs} <= set(tasks):
            report.update(against_mergekit(runs[ours], runs[theirs], name, model_bytes))
    report.update({"machine": machine_info(), "versions": package_versions(), "runs": runs})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
