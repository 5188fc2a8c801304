"""`align sft` end to end on tiny models: artifacts, errors, resume, QLoRA, packing; one slow real-model run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from align.train import training
from align.cli import main
from align.core.config import SFTRecipe
from align.train.sft import run_sft
from conftest import write_jsonl

ANSWERS = [("ab", "ba"), ("cd", "dc"), ("ef", "fe"), ("gh", "hg")]


def toy_data(tmp_path: Path, repeat: int = 4) -> Path:
    rows = [{"prompt": f"flip {q}", "completion": a} for q, a in ANSWERS] * repeat
    return write_jsonl(tmp_path / "toy.jsonl", rows)


def recipe(model_dir: Path, data: Path, out: Path, **train) -> SFTRecipe:
    settings = {"max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "save_steps": 4,
                "warmup_steps": 0, **train}
    return SFTRecipe.model_validate({
        "model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"path": str(data)},
        "lora": {"r": 4, "dropout": 0.0},
        "train": settings,
        "output": str(out),
    })


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_sft_writes_a_loadable_adapter_and_its_record(tiny_model_dir, tmp_path):
    out = run_sft(recipe(tiny_model_dir, toy_data(tmp_path), tmp_path / "out"), progress=False)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "run.json", "README.md", "loss.png", "checkpoint-8"} <= files
    assert not (tmp_path / "out.partial").exists()

    record = json.loads((out / "run.json").read_text())
    losses = [h["loss"] for h in record["log_history"] if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert record["data"]["rows"] == 16 and record["data"]["format"] == "prompt_completion"
    assert len(record["data"]["fingerprint"]) == 16
    assert record["memory"]["peak_rss_bytes"] > 0 and record["timings_s"]["train"] > 0
    assert record["versions"]["trl"] and record["recipe"]["lora"]["r"] == 4

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    tuned = AutoPeftModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tensors = lora_tensors(out)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items())  # the adapter learnt something
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(tuned(ids).logits, base(ids).logits)
    # base weights are untouched: the adapter file holds only LoRA tensors, and unloading it gives the base back
    assert all("lora_" in k for k in tensors)
    untouched = tuned.unload().state_dict()
    assert all(torch.equal(untouched[name], weight) for name, weight in base.state_dict().items())


def run_cli(args: list[str]):
    return CliRunner().invoke(main, args)


def test_cli_errors_are_one_line_exit_2_and_leave_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": ""}]}])
    cases = {
        "data file not found": ["--data", str(tmp_path / "missing.jsonl")],
        "line 1: field 'messages[1].content': empty content": ["--data", str(bad)],
        "model not found": ["--data", str(bad), "--model", "./no/such/model"],
        "drop --quantize": ["--data", str(bad), "--lora-init", "loftq", "--quantize", "4bit"],
        "unknown key 'train.learnig_rate'": ["--data", str(bad), "--set", "train.learnig_rate=1"],
    }
    for message, extra in cases.items():
        args = ["sft", "--model", str(tiny_model_dir), "-o", str(out), *extra]
        result = run_cli(args)
        assert result.exit_code == 2, (message, result.output)
        assert message in result.stderr, (message, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not out.exists() and not (tmp_path / "out.partial").exists()

    unknown_option = run_cli(["sft", "--no-such-flag"])
    assert unknown_option.exit_code == 2 and "No such option" in unknown_option.stderr


def test_non_empty_output_dir_is_refused_unless_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = run_cli(["sft", "--model", str(tiny_model_dir), "--data", str(toy_data(tmp_path)), "-o", str(out),
                      "--max-steps", "1", "--dtype", "float32"])
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert (out / "keep.txt").read_text() == "x"
    result = run_cli(["sft", "--model", str(tiny_model_dir), "--data", str(toy_data(tmp_path)), "-o", str(out),
                      "--max-steps", "1", "--dtype", "float32", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "run.json").is_file()


def test_console_script_prints_no_traceback_unless_debug(tmp_path):
    script = Path(sys.executable).with_name("align")
    args = [str(script), "sft", "--data", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o"),
            "--model", "./missing-model"]
    plain = subprocess.run(args, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.startswith("error: ") and "Traceback" not in plain.stderr
    debug = subprocess.run(args + ["--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_help_shows_every_option_with_a_default():
    result = run_cli(["sft", "--help"])
    assert result.exit_code == 0
    for flag in ("--max-steps", "--epochs", "--lr", "--batch-size", "--grad-accum", "--max-length", "--seed",
                 "--lora-r", "--lora-alpha", "--quantize", "--packing", "--resume", "--overwrite", "--debug"):
        assert flag in result.output, flag
    options = [line for line in result.output.splitlines() if line.strip().startswith("-")]
    assert len(options) >= 30 and result.output.count("[default:") >= 25
    assert run_cli(["--version"]).output.startswith("align, version")


class CrashAtStep(Exception):
    pass


def test_resume_after_a_crash_ends_with_the_same_adapter(tiny_model_dir, tmp_path, monkeypatch):
    data = toy_data(tmp_path)
    reference = run_sft(recipe(tiny_model_dir, data, tmp_path / "ref", max_steps=6, save_steps=2), progress=False)

    real_callback = training.progress_callback

    def crashing_callback(total, enabled=True):
        callback = real_callback(total, enabled)
        original = callback.on_step_end

        def on_step_end(args, state, control, **kwargs):
            original(args, state, control, **kwargs)
            if state.global_step == 5:
                raise CrashAtStep()

        callback.on_step_end = on_step_end
        return callback

    out = tmp_path / "run"
    monkeypatch.setattr("align.train.sft.progress_callback", crashing_callback)
    with pytest.raises(CrashAtStep):
        run_sft(recipe(tiny_model_dir, data, out, max_steps=6, save_steps=2), progress=False)
    assert not out.exists() and (tmp_path / "run.partial" / "checkpoint-4").is_dir()
    monkeypatch.setattr("align.train.sft.progress_callback", real_callback)

    resumed_recipe = recipe(tiny_model_dir, data, out, max_steps=6, save_steps=2).model_copy(update={"resume": True})
    resumed = run_sft(resumed_recipe, progress=False)
    record = json.loads((resumed / "run.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-4")
    want, got = lora_tensors(reference), lora_tensors(resumed)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)


def test_half_written_checkpoint_is_skipped(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
        (tmp_path / "checkpoint-2" / name).write_bytes(b"x")
    (tmp_path / "checkpoint-4").mkdir()  # killed during save: weights but no trainer state
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-6").mkdir()  # killed while writing the state: unreadable JSON
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
        (tmp_path / "checkpoint-6" / name).write_bytes(b"x")
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": ')
    assert training.resume_checkpoint(tmp_path, resume=True).endswith("checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "checkpoint-6").exists()


def test_qlora_four_bit_sft_runs_on_cpu(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    spec = recipe(tiny_model_dir, toy_data(tmp_path, repeat=1), tmp_path / "q", max_steps=2)
    spec.model.quantize = "4bit"
    out = run_sft(spec, progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and (out / "adapter_model.safetensors").is_file()


def test_packing_trains_on_blocks(tiny_model_dir, tmp_path):
    out = run_sft(recipe(tiny_model_dir, toy_data(tmp_path), tmp_path / "p", max_steps=2, packing=True,
                         max_length=128), progress=False)
    record = json.loads((out / "run.json").read_text())
    assert record["trainer_args"]["packing"] is True
    assert all(h["loss"] > 0 for h in record["log_history"] if "loss" in h)


@pytest.mark.slow
def test_embedded_model_learns_pig_latin_and_adapter_changes_output(tmp_path):
    from peft import AutoPeftModelForCausalLM

    from align.core.demo import PROMPT, builtin_dataset, pig_latin
    from align.core.models import load_model, load_tokenizer, resolve_model

    spec = SFTRecipe.model_validate({
        "model": {"name": "smollm2-135m", "compile": False},
        "data": {"path": "builtin:pig-latin", "limit": 256},
        "train": {"max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "save_steps": 100},
        "output": str(tmp_path / "sft"),
    })
    out = run_sft(spec, progress=False)
    record = json.loads((out / "run.json").read_text())
    losses = [h["loss"] for h in record["log_history"] if "loss" in h]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5

    resolved = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(resolved)
    base = load_model(resolved, tokenizer=tokenizer)
    tuned = AutoPeftModelForCausalLM.from_pretrained(str(out))
    # sentences of training words the model has not seen together; scored by whole words in place, so an answer
    # that merely contains "ay" (any "say" or "day") scores nothing
    sentences = [row["messages"][0]["content"].split(": ", 1)[1] for row in builtin_dataset("pig-latin", "seen")[:4]]

    def word_accuracy(model) -> float:
        right = total = 0
        for sentence in sentences:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT.format(sentence=sentence)}],
                                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(ids[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True).split()
            expected = pig_latin(sentence).split()
            right += sum(a == e for a, e in zip(answer, expected))
            total += len(expected)
        return right / total

    before, after = word_accuracy(base), word_accuracy(tuned)
    print(f"word accuracy before {before:.2f}, after {after:.2f}")
    # measured on a 2-core CPU: 0.00 before, 0.10 after (30 steps learn a few whole words, not the rule)
    assert before < 0.1 and after > before
