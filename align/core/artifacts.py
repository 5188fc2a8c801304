"""Output conventions shared by every command: atomic output dirs, run.json provenance, peak memory, plots.

A command writes into `OUT.partial/` (a sibling of OUT) and renames it to OUT only at the end, after its final
record (`run.json`, `merge.json`, `report.json`) is the last file written. A killed run therefore never leaves a dir
that looks complete, and readers treat a dir without its record (or with an unreadable one) as incomplete. Training
keeps its checkpoints in the partial dir so `--resume` can find them after a crash.

One process writes an output at a time: it holds an exclusive `flock` on `OUT.partial` from before it writes anything
until the rename, and the kernel releases it when the process dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
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


log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
"""Inside `OUT.partial`: the pid of the process holding the lock on that dir, for the message a second run gets."""


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def lock_partial_dir(work: Path, out: Path) -> int:
    """Create (or reuse) `work` and take an exclusive lock on it; returns the locked descriptor (close it to release).

    The lock is on the directory itself, never on a file that a cleanup could delete, and it is checked to be the
    dir now at `work` (a finishing holder renames its dir away, a failing one removes it). A second writer gets one
    line naming the holder's pid."""
    while True:
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AlignError(f"cannot create output dir {work}: {exc.strerror}") from None
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlignError(f"{out} is being written by another run (pid {lock_holder(work)}, lock on {work}); "
                             "wait for it to finish or stop it") from None
        if _same_dir(work, fd):
            (work / LOCK_FILE).write_text(f"{os.getpid()}\n")
            return fd
        os.close(fd)  # the dir we locked was renamed or removed meanwhile: lock the one there now


def _same_dir(path: Path, fd: int) -> bool:
    try:
        here, locked = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)


def lock_holder(work: Path, wait_s: float = 2.0) -> str:
    """The pid the lock holder wrote. It writes it just after taking the lock, so a second run that finds the lock
    taken may read before it is there: wait up to `wait_s` for it rather than naming no one."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            pid = (work / LOCK_FILE).read_text().strip()
        except OSError:
            pid = ""
        if pid or time.monotonic() >= deadline:
            return pid or "unknown"
        time.sleep(0.05)


def clear_dir(path: Path, keep: str = LOCK_FILE) -> None:
    """Empty a dir in place (its inode, and so its lock, stays), keeping the lock's pid file."""
    for child in path.iterdir():
        if child.name == keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


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
        (self.path / LOCK_FILE).unlink(missing_ok=True)  # the lock itself is held until the rename is done
        if self.final.exists():
            trash = self.final.with_name(self.final.name + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.final, trash)
            os.replace(self.path, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.final)
        fsync_dir(self.final.parent)
        self.committed = True
        return self.final


@contextlib.contextmanager
def output_dir(out: Path, overwrite: bool = False, resume: bool = False, keep_on_error: bool = False,
               writer: bool = True) -> Iterator[OutputDir]:
    """Lock and create (or, with `resume`, reuse) `OUT.partial`, and remove it on failure unless `keep_on_error`.

    Training passes `keep_on_error=True` once a checkpoint exists, so a crash keeps what `--resume` needs.
    `writer=False` (non-main processes) gets the same paths but locks, creates, removes and renames nothing.
    """
    out = Path(out)
    check_output_dir(out, overwrite, resume)
    work = partial_dir(out)
    if not writer:
        yield OutputDir(out, work, writer=False)
        return
    created = not work.exists()
    lock = lock_partial_dir(work, out)
    try:
        _prepare_locked(out, work, overwrite, resume, created)
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
    finally:
        os.close(lock)  # last: nobody else may take the dir before it is renamed or removed


def _prepare_locked(out: Path, work: Path, overwrite: bool, resume: bool, created: bool) -> None:
    """Under the lock: check OUT again (the run that held the lock may have just finished it), then start from an
    empty partial dir unless resuming. A refusal removes only a partial dir this run created."""
    try:
        check_output_dir(out, overwrite, resume)
    except AlignError:
        if created:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not resume:
        clear_dir(work)


def has_checkpoint(path: Path) -> bool:
    return any(p.is_dir() for p in path.glob("checkpoint-*"))


def is_complete(path: Path, record_name: str = "run.json") -> bool:
    """A dir is complete only when its final record (written last) exists and reads."""
    return read_json_record(Path(path) / record_name) is not None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically and durably (temp file, fsync, rename, fsync of the dir), so neither a killed process nor
    a crashed machine leaves a reader half a record or an empty file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AlignError(f"cannot write {path}: {exc.strerror}") from None


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_record(path: Path) -> dict[str, Any] | None:
    """A state file or record (pipeline.json, run.json, ...) as a dict; None when it is missing, and also when it is
    empty or unreadable (a crash before it was written out), with a one-line warning: such a file means nothing was
    recorded, not that the input is bad."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        log.warning("ignoring unreadable %s (%s): treated as absent", path, reason)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring %s: not a JSON object, treated as absent", path)
        return None
    return data


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
    """Peak resident set size of this process since it started or since `reset_peak_memory` (Linux: VmHWM; elsewhere
    ru_maxrss, which cannot be reset)."""
    try:
        return proc_status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory() -> None:
    """Start the peak over, so that the next record's peak is its own (`align run` runs every stage in one process):
    the kernel's high-water RSS mark (/proc/self/clear_refs, Linux) and torch's CUDA peak."""
    import torch

    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


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
