"""Process-level concerns of a training run: which process writes, clean interruption, relaunching through
`accelerate launch`.

Distribution is accelerate's job (DDP, FSDP, DeepSpeed); we only make sure that under it exactly one process
writes artifacts and that a SIGINT/SIGTERM leaves a checkpoint and a resume command instead of lost work.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from align.core.errors import AlignError


def is_main_process() -> bool:
    """True for the process that writes artifacts: rank 0 under accelerate/torchrun, or a plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    return _state().is_main_process


def _state() -> Any:
    """accelerate's process state. On a machine without GPUs it must be told `cpu=True`, or every process of a
    multi-process CPU run believes it is rank 0 (accelerate only picks MULTI_CPU/gloo for cpu=True)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class TrainingInterrupted(AlignError):
    """SIGINT/SIGTERM during training: a checkpoint was saved; the message gives the command that resumes."""

    exit_code = 130


def resume_command(argv: list[str] | None = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    argv[0] = os.path.basename(argv[0])
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(argv)


class GracefulStop:
    """Turns SIGINT/SIGTERM into "save a checkpoint at the end of this step and stop".

    A second signal falls back to the default behaviour, so a stuck run can still be killed.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signal_name = signal.Signals(signum).name

    def callback(self) -> Any:
        from transformers import TrainerCallback

        stop = self

        class StopOnSignal(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                if stop.signal_name is not None:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopOnSignal()

    def raise_if_stopped(self, step: int, checkpoint_dir: str) -> None:
        if self.signal_name is not None:
            raise TrainingInterrupted(
                f"{self.signal_name} at step {step}: checkpoint saved in {checkpoint_dir}; resume with: {resume_command()}"
            )


def relaunch_with_accelerate(num_processes: int, argv: list[str] | None = None, extra: list[str] | None = None) -> int:
    """`align sft --num-processes N ...` -> `accelerate launch --num_processes N -m align.cli sft ...`.

    Uses accelerate's own launcher (and its config file when the user has one); on a machine without GPUs it
    runs N CPU processes with the gloo backend.
    """
    if num_processes < 1:
        raise AlignError(f"--num-processes {num_processes}: must be at least 1")
    argv = list(sys.argv[1:] if argv is None else argv)
    cleaned: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--num-processes":
            skip = True
            continue
        if arg.startswith("--num-processes="):
            continue
        cleaned.append(arg)
    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    # `--multi_gpu` selects accelerate's torchrun launcher; without GPUs the Trainer's use_cpu makes it gloo DDP.
    command = [launcher, "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
               "--dynamo_backend", "no", "--main_process_port", os.environ.get("MASTER_PORT", "29531"),
               *(extra or []), "-m", "align.cli", *cleaned]
    return subprocess.call(command, env={**os.environ, "ALIGNMERGE_LAUNCHED": "1"})
