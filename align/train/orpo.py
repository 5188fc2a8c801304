"""`align orpo`: ORPO (Hong et al. 2024) over TRL's experimental ORPOTrainer. The loss is the SFT loss on the chosen
conversation minus beta times the log-sigmoid of the log odds ratio of chosen over rejected (per-token averaged
log-probs of the answers), so one stage does what SFT then DPO do, with one copy of the weights and no reference
forward. TRL 1.16 takes the SFT term over the whole chosen sequence, prompt included (the paper: the answer).

`trl.experimental` may change without notice: tests/test_reference_free.py computes the loss by hand on a tiny batch
and compares it with the trainer's, so an upstream change cannot alter what `align orpo` trains silently.
"""

from __future__ import annotations

from pathlib import Path

from align.core.config import ORPORecipe
from align.train.preference import ReferenceFreeTrainer, run_reference_free

ORPO = ReferenceFreeTrainer("orpo", "trl.experimental.orpo:ORPOTrainer")


def run_orpo(recipe: ORPORecipe, progress: bool = True) -> Path:
    """Train a LoRA adapter with ORPO as the recipe says; return the finished output dir."""
    return run_reference_free(recipe, ORPO, progress)
