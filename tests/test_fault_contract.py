"""Every command, the same contract under a fault in its main path (a data reader or the final save raising):

- an OSError (full disk, denied read) is the environment: exit 2, one `error:` line;
- any other exception is a bug: exit 3, one `internal error: ... (run with --debug for the traceback)` line;
- either way no traceback without --debug, no output dir, and no `.partial` except a training run's resumable
  checkpoints (kept on purpose so `--resume` can finish the run).

And `--resume` on a finished run says so and trains nothing.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from align.cli import main as align_main
from align.core.clitools import INTERNAL_ERROR_EXIT
from conftest import write_jsonl
from merge.cli import main as merge_main

SFT_ROWS = [{"prompt": f"flip {a}", "completion": a[::-1]} for a in ("ab", "cd", "ef", "gh")]
PREF_ROWS = [{"prompt": f"flip {a}", "chosen": a[::-1], "rejected": a} for a in ("ab", "cd", "ef", "gh")]
TRAIN_FLAGS = ["--max-steps", "1", "--batch-size", "2", "--dtype", "float32", "--lora-r", "2", "--save-steps", "100"]

FAULTS = {
    "oserror": (lambda: OSError(errno.ENOSPC, "No space left on device"), 2, "error: OSError: No space left on device"),
    "bug": (lambda: RuntimeError("injected fault"), INTERNAL_ERROR_EXIT,
            "internal error: RuntimeError: injected fault (run with --debug for the traceback)"),
}
# Where the fault is injected: every reader of data files, and the final record (run.json, merge.json,
# report.json), which each command writes last through artifacts.write_json.
POINTS = {"read": "align.core.data._read_file", "save": "align.core.artifacts.write_json"}


def command(name: str, tmp: Path, model: Path, out: Path, other: Path | None = None) -> tuple[object, list[str]]:
    sft_data = write_jsonl(tmp / "sft.jsonl", SFT_ROWS)
    if name == "sft":
        return align_main, ["sft", "--model", str(model), "--data", str(sft_data), "-o", str(out), *TRAIN_FLAGS]
    if name == "dpo":
        prefs = write_jsonl(tmp / "prefs.jsonl", PREF_ROWS)
        return align_main, ["dpo", "--model", str(model), "--data", str(prefs), "-o", str(out), *TRAIN_FLAGS]
    if name == "eval":
        suite = tmp / "suite.yaml"
        suite.write_text(f"name: s\ntasks:\n  - {{name: t, kind: perplexity, data: {tmp / 'text.jsonl'}}}\n")
        write_jsonl(tmp / "text.jsonl", [{"text": "hello there"}, {"text": "general kenobi"}])
        return align_main, ["eval", "--suite", str(suite), "--model", f"m={model}", "-o", str(out), "--dtype",
                            "float32"]
    if name == "inspect":
        return align_main, ["data", "inspect", str(sft_data), "--model", str(model)]
    if name == "merge":
        return merge_main, ["linear", str(model), str(other), "-o", str(out)]
    raise ValueError(name)


CASES = [(c, p, f) for c in ("sft", "dpo", "eval", "inspect", "merge") for p in POINTS for f in FAULTS
         if not (c == "inspect" and p == "save") and not (c == "merge" and p == "read")]


@pytest.mark.parametrize("name,point,fault", CASES, ids=[f"{c}-{p}-{f}" for c, p, f in CASES])
def test_a_fault_in_the_main_path_keeps_the_contract(name, point, fault, tiny_model_dir, tiny_model_dir_b, tmp_path,
                                                    monkeypatch):
    make, code, message = FAULTS[fault]

    def raising(*args, **kwargs):
        raise make()

    monkeypatch.setattr(POINTS[point], raising)
    out = tmp_path / "out"
    program, args = command(name, tmp_path, tiny_model_dir, out, tiny_model_dir_b)
    result = CliRunner().invoke(program, args)
    assert result.exit_code == code, (result.output, repr(result.exception))
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert result.stderr.count("error") == 1 and "Traceback" not in result.output
    assert not out.exists()
    partial = tmp_path / "out.partial"
    if partial.exists():  # only a training run that holds a checkpoint may stay, and --resume finishes it
        assert name in ("sft", "dpo") and any(p.name.startswith("checkpoint-") for p in partial.iterdir())
        if fault == "oserror":
            monkeypatch.undo()
            resumed = CliRunner().invoke(program, [*args, "--resume"])
            assert resumed.exit_code == 0, resumed.output
            assert (out / "run.json").is_file() and not partial.exists()


def test_debug_keeps_the_traceback_of_an_unexpected_exception(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(POINTS["read"], lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected fault")))
    program, args = command("inspect", tmp_path, tiny_model_dir, tmp_path / "out")
    result = CliRunner().invoke(program, [*args, "--debug"])
    assert isinstance(result.exception, RuntimeError)


# ---- resume is idempotent -----------------------------------------------------------------------------------------


def test_resume_on_a_finished_run_trains_nothing_and_keeps_it(tiny_model_dir, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    program, args = command("sft", tmp_path, tiny_model_dir, out)
    first = CliRunner().invoke(program, args)
    assert first.exit_code == 0, first.output
    record = (out / "run.json").read_bytes()

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("align.train.sft.load_model", no_training)
    with caplog.at_level("WARNING"):
        again = CliRunner().invoke(program, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert "already holds a finished run" in caplog.text and "nothing to resume" in caplog.text
    assert (out / "run.json").read_bytes() == record and not (tmp_path / "out.partial").exists()

    plain = CliRunner().invoke(program, args)  # without --resume the usual rule: refuse unless --overwrite
    assert plain.exit_code == 2 and "not empty" in plain.stderr
    assert (out / "run.json").read_bytes() == record


def test_dpo_resume_on_a_finished_run_trains_nothing(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"stage": "dpo"}))
    (out / "adapter_model.safetensors").write_bytes(b"finished")

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("align.train.preference.load_model", no_training)
    program, args = command("dpo", tmp_path, tiny_model_dir, out)
    result = CliRunner().invoke(program, [*args, "--resume"])
    assert result.exit_code == 0, (result.output, repr(result.exception))
    assert json.loads((out / "run.json").read_text()) == {"stage": "dpo"}
    assert (out / "adapter_model.safetensors").read_bytes() == b"finished"
    refused = CliRunner().invoke(program, args)
    assert refused.exit_code == 2 and "not empty" in refused.stderr
