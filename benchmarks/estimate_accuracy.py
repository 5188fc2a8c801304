"""How close is `align estimate` to the memory a run really takes?

For each configuration of a small grid, a fresh subprocess imports the libraries, records its resident memory
(the baseline: everything held before the model loads), resets the kernel's peak counter, then loads the model and
runs a few TRL SFTTrainer / DPOTrainer / GRPOTrainer steps with those settings. Its peak RSS above the baseline
(VmHWM minus the baseline VmRSS) is compared with the planner's prediction for the same settings.

    .venv/bin/python benchmarks/estimate_accuracy.py [--quick] [--out benchmarks/estimate_accuracy.json]

GRPO cases (`--grpo`) also measure the sampling moment on its own: the peak counter is reset as each generate call
starts, and its peak above the baseline is compared with the plan's `sampling` total (KV cache of the whole
generation batch beside what persists). Every completion is forced to `max_completion_length` tokens
(`min_new_tokens`), the length the plan assumes; prompts are `length - completion` tokens. `rm` cases score with a
reward model (an untrained LoRA sequence classifier over the same model, built once: memory does not depend on its
training).

Uses TRL's trainers directly (align.train.sft does not exist yet): `bf16=True` on CPU is accelerate's bf16 autocast over
fp32 weights, which is what `--dtype auto` resolves to on this machine.

On a CUDA machine each case trains on the GPU with bf16 weights and the measured figure is the allocator's peak
(`torch.cuda.max_memory_allocated`, reset after loading), compared with the plan for `--device cuda`. `--model DIR`
runs every case on another model (e.g. `benchmarks/make_model.py llama-1b`), `--data` fills the rows with any SFT
data's words instead of the built-in random words (rows stay longer than the case's length, so every row is exactly
that many tokens):

    .venv/bin/python benchmarks/estimate_accuracy.py --model models/llama-1b --data data/hh-chat.jsonl --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.core.artifacts import proc_status_bytes  # noqa: E402


@dataclass(frozen=True)
class Case:
    model: str  # "smollm2" or "tiny"
    stage: str = "sft"
    lora: bool = True
    quantize: str | None = None
    batch: int = 1
    length: int = 256
    checkpointing: bool = False
    attn: str = "sdpa"
    steps: int = 2
    completion: int = 0
    """grpo: max_completion_length (of the `length` tokens)."""
    generations: int = 8
    grad_accum: int = 1
    """grpo: with TRL's default steps_per_generation, the generation batch is batch x this."""
    reward_model: bool = False

    @property
    def label(self) -> str:
        method = ("qlora" if self.quantize else "lora") if self.lora else "full"
        ck = " ckpt" if self.checkpointing else ""
        if self.stage == "grpo":
            rm = " rm" if self.reward_model else ""
            return (f"{self.model} grpo b{self.batch}x{self.grad_accum} g{self.generations} L{self.length} "
                    f"C{self.completion}{rm}{ck}")
        return f"{self.model} {self.stage} {method} b{self.batch} L{self.length} {self.attn}{ck}"


GRID = [
    Case("tiny", batch=1, length=64),
    Case("tiny", batch=2, length=256),
    Case("tiny", lora=False, batch=2, length=256),
    Case("tiny", batch=2, length=512, attn="eager"),
    Case("smollm2", batch=1, length=256),
    Case("smollm2", batch=4, length=256),
    Case("smollm2", batch=2, length=512),
    Case("smollm2", batch=2, length=512, checkpointing=True),
    Case("smollm2", batch=1, length=512, attn="eager"),
    Case("smollm2", lora=False, batch=1, length=128),
    Case("smollm2", lora=False, batch=1, length=128, checkpointing=True),
    Case("smollm2", stage="dpo", batch=1, length=256),
    Case("smollm2", stage="dpo", batch=2, length=256, checkpointing=True),
    Case("smollm2", quantize="4bit", batch=2, length=256),
]
QUICK = [GRID[1], GRID[4], GRID[11]]
# Configurations measured only after the constants were calibrated on GRID: an out-of-sample check.
HELD_OUT = [
    Case("smollm2", batch=3, length=384),
    Case("smollm2", stage="dpo", batch=1, length=384, attn="eager"),
]


