"""Issue 24's table, one test (or class of tests) per row: inputs and operations that ended in a wrong result with
exit 0, or in an internal error, now end as README's "Bad input" promises (one line, exit 2, nothing half-written) or
are recorded in the run's record. Expected values are counted by hand on the char tokenizer of conftest.py, where
every character is one token and each ChatML marker one special token."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from align.cli import main
from align.core.artifacts import lock_partial_dir, partial_dir
from conftest import write_jsonl
from merge.cli import main as merge_main
from test_export import save_bpe_model
from test_merge_adapters import ALL_LINEAR, make_adapter

HERE = Path(__file__).parent
PARKED_ALIGN = [sys.executable, str(HERE / "park.py")]
TRAIN = ["--dtype", "float32", "--lora-r", "2", "--batch-size", "4", "--warmup", "0"]
TOY = [{"prompt": f"flip {q}", "completion": q[::-1]} for q in ("ab", "cd", "ef", "gh")] * 2
# "<|im_start|>user\n" + "q" + "<|im_end|>\n" + "<|im_start|>assistant\n" is 1+4+1 + 1 + 1+1 + 1+9+1 = 20 tokens, and
# each answer "ab" carries 4 loss tokens: a, b, <|im_end|>, \n.
PROMPT_TOKENS = 20
ANSWER_LOSS_TOKENS = 4


def sft(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(data), "-o", str(out), *TRAIN, *extra]


def invoke(args: list[str], program=main):
    return CliRunner().invoke(program, [str(a) for a in args])


def one_error_line(result) -> str:
    """The one line a refusal prints, last (progress bars and `align run`'s `[stage]` lines may come before it)."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    assert [line for line in lines if line.startswith("error")] == lines[-1:], result.stderr
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output, result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def adapter_on_a(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter", r=2, seed=3, targets=ALL_LINEAR)


# ---- rows 1-2: what truncation leaves ------------------------------------------------------------------------------


def test_every_answer_past_max_length_is_one_line_naming_the_length_that_keeps_the_first_row(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "q", "completion": "x" * 60}] * 4)
    out = tmp_path / "out"
    line = one_error_line(invoke(sft(tiny_model_dir, data, out, "--max-length", str(PROMPT_TOKENS), "--max-steps", "1")))
    assert "--max-length 20 leaves nothing to train on" in line
    assert f"long.jsonl: line 1) needs --max-length {PROMPT_TOKENS + 1} or more" in line
    assert not out.exists() and not partial_dir(out).exists()


def test_rows_cut_away_by_max_length_are_counted_located_and_warned_about_once(tiny_model_dir, tmp_path, caplog):
    long, short = {"prompt": "q" * 40, "completion": "ab"}, {"prompt": "q", "completion": "ab"}
    data = write_jsonl(tmp_path / "half.jsonl", [long, short] * 8)  # the long prompts on the odd lines
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        result = invoke(sft(tiny_model_dir, data, out, "--max-length", "30", "--max-steps", "1", "--save-steps", "100"))
    assert result.exit_code == 0, result.output
    truncation = json.loads((out / "run.json").read_text())["data"]["truncation"]
    assert truncation["rows_read"] == 16 and truncation["rows_dropped"] == 8 and truncation["rows_trained"] == 8
    assert truncation["first_dropped"] == [f"{data}: line {n}" for n in (1, 3, 5, 7, 9)]
    assert truncation["loss_tokens"] == 8 * ANSWER_LOSS_TOKENS
    assert truncation["loss_tokens_before_truncation"] == 16 * ANSWER_LOSS_TOKENS
    warnings = [r.getMessage() for r in caplog.records if r.name == "align.train.truncation"]
    assert len(warnings) == 1 and "drops 8 of 16 rows" in warnings[0] and "\n" not in warnings[0]


