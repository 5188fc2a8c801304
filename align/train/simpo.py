"""`align simpo`: SimPO (Meng et al. 2024) over TRL's experimental CPOTrainer with `loss_type="simpo"`. The loss is
-log sigmoid(beta * (mean log-prob of chosen - mean log-prob of rejected) - gamma): a length-normalized margin with
a target gap and no reference model (`cpo_alpha` 0 leaves out CPO's SFT term, as the paper does).

`trl.experimental` may change without notice: tests/test_reference_free.py computes the loss by hand on a tiny batch
and compares it with the trainer's.
"""

from __future__ import annotations

from pathlib import Path

from align.core.config import SimPORecipe
from align.train.preference import ReferenceFreeTrainer, run_reference_free

SIMPO = ReferenceFreeTrainer("simpo", "trl.experimental.cpo:CPOTrainer", fixed=(("loss_type", "simpo"),))


def run_simpo(recipe: SimPORecipe, progress: bool = True) -> Path:
    """Train a LoRA adapter with SimPO as the recipe says; return the finished output dir."""
    return run_reference_free(recipe, SIMPO, progress)