# GRPO on the embedded model: 32-token prompts; a short and a long completion; a generation batch larger than the
# micro-batch (the KV cache covers batch x grad_accum completions); a reward model scoring.
GRPO = [
    Case("smollm2", stage="grpo", batch=16, length=64, completion=32, generations=8),
    Case("smollm2", stage="grpo", batch=4, grad_accum=4, length=288, completion=256, generations=8),
    Case("smollm2", stage="grpo", batch=1, grad_accum=48, length=288, completion=256, generations=8,
         checkpointing=True, steps=1),
    Case("smollm2", stage="grpo", batch=16, length=64, completion=32, generations=8, reward_model=True),
]


# ---- models ------------------------------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """The embedded model's safetensors dir; converted here when align.core.models cannot (see benchmarks/RESULTS.md)."""
    from align.core.models import cache_root, embedded_gguf_path, resolve_model

    try:
        return Path(resolve_model("smollm2-135m").base)
    except ValueError:
        pass
    target = cache_root() / "estimate-bench" / "smollm2-135m"
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the dequantized weights are plain fp32; only the GGUF marker blocks save_pretrained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def tiny_dir() -> Path:
    """A 4-layer Llama, hidden 512, with the tests' character tokenizer: small enough that fixed costs show."""
    from align.core.models import cache_root

    target = cache_root() / "estimate-bench" / "tiny-h512"
    if (target / "model.safetensors").is_file():
        return target
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_char_tokenizer, make_tiny_llama

    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(len(tokenizer), seed=0, layers=4, hidden=512)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def reward_model_dir(model_dir: Path) -> Path:
    """An `align rm`-shaped dir (a PEFT SEQ_CLS LoRA adapter, r=16 on all linears, with its tokenizer) over
    `model_dir`, untrained: what the planner and the memory see is the same."""
    from align.core.models import cache_root

    target = cache_root() / "estimate-bench" / f"{model_dir.name}-rm"
    if (target / "adapter_config.json").is_file():
        return target
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS"))
    peft.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


# ---- the measured run (child process) ----------------------------------------------------------------------------