def test_dpo_with_every_prompt_past_max_length_names_the_length_and_the_row(tiny_model_dir, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p" * 60, "chosen": "ab", "rejected": "ba"}] * 4)
    out = tmp_path / "out"
    line = one_error_line(invoke(["dpo", "--model", tiny_model_dir, "--data", prefs, "-o", out, *TRAIN,
                                  "--max-length", "20", "--max-steps", "1"]))
    # the prompt rendered with the generation prompt: 20 tokens of markup around 60 characters, 79 in all
    assert "--max-length 20 leaves nothing to train on" in line
    assert f"prefs.jsonl: line 1) needs --max-length {PROMPT_TOKENS - 1 + 60 + 1} or more" in line
    assert "DPO settings" not in line and not out.exists() and not partial_dir(out).exists()


def test_dpo_calls_only_trl_s_own_settings_checks_dpo_settings(tiny_model_dir, tmp_path, monkeypatch):
    from trl.trainer.dpo_trainer import DPOTrainer

    def broken_preparation(*args, **kwargs):
        raise ValueError("injected data fault")

    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", broken_preparation)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "ab", "rejected": "ba"}] * 4)
    result = invoke(["dpo", "--model", tiny_model_dir, "--data", prefs, "-o", tmp_path / "out", *TRAIN,
                     "--max-steps", "1"])
    assert result.exit_code == 3 and "DPO settings" not in result.stderr, result.stderr
    assert "ValueError: injected data fault" in result.stderr


# ---- row 3: divergence -----------------------------------------------------------------------------------------


def test_a_diverging_learning_rate_stops_the_run_and_keeps_the_last_finite_checkpoint(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    out = tmp_path / "out"
    line = one_error_line(invoke(sft(tiny_model_dir, data, out, "--lr", "1e20", "--max-steps", "4",
                                     "--save-steps", "1")))
    assert line.startswith("error: training diverged at step 2 (learning rate "), line
    assert "no adapter written" in line and "checkpoint-1" in line
    assert not out.exists()
    work = partial_dir(out)
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (work / "adapter_model.safetensors").exists()
    kept = load_file(str(work / "checkpoint-1" / "adapter_model.safetensors"))
    assert kept and all(torch.isfinite(t).all() for t in kept.values())


# ---- row 5 and the lock for every command -------------------------------------------------------------------------


def test_two_runs_started_together_on_one_output_one_is_refused_and_a_killed_holder_never_blocks(tiny_model_dir,
                                                                                                   tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    out = tmp_path / "out"
    args = sft(tiny_model_dir, data, out, "--max-steps", "2", "--save-steps", "100")
    parks = [tmp_path / f"park{i}" for i in range(2)]
    procs = []
    for park in parks:
        park.mkdir()
        procs.append(subprocess.Popen(PARKED_ALIGN + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PARK_AT": "step:1", "PARK_DIR": str(park)}))
    try:
        deadline = time.time() + 240
        while not (any(p.poll() is not None for p in procs) and any((k / "parked").exists() for k in parks)):
            assert time.time() < deadline, "one run should hold the output and the other be refused"
            time.sleep(0.1)
        holder = procs[[(k / "parked").exists() for k in parks].index(True)]
        refused = procs[1 - procs.index(holder)]
        _, stderr = refused.communicate(timeout=30)
        assert refused.returncode == 2, stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == (
            f"error: {out} is being written by another run (pid {holder.pid}, lock on {partial_dir(out)}); "
            "wait for it to finish or stop it")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
    assert partial_dir(out).is_dir()  # the killed holder's dir, lock file and all
    again = invoke(args)
    assert again.exit_code == 0, again.output
    assert (out / "run.json").is_file() and not (out / ".lock").exists() and not partial_dir(out).exists()


@pytest.fixture
def held(tmp_path):
    """Hold the lock a command would take on OUT.partial, as another run would."""
    handles = []

    def hold(out: Path) -> None:
        handles.append(lock_partial_dir(partial_dir(out), out))

    yield hold
    for fd in handles:
        os.close(fd)


def eval_recipe(tmp_path: Path, model: Path) -> Path:
    write_jsonl(tmp_path / "text.jsonl", [{"text": "hello there"}, {"text": "general kenobi"}])
    (tmp_path / "suite.yaml").write_text(f"name: s\ntasks:\n  - {{name: t, kind: perplexity, data: {tmp_path / 'text.jsonl'}}}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f'model: {{name: "{model}", dtype: float32, compile: false}}\n'
                      "stages:\n  - {name: eval, kind: eval, suites: [suite.yaml], models: [base]}\n")
    return recipe


@pytest.mark.parametrize("command", ["merge", "eval", "export", "run"])
def test_a_second_writer_of_any_command_is_refused_naming_the_holder(command, tiny_model_dir, tiny_model_dir_b,
                                                                     tmp_path, held):
    out = tmp_path / ("m.gguf" if command == "export" else "out")
    program, args, locked = main, [], out
    if command == "merge":
        program, args = merge_main, ["linear", tiny_model_dir, tiny_model_dir_b, "-o", out]
    elif command == "eval":
        eval_recipe(tmp_path, tiny_model_dir)
        args = ["eval", "--suite", tmp_path / "suite.yaml", "--model", f"m={tiny_model_dir}", "-o", out,
                "--dtype", "float32"]
    elif command == "export":
        args = ["export", save_bpe_model(tmp_path / "bpe", fit=False), "-o", out]
    else:
        args, locked = ["run", eval_recipe(tmp_path, tiny_model_dir), "-o", out], out / "eval"
    held(locked)
    line = one_error_line(invoke(args, program))
    assert f"is being written by another run (pid {os.getpid()}," in line
    assert not locked.exists()


# ---- rows 6-7: resume checks what it resumes ----------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_after_a_checkpoint(model: Path, data: Path, out: Path, monkeypatch) -> list[str]:
    """Run until step 3 with a checkpoint every 2 steps, then crash: OUT.partial holds checkpoint-2."""
    from align.train import training

    real = training.progress_callback

    def crashing(total, enabled=True):
        callback = real(total, enabled)

        def on_step_end(args, state, control, **kwargs):
            if state.global_step == 3:
                raise Crash()

        callback.on_step_end = on_step_end
        return callback

    args = sft(model, data, out, "--max-steps", "4", "--save-steps", "2", "--lr", "5e-3")
    with monkeypatch.context() as patch:
        patch.setattr("align.train.sft.progress_callback", crashing)
        invoke(args)
    assert (partial_dir(out) / "checkpoint-2" / "trainer_state.json").is_file() and not out.exists()
    return args


def with_value(args: list[str], flag: str, value: str) -> list[str]:
    changed = list(args)
    changed[changed.index(flag) + 1] = value
    return changed


def test_resume_refuses_a_changed_learning_rate_or_data_and_allows_logging_changes(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    other = write_jsonl(tmp_path / "other.jsonl", TOY[::-1])
    out = tmp_path / "out"
    args = crash_after_a_checkpoint(tiny_model_dir, data, out, monkeypatch)

    lr = one_error_line(invoke(with_value(args, "--lr", "1e-2") + ["--resume"]))
    assert "checkpoint-2 was trained with other settings: train.learning_rate (0.005 -> 0.01);" in lr
    data_changed = one_error_line(invoke(with_value(args, "--data", str(other)) + ["--resume"]))
    assert "other settings: data.fingerprint (" in data_changed and "learning_rate" not in data_changed
    assert not out.exists() and (partial_dir(out) / "checkpoint-2").is_dir()  # refusals keep the checkpoint

    # how often it saves and where it reports cannot change the result
    resumed = invoke(with_value(args, "--save-steps", "3") + ["--report-to", "none", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    record = json.loads((out / "run.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-2")
    assert record["resume"]["forced"] is False and record["resume"]["differs"] == []


def test_resume_force_continues_under_changed_settings_and_records_both(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    out = tmp_path / "out"
    args = crash_after_a_checkpoint(tiny_model_dir, data, out, monkeypatch)
    result = invoke(with_value(args, "--lr", "1e-2") + ["--resume", "--force"])
    assert result.exit_code == 0, result.output
    resume = json.loads((out / "run.json").read_text())["resume"]
    assert resume["forced"] is True and resume["differs"] == ["train.learning_rate"]
    assert resume["checkpoint_config"]["train.learning_rate"] == 5e-3 and resume["config"]["train.learning_rate"] == 1e-2
    assert one_error_line(invoke(args + ["--force"])).endswith("give it with --resume")


# ---- row 8: scratch inside the partial dir -----------------------------------------------------------------------


def test_a_merge_killed_while_merging_leaves_nothing_beside_the_output(tiny_model_dir, adapter_on_a, tmp_path):
    out = tmp_path / "merges" / "out"
    args = ["task-arithmetic", str(adapter_on_a), "--base", str(tiny_model_dir), "-o", str(out)]
    killed_in_mergekit = (
        "import os, signal, sys\n"
        "import merge.run\n"
        "merge.run.run_mergekit = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from merge.cli import main\n"
        f"main({args!r})\n")
    proc = subprocess.run([sys.executable, "-c", killed_in_mergekit], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in out.parent.iterdir()] == ["out.partial"]  # the materialized models are inside it
    result = invoke(args, merge_main)
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.parent.iterdir()] == ["out"] and not list(out.glob(".materialized*"))


# ---- row 9: the environment, behind a library's error -------------------------------------------------------------


def test_a_full_disk_while_a_checkpoint_is_written_names_the_dir(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from transformers import Trainer

    def disk_full(self, *args, **kwargs):  # what safetensors raises on a full disk (checked on a 64k tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(Trainer, "save_model", disk_full)
    out = tmp_path / "out"
    line = one_error_line(invoke(sft(tiny_model_dir, write_jsonl(tmp_path / "toy.jsonl", TOY), out,
                                     "--max-steps", "2", "--save-steps", "1")))
    assert line == f"error: cannot write to {partial_dir(out)}: No space left on device"
    assert not out.exists()


def test_an_error_raised_from_an_oserror_is_the_environment(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", TOY)

    def unreadable(path):
        try:
            raise OSError(errno.EIO, "Input/output error", str(path))
        except OSError as exc:
            raise RuntimeError("could not read rows") from exc

    monkeypatch.setattr("align.core.data._read_file", unreadable)
    line = one_error_line(invoke(["data", "inspect", data, "--model", tiny_model_dir]))
    assert line == f"error: OSError: Input/output error ({data})"


# ---- row 10: state files a crash left empty -----------------------------------------------------------------------


def test_align_run_treats_an_empty_state_file_or_record_as_absent(tiny_model_dir, tmp_path, caplog):
    recipe = eval_recipe(tmp_path, tiny_model_dir)
    rundir = tmp_path / "run"
    first = invoke(["run", recipe, "-o", rundir])
    assert first.exit_code == 0, first.output
    (rundir / "pipeline.json").write_text("")
    (rundir / "eval" / "report.json").write_text("")
    with caplog.at_level("WARNING"):
        again = invoke(["run", recipe, "-o", rundir])
    assert again.exit_code == 0, again.output
    assert "up to date" not in again.stderr and "[eval] running eval" in again.stderr
    ignored = [r.getMessage() for r in caplog.records if "ignoring unreadable" in r.getMessage()]
    assert any("pipeline.json" in m for m in ignored) and any("report.json" in m for m in ignored)
    assert json.loads((rundir / "pipeline.json").read_text())["stages"]["eval"]
    assert json.loads((rundir / "eval" / "report.json").read_text())["suites"]


# ---- row 11: a merge against another base -------------------------------------------------------------------------


def test_merging_an_adapter_against_a_base_it_was_not_trained_on_is_refused_unless_allowed(
        tiny_model_dir, tiny_model_dir_b, adapter_on_a, tmp_path):
    import shutil

    out = tmp_path / "out"
    refused = one_error_line(invoke(["task-arithmetic", adapter_on_a, "--base", tiny_model_dir_b, "-o", out],
                                    merge_main))
    assert f"was trained on {tiny_model_dir}, not on {tiny_model_dir_b}" in refused
    assert "--allow-base-mismatch" in refused and not out.exists() and not partial_dir(out).exists()

    config = tmp_path / "config.yaml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {tiny_model_dir_b}\nmodels:\n"
                      f"  - model: {tiny_model_dir_b}+{adapter_on_a}\n    parameters: {{weight: 1.0}}\n")
    assert "--allow-base-mismatch" in one_error_line(invoke(["config", config, "-o", out], merge_main))

    allowed = invoke(["task-arithmetic", adapter_on_a, "--base", tiny_model_dir_b, "-o", out,
                      "--allow-base-mismatch"], merge_main)
    assert allowed.exit_code == 0, allowed.output
    record = json.loads((out / "merge.json").read_text())
    assert record["allow_base_mismatch"] is True and len(record["base_mismatches"]) == 1

    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy-of-a")  # the same weights elsewhere are the same base
    same = invoke(["task-arithmetic", adapter_on_a, "--base", copy, "-o", tmp_path / "same"], merge_main)
    assert same.exit_code == 0, same.output
    assert json.loads((tmp_path / "same" / "merge.json").read_text())["base_mismatches"] == []
