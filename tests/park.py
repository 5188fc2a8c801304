"""Run the `align` CLI with hooks that park the process at a chosen point, so a test can SIGKILL it exactly there.

    PARK_AT=step:5   after step 5's forward/backward, before its optimizer update
    PARK_AT=save:6   inside checkpoint-6's save: weights and optimizer written, RNG and trainer state not yet
A marker file `PARK_DIR/parked` says the process is parked.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def park() -> None:
    (Path(os.environ["PARK_DIR"]) / "parked").touch()
    time.sleep(600)


def install() -> None:
    from transformers import Trainer

    kind, _, number = os.environ.get("PARK_AT", ":").partition(":")
    if kind == "step":
        original_step = Trainer.training_step

        def training_step(self, *args, **kwargs):
            loss = original_step(self, *args, **kwargs)
            if self.state.global_step + 1 == int(number):
                park()
            return loss

        Trainer.training_step = training_step
    elif kind == "save":
        original_rng = Trainer._save_rng_state

        def save_rng_state(self, output_dir):
            if self.state.global_step == int(number):
                park()
            return original_rng(self, output_dir)

        Trainer._save_rng_state = save_rng_state


if __name__ == "__main__":
    install()
    from align.cli import main

    sys.argv[0] = "align"
    main()
