"""Stop a run whose loss or weights stop being numbers, instead of saving a NaN adapter as a success.

The Trainer trains on through NaN: by default it even logs a non-finite loss as the average of the finite ones
(`logging_nan_inf_filter`, which our recipes turn off), so a run at `--lr 1e6` ended with exit 0, a last logged loss
of 0.0 and every adapter tensor NaN. The guard is a TrainerCallback: it reads each logged loss, and checks the
trainable parameters before the Trainer saves a checkpoint (and at the last step), so no non-finite checkpoint is
written; on either it stops the run at that step, and the command raises one line naming the step and the learning
rate, keeping the last finite checkpoint and writing no adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from align.core.errors import AlignError


@dataclass(frozen=True)
class Divergence:
    step: int
    learning_rate: float | None
    what: str


def non_finite_parameters(model: Any) -> list[str]:
    """Names of the trainable parameters holding a NaN or an infinity."""
    import torch

    return [name for name, param in model.named_parameters()
            if param.requires_grad and not bool(torch.isfinite(param).all())]


class FiniteGuard:
    """Watches a run for non-finite loss or weights; `callback()` goes to the Trainer, `raise_if_diverged()` after
    `train()` returns."""

    def __init__(self) -> None:
        self.divergence: Divergence | None = None
        self.learning_rate: float | None = None
        """The rate of the step in progress (the scheduler has moved on by the time the step ends)."""

    def stop(self, control: Any, step: int, learning_rate: float | None, what: str) -> None:
        if self.divergence is None:
            self.divergence = Divergence(step, learning_rate, what)
        control.should_save = False  # a checkpoint now would hold the non-finite weights
        control.should_evaluate = False
        control.should_training_stop = True

    def callback(self) -> Any:
        from transformers import TrainerCallback

        guard = self

        class StopOnNonFinite(TrainerCallback):
            def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):  # noqa: ANN001
                if lr_scheduler is not None:
                    guard.learning_rate = float(lr_scheduler.get_last_lr()[0])

            def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
                # runs before the Trainer logs and saves this step, after DefaultFlowCallback decided whether to save
                if model is not None and (control.should_save or control.should_training_stop):
                    bad = non_finite_parameters(model)
                    if bad:
                        guard.stop(control, state.global_step, guard.learning_rate,
                                   f"{len(bad)} adapter tensors hold NaN/inf (first: {bad[0]})")
                return control

            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
                loss = (logs or {}).get("loss")
                if loss is not None and not math.isfinite(loss):
                    guard.stop(control, state.global_step, logs.get("learning_rate"), f"loss {loss}")
                return control

        return StopOnNonFinite()

    def raise_if_diverged(self, last_checkpoint: str | None) -> None:
        found = self.divergence
        if found is None:
            return
        rate = f"{found.learning_rate:.3g}" if found.learning_rate is not None else "unknown"
        kept = f"the last finite checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        raise AlignError(f"training diverged at step {found.step} (learning rate {rate}): {found.what}; no adapter "
                         f"written, {kept} (lower --lr and train again)")