def long_text(words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    vocab = ["apple", "river", "stone", "light", "music", "table", "green", "quick", "house", "dream", "cloud"]
    return " ".join(rng.choice(vocab) for _ in range(words))


def data_text(data: str | None, seed: int) -> Callable[[int, int], str]:
    """`(words, i) -> text`: the built-in random words, or `--data`'s conversations as one stream of words, cut at
    row i's offset (every row is longer than the case's length, so rows are exactly `length` tokens)."""
    if data is None:
        return long_text
    from align.core.data import load_sft_data

    rows, _, _ = load_sft_data(data)
    words = " ".join(m["content"] for r in rows for m in r["messages"]).split()

    def cut(count: int, i: int) -> str:
        start = (i * 997 + seed) % max(len(words), 1)
        return " ".join((words[start:] + words)[:count])

    return cut


def measure(case: Case, model_dir: str, data: str | None = None) -> dict:
    import torch
    import trl  # noqa: F401
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    torch.set_num_threads(2)
    baseline = proc_status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    text = data_text(data, 0)

    # on a GPU: bf16 weights (what --dtype auto picks there), and the allocator's peak instead of RSS
    kwargs: dict = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": case.attn}
    if case.quantize == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": "cuda:0" if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    after_load = proc_status_bytes("VmHWM") - baseline
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.bos_token
    rows = 8 * case.batch
    chars = case.length * 8
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM") if case.lora else None
    common = dict(output_dir=f"/tmp/estimate-bench-{os.getpid()}", per_device_train_batch_size=case.batch,
                  max_steps=case.steps, max_length=case.length, gradient_checkpointing=case.checkpointing,
                  bf16=True, use_cpu=not cuda, report_to=[], save_strategy="no", logging_steps=1,
                  dataloader_num_workers=0, learning_rate=1e-4, disable_tqdm=True)
    if case.stage == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"text": text(chars // 5, i)[:chars]} for i in range(rows)])
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
    elif case.stage == "grpo":
        trainer = grpo_trainer(case, model, tokenizer, common, peft_config, text, Path(model_dir))
    else:
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{"prompt": text(8, i), "chosen": text(chars // 5, i + 1000)[:chars],
                                   "rejected": text(chars // 5, i + 2000)[:chars]} for i in range(rows)])
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
    columns = trainer.train_dataset.column_names
    column = next((c for c in columns if "chosen" in c and "ids" in c), "input_ids")
    lengths = [len(x) for x in trainer.train_dataset[: case.batch][column]] if column in columns else []
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the load's transient copies are not the training peak
    sampling = watch_sampling(trainer, baseline) if case.stage == "grpo" and not cuda else None
    start = time.perf_counter()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else proc_status_bytes("VmHWM") - baseline
    extra = {}
    if sampling is not None:
        peak = max(peak, sampling["earlier_peak"] - baseline)
        extra = {"sampling_peaks": sampling["peaks"], "rss_before_sampling": sampling["before"]}
    return {"baseline_rss": 0 if cuda else baseline, "peak_above_baseline": peak, "device": "cuda" if cuda else "cpu",
            "load_peak_above_baseline": after_load, "seconds": time.perf_counter() - start,
            "first_lengths": lengths, **extra}


def grpo_trainer(case: Case, model, tokenizer, common: dict, peft_config, text, model_dir: Path):
    """TRL's GRPOTrainer as `align grpo` configures it (beta 0.04 with the adapter-disabled base as reference,
    dropout off), every completion exactly `case.completion` tokens."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompt_tokens = case.length - case.completion
    prompts = [tokenizer.decode(tokenizer(text(prompt_tokens * 2, i))["input_ids"][:prompt_tokens])
               for i in range(8 * case.batch * case.grad_accum)]
    args = {**{k: v for k, v in common.items() if k != "max_length"}, "gradient_accumulation_steps": case.grad_accum,
            "num_generations": case.generations, "max_completion_length": case.completion, "beta": 0.04,
            "disable_dropout": True, "generation_kwargs": {"min_new_tokens": case.completion}}

    def length_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    rewards = [length_reward]
    if case.reward_model:
        from align.train.reward_model import RewardModel

        judge = RewardModel(reward_model_dir(model_dir))

        def rm_reward(prompts, completions, **kwargs):
            return judge(prompts, completions)

        rewards = [rm_reward]
    return GRPOTrainer(model=model, reward_funcs=rewards, args=GRPOConfig(**args), processing_class=tokenizer,
                       train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), peft_config=peft_config)


def watch_sampling(trainer, baseline: int) -> dict:
    """Reset the peak counter as each generate call starts and read it as it returns: the sampling moment's own
    peak. The peak before each reset is kept, so the run's overall peak is not lost."""
    seen: dict = {"peaks": [], "before": [], "earlier_peak": 0}
    original = trainer._generate_single_turn

    def measured(*args, **kwargs):
        seen["earlier_peak"] = max(seen["earlier_peak"], proc_status_bytes("VmHWM"))
        seen["before"].append(proc_status_bytes("VmRSS") - baseline)
        Path("/proc/self/clear_refs").write_text("5")
        out = original(*args, **kwargs)
        seen["peaks"].append(proc_status_bytes("VmHWM") - baseline)
        return out

    trainer._generate_single_turn = measured
    return seen


# ---- the prediction ----------------------------------------------------------------------------------------------


def predict(case: Case, model_dir: Path, device: str = "cpu"):
    from align.train.estimate import TrainSetup, load_shape, plan_memory, reward_model_shapes

    gpu = device == "cuda"  # what measure() runs there: bf16 weights, no autocast casts of them
    grpo = {}
    if case.stage == "grpo":
        rewards = (f"rm:{reward_model_dir(model_dir)}",) if case.reward_model else ()
        grpo = {"grad_accum": case.grad_accum, "max_completion_length": case.completion,
                "reward_models": reward_model_shapes(rewards)}
    setup = TrainSetup(stage=case.stage, device=device, weights_dtype="bfloat16" if gpu else "float32", autocast=not gpu,
                       quantize=case.quantize, lora_r=16 if case.lora else None, lora_dropout=0.05,
                       batch_size=case.batch, max_length=case.length, gradient_checkpointing=case.checkpointing,
                       attn=case.attn, ref="adapter", **grpo)
    return plan_memory(load_shape(str(model_dir)), setup, case.model)


def run_case(case: Case, model_dir: Path, data: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(asdict(case)), str(model_dir),
                           *([data] if data else [])],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}


def accelerate_figures(model_dir: Path) -> dict[str, int]:
    """What `accelerate estimate-memory` prints, computed with its own functions on a local meta model (the command
    itself calls the hub's model_info first, so it refuses local dirs and offline use)."""
    import torch
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    total, _ = calculate_maximum_sizes(model)
    return {"load_float32": total, "load_float16": total // 2,
            "adam_float32": max(estimate_training_usage(total, "float32").values()),
            "adam_bfloat16": max(estimate_training_usage(total, "bfloat16").values())}


def compare() -> list[dict]:
    """The planner beside `accelerate estimate-memory` and the published figures users quote."""
    import tempfile

    from align.train.estimate import TrainSetup, load_shape, plan_memory

    llama = Path(tempfile.mkdtemp()) / "llama-2-7b"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(LLAMA2_7B))
    rows = []
    for name, model_dir in (("smollm2-135m", smollm2_dir()), ("llama-2-7b (config only)", llama)):
        shape = load_shape(str(model_dir))
        acc = accelerate_figures(model_dir)
        full32 = plan_memory(shape, TrainSetup(device="cuda", weights_dtype="float32", lora_r=None, max_length=512))
        state32 = sum(t.bytes for t in full32.terms if t.name in ("weights", "optimizer states")
                      or t.name == "step gradients")
        rows.append({"model": name, "params": shape.total_params, "accelerate": acc,
                     "full_fp32_adam_states": state32, "full_fp32_adam_peak_b1_L512": full32.peak_bytes,
                     "full_fp32_adam_peak_phase": full32.peak_phase})
    shape = load_shape(str(llama))
    # torchtune's llama2/7B_lora_single_device: r=8 on q,v, bf16, activation checkpointing, batch 2; logits
    # materialized and upcast (its cross-entropy is not chunked in those measurements); sequence length assumed 512
    tt = dict(device="cuda", weights_dtype="bfloat16", lora_r=8, lora_targets=("q_proj", "v_proj"), lora_dropout=0.05,
              batch_size=2, max_length=512, gradient_checkpointing=True, chunked_loss=False)
    lora = plan_memory(shape, TrainSetup(**tt))
    qlora = plan_memory(shape, TrainSetup(**tt, quantize="4bit"))
    rows.append({"model": "llama-2-7b torchtune LoRA vs QLoRA", "lora_peak": lora.peak_bytes,
                 "qlora_peak": qlora.peak_bytes, "published_lora": 15.6e9, "published_qlora": 9.3e9})
    return rows


def report(case: Case, measured: dict, plan) -> dict:
    row = {"case": case.label, **asdict(case), **measured, "predicted": plan.peak_bytes,
           "predicted_phase": plan.peak_phase,
           "predicted_terms": {t.name + "@" + t.phase: t.bytes for t in plan.terms}}
    if "error" in measured:
        print(f"{case.label:<42} failed: {measured['error']}")
        return row
    row["error"] = plan.peak_bytes / measured["peak_above_baseline"] - 1
    print(f"{case.label:<42}{measured['peak_above_baseline'] / 2**20:>10.0f}{plan.peak_bytes / 2**20:>11.0f}"
          f"{row['error']:>+8.1%}  {plan.peak_phase}  ({measured['seconds']:.0f}s)", flush=True)
    if measured.get("sampling_peaks"):
        sampled, planned = max(measured["sampling_peaks"]), plan.phase_total("sampling")
        row.update({"sampling_measured": sampled, "sampling_predicted": planned,
                    "sampling_error": planned / sampled - 1})
        print(f"{'  sampling moment':<42}{sampled / 2**20:>10.0f}{planned / 2**20:>11.0f}"
              f"{row['sampling_error']:>+8.1%}  (each generate: "
              f"{', '.join(f'{p / 2**20:.0f}' for p in measured['sampling_peaks'])} MiB)", flush=True)
    return row


def markdown_table(results: list[dict]) -> str:
    lines = ["| configuration | measured peak above baseline | predicted | error | predicted peak phase |",
             "|---|---:|---:|---:|---|"]
    for r in results:
        if isinstance(r.get("error"), float):
            lines.append(f"| {r['case']} | {r['peak_above_baseline'] / 2**20:,.0f} MiB | {r['predicted'] / 2**20:,.0f} MiB"
                         f" | {r['error']:+.1%} | {r['predicted_phase']} |")
        else:
            lines.append(f"| {r['case']} | failed: {r.get('error')} | {r['predicted'] / 2**20:,.0f} MiB | | |")
    return "\n".join(lines)


def summarize(results: list[dict], out: Path, machine: dict) -> None:
    errors = [abs(r["error"]) for r in results if isinstance(r.get("error"), float)]
    if errors:
        print(f"worst |error| {max(errors):.1%} over {len(errors)} runs")
    print(markdown_table(results))
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


def repredict(source: Path, out: Path) -> None:
    """Recompute predictions for stored measurements (the planner changed, the runs did not)."""
    saved = json.loads(source.read_text())
    dirs = {"smollm2": smollm2_dir(), "tiny": tiny_dir()}
    measured_keys = ("baseline_rss", "peak_above_baseline", "load_peak_above_baseline", "seconds", "first_lengths",
                     "sampling_peaks", "rss_before_sampling")
    print(HEADER)
    results = []
    for row in saved["results"]:
        case = Case(**{k: row[k] for k in Case.__dataclass_fields__})
        measured = {k: row[k] for k in measured_keys if k in row} if "peak_above_baseline" in row else {"error": row["error"]}
        results.append(report(case, measured, predict(case, dirs[case.model])))
    summarize(results, out, saved["machine"])


HEADER = f"{'case':<42}{'measured':>10}{'predicted':>11}{'error':>8}  peak phase  (MiB above baseline)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", type=int, nargs="*")
    parser.add_argument("--held-out", action="store_true", help="only the configurations not used for calibration")
    parser.add_argument("--grpo", action="store_true", help="the GRPO cases (sampling moment measured on its own)")
    parser.add_argument("--repredict", help="recompute the predictions for the measurements in this JSON file")
    parser.add_argument("--compare", action="store_true", help="only the comparison with accelerate and published figures")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "estimate_accuracy.json"))
    parser.add_argument("--model", help="run every case on this model dir (e.g. benchmarks/make_model.py's output)")
    parser.add_argument("--data", help="any SFT data: its words fill the rows instead of the built-in random words")
    args = parser.parse_args()
    from align.core.artifacts import machine_info

    if args.repredict:
        repredict(Path(args.repredict), Path(args.out))
        return
    if args.compare:
        print(json.dumps(compare(), indent=2))
        return
    import torch

    dirs = ({"smollm2": Path(args.model), "tiny": Path(args.model)} if args.model
            else {"smollm2": smollm2_dir(), "tiny": tiny_dir()})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = QUICK if args.quick else HELD_OUT if args.held_out else GRPO if args.grpo else GRID
    if args.only:
        grid = [(GRPO if args.grpo else GRID)[i] for i in args.only]
    print(HEADER)
    results = [report(case, run_case(case, dirs[case.model], args.data), predict(case, dirs[case.model], device))
               for case in grid]
    summarize(results, Path(args.out), machine_info())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(measure(Case(**json.loads(sys.argv[2])), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)))
    else:
        main()
