"""Issue 7 figures, in one script on this machine:

1. tokens/s of `align sft` with 1 process (batch 8) vs 2 gloo DDP processes (batch 4 each, same global batch) on a
   small random Llama (4 layers, hidden 256), as a ratio measured in the same script;
2. the cost of one checkpoint save (seconds and bytes) for a LoRA run on the embedded model and on the small model.

    .venv/bin/python benchmarks/distributed_resume.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def small_model(path: Path) -> Path:
    import conftest

    tokenizer = conftest.make_char_tokenizer()
    model = conftest.make_tiny_llama(len(tokenizer), seed=0, layers=4, hidden=256)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sft(model: str, out: Path, steps: int, batch: int, processes: int, save_steps: int, data_limit: int = 256) -> dict[str, Any]:
    command = [str(Path(sys.executable).with_name("align")), "sft", "--model", model, "--data", "builtin:pig-latin",
               "--limit", str(data_limit), "-o", str(out), "--max-steps", str(steps), "--batch-size", str(batch),
               "--save-steps", str(save_steps), "--dtype", "float32", "--no-compile", "--lora-r", "16"]
    if processes > 1:
        command += ["--num-processes", str(processes)]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "MASTER_PORT": "29650"})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads((out / "run.json").read_text())


def tokens_per_second(record: dict[str, Any]) -> float:
    metrics = record["metrics"]
    return metrics["num_input_tokens_seen"] / metrics["train_runtime"]


def checkpoint_cost(model: str, tmp: Path) -> dict[str, float]:
    """Time the Trainer's own checkpoint save from inside a run: on_step_end (save requested) to on_save."""
    import align.train.sft as sft_module
    from align.core.config import SFTRecipe
    from transformers import TrainerCallback

    marks: list[float] = []
    durations: list[float] = []

    class SaveTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            marks.append(time.perf_counter())

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            durations.append(time.perf_counter() - marks[-1])

    real = sft_module.progress_callback
    sft_module.progress_callback = lambda total, enabled=True: SaveTimer()
    try:
        recipe = SFTRecipe.model_validate({
            "model": {"name": model, "compile": False}, "data": {"path": "builtin:pig-latin", "limit": 64},
            "train": {"max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 2, "save_total_limit": 10},
            "output": str(tmp / "ckpt")})
        out = sft_module.run_sft(recipe, progress=False)
    finally:
        sft_module.progress_callback = real
    checkpoint = out / "checkpoint-2"
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    adapter = (checkpoint / "adapter_model.safetensors").stat().st_size
    return {"seconds_mean": sum(durations) / len(durations), "seconds_max": max(durations), "saves": len(durations),
            "bytes": size, "adapter_bytes": adapter}


def main() -> None:
    from align.core.artifacts import machine_info

    results: dict[str, Any] = {"machine": machine_info()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = str(small_model(tmp / "small"))
        runs = []
        for repeat in range(2):  # interleaved, so drift in machine load hits both alike
            one = sft(model, tmp / f"one{repeat}", steps=30, batch=8, processes=1, save_steps=1000)
            two = sft(model, tmp / f"two{repeat}", steps=30, batch=4, processes=2, save_steps=1000)
            runs.append({"one_process_tok_s": tokens_per_second(one), "two_process_tok_s": tokens_per_second(two)})
            print(runs[-1], flush=True)
        one_mean = sum(r["one_process_tok_s"] for r in runs) / len(runs)
        two_mean = sum(r["two_process_tok_s"] for r in runs) / len(runs)
        results["ddp"] = {"runs": runs, "one_process_tok_s": one_mean, "two_process_tok_s": two_mean,
                          "ratio_two_over_one": two_mean / one_mean}
        results["checkpoint_small"] = checkpoint_cost(model, tmp / "s")
        results["checkpoint_embedded"] = checkpoint_cost("smollm2-135m", tmp / "e")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
