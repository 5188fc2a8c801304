"""Output conventions shared by every command: atomic output dirs, run.json provenance, peak memory, plots.

A command writes into `OUT.partial/` (a sibling of OUT) and renames it to OUT only at the end, after its final
record (`run.json`, `merge.json`, `report.json`) is the last file written. A killed run therefore never leaves a dir
that looks complete, and readers treat a dir without its record as incomplete. Training keeps its checkpoints in
the partial dir so `--resume` can find them after a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.core.errors import AlignError

VERSIONED_PACKAGES = ("alignmerge", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes",
                      "mergekit", "evaluate", "safetensors", "gguf")


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_output_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse a non-empty OUT unless --overwrite. Called before any work, so a refusal writes nothing."""
    if out.exists() and not out.is_dir():
        raise AlignError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not resume:
        raise AlignError(f"output dir {out} is not empty (pass --overwrite to replace it)")
    parent = out.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise AlignError(f"output dir {out}: permission denied in {parent}")


@dataclass
class OutputDir:
    """An output dir under construction: write into `.path`, then `commit()` renames it into place."""

    final: Path
    path: Path
    committed: bool = False
    writer: bool = True
    """False on the non-main processes of a distributed run: they share the path but never write or rename."""

    def commit(self, record_name: str, record: dict[str, Any]) -> Path:
        """Write the final record last, then swap the partial dir into place (replacing an old OUT)."""
        if not self.writer:
            self.committed = True
            return self.final
        write_json(self.path / record_name, record)
        if self.final.exists():
            trash = self.final.with_name(self.final.name + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.final, trash)
            os.replace(self.path, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.final)
        self.committed = True
        return self.final


@contextlib.contextmanager
def output_dir(out: Path, overwrite: bool = False, resume: bool = False, keep_on_error: bool = False,
               writer: bool = True) -> Iterator[OutputDir]:
    """Create (or, with `resume`, reuse) `OUT.partial` and remove it on failure unless `keep_on_error`.

    Training passes `keep_on_error=True` once a checkpoint exists, so a crash keeps what `--resume` needs.
    `writer=False` (non-main processes) gets the same paths but creates, removes and renames nothing.
    """
    out = Path(out)
    check_output_dir(out, overwrite, resume)
    work = partial_dir(out)
    if not writer:
        yield OutputDir(out, work, writer=False)
        return
    if work.exists() and not resume:
        shutil.rmtree(work)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AlignError(f"cannot create output dir {work}: {exc.strerror}") from None
    handle = OutputDir(out, work)
    try:
        yield handle
    except BaseException:
        if not handle.committed and not (keep_on_error and has_checkpoint(work)):
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not handle.committed:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError("output dir was not committed")  # a bug in the command, not user input


def has_checkpoint(path: Path) -> bool:
    return any(p.is_dir() for p in path.glob("checkpoint-*"))


def is_complete(path: Path, record_name: str = "run.json") -> bool:
    """A dir is complete only when its final record exists (it is written last)."""
    return (Path(path) / record_name).is_file()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a record."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AlignError(f"cannot write {path}: {exc.strerror}") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)


def package_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status in bytes (VmRSS, VmHWM, RssAnon, ...); Linux only. Benchmarks use it where
    `peak_rss_bytes` is not enough: a baseline RSS to subtract, or the anonymous part without mmapped files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no field {field}")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory() -> dict[str, int]:
    import torch

    peaks = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        peaks["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return peaks


@dataclass
class Timer:
    """Wall time of named phases, for run.json."""

    phases: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return time.perf_counter() - self.started

    def timings(self) -> dict[str, float]:
        """Seconds per phase and in all, as records store them."""
        return {**self.phases, "total": self.total()}


def provenance(timings: dict[str, float]) -> dict[str, Any]:
    """What every record (run.json, merge.json, report.json) says about how it was made, under the same keys:
    wall time per phase and in all, peak memory, package versions, the machine and the command line."""
    return {"timings_s": timings, "memory": peak_memory(), "versions": package_versions(), "machine": machine_info(),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}


def plot_series(path: Path, series: dict[str, list[tuple[float, float]]], title: str, xlabel: str = "step") -> None:
    """A line plot of named (x, y) series; silently skipped when there is nothing to plot."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=name, marker="." if len(points) < 50 else None)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
