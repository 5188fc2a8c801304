"""Atomic output dirs: failures while saving leave one line and the previous artifacts untouched."""

from __future__ import annotations

import errno
import json

import pytest

from align.core.artifacts import is_complete, output_dir, proc_status_bytes
from align.core.errors import AlignError
from align.train.sft import run_sft
from test_sft import recipe, toy_data


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_output(tiny_model_dir, tmp_path, monkeypatch):
    data = toy_data(tmp_path, repeat=1)
    out = run_sft(recipe(tiny_model_dir, data, tmp_path / "out", max_steps=2), progress=False)
    before = (out / "run.json").read_text()

    from peft import PeftModel

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", disk_full)
    again = recipe(tiny_model_dir, data, tmp_path / "out", max_steps=2).model_copy(update={"overwrite": True})
    again.train["save_steps"] = 1000  # no checkpoint: the failure is in the final save
    with pytest.raises(AlignError, match="No space left on device") as info:
        run_sft(again, progress=False)
    assert "\n" not in str(info.value)
    assert (out / "run.json").read_text() == before  # previous artifacts untouched
    assert json.loads(before)["stage"] == "sft"


def test_permission_denied_creating_the_output_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(AlignError, match="cannot create output dir .*Permission denied"):
        with output_dir(tmp_path / "x"):
            pass


def test_a_dir_without_its_record_is_incomplete_and_a_failed_command_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with output_dir(tmp_path / "o") as handle:
            (handle.path / "weights.bin").write_text("x")
            raise RuntimeError("killed")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    with output_dir(tmp_path / "o") as handle:
        (handle.path / "weights.bin").write_text("x")
        assert not is_complete(handle.path)
        handle.commit("run.json", {"ok": True})
    assert is_complete(tmp_path / "o") and not (tmp_path / "o.partial").exists()


def test_proc_status_bytes_reads_memory_fields_and_names_a_missing_one():
    before = proc_status_bytes("VmRSS")
    block = b"x" * (64 * 2**20)  # written, so resident
    assert proc_status_bytes("VmRSS") >= before + len(block) // 2
    assert proc_status_bytes("VmHWM") >= proc_status_bytes("VmRSS")
    with pytest.raises(RuntimeError, match="no field VmNope"):
        proc_status_bytes("VmNope")


def test_peak_memory_starts_over_for_each_pipeline_stage():
    """`align run` runs every stage in one process; after `reset_peak_memory` the peak is the next stage's own, not
    the largest of the stages before it."""
    import sys

    import numpy as np

    from align.core.artifacts import peak_rss_bytes, reset_peak_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("the kernel's high-water mark is reset through /proc (Linux)")
    big = np.ones(40_000_000)  # 320 MB, touched
    during = peak_rss_bytes()
    del big
    reset_peak_memory()
    assert peak_rss_bytes() < during - 200 * 2**20
