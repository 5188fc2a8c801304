"""The training methods: one registry (`METHODS`) from a method's name to its object, as merge/methods.py is for
merges and mergekit's `merge_methods/registry.py` is for mergekit. The name is the `align` command, the pipeline's
stage kind and the `align estimate --stage` value; everything that differs between methods is a field here.

A new method is its module in align/train (a `run_<name>(recipe) -> Path`), its recipe in align/core/config.py, one
entry below, and its tests: the command, its `--help`, `--dry-run`, the pipeline stage kind and its record, and the
planner follow from the entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.core.config import (
    DPORecipe, GRPORecipe, KTORecipe, ORPORecipe, RMRecipe, SFTRecipe, SimPORecipe, TrainRecipe,
)

DataKind = Literal["sft", "pairs", "unpaired", "prompts"]


@dataclass(frozen=True)
class TrainingMethod:
    name: str
    """The `align` command, the pipeline stage kind, the planner's stage."""
    summary: str
    """The command's help, first paragraph."""
    recipe: type[TrainRecipe]
    trl_config: str
    """`module:Class` of the TRL config the recipe's `train` section is checked against."""
    runner: str
    """`module:function` that trains it: (recipe, progress=True) -> the finished output dir."""
    data: DataKind
    """What a row is: an SFT conversation, a preference pair, an unpaired completion with a label, or a prompt to
    sample completions for (with an optional reference answer)."""
    reference: bool
    """Whether a reference model shapes the loss (`--ref` modes, the step-0 check, reference forwards)."""
    sequences_per_row: int
    """Sequences one row puts through the model per step (the planner's activations): a pair is two."""
    disables_dropout: bool
    """The run's `disable_dropout` defaults to True (its recipe's default, else its TRL config's), which zeroes LoRA's
    dropout too (the planner plans none; tests/test_methods.py reads both defaults)."""
    samples: bool = False
    """Completions are sampled from the policy during training: the planner adds the moment of sampling (the KV
    cache of a generation batch) and the reward models that score them."""
    record: str = "run.json"
    """Written last into the output dir: its presence means the run finished."""

    def config_class(self) -> type:
        return _attribute(self.trl_config)

    def run(self, recipe: TrainRecipe, progress: bool = True) -> Path:
        return _attribute(self.runner)(recipe, progress=progress)

    def reference_mode(self, recipe: TrainRecipe) -> str | None:
        """The reference the planner plans for, as `--ref` names it (None: the method has no reference)."""
        if not self.reference:
            return None
        from align.core.reference import parse_reference

        spec = getattr(recipe, "ref", None)
        return parse_reference(spec)[0] if spec else "auto"


def _attribute(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


METHODS: dict[str, TrainingMethod] = {m.name: m for m in (
    TrainingMethod(
        name="sft", recipe=SFTRecipe, trl_config="trl:SFTConfig", runner="align.train.sft:run_sft", data="sft",
        reference=False, sequences_per_row=1, disables_dropout=False,
        summary="Supervised fine-tuning of a LoRA adapter. RECIPE is an optional YAML with model/data/lora/train "
                "sections; `train` takes any SFTConfig field."),
    TrainingMethod(
        name="dpo", recipe=DPORecipe, trl_config="trl:DPOConfig", runner="align.train.dpo:run_dpo", data="pairs",
        reference=True, sequences_per_row=2, disables_dropout=True,
        summary="Preference alignment (DPO) of a LoRA adapter, with the SFT adapter as its own reference. RECIPE is "
                "an optional YAML with model/data/lora/train sections plus adapter, ref, max_prompt_length and "
                "max_completion_length; `train` takes any DPOConfig field (`--loss` lists the installed losses)."),
    TrainingMethod(
        name="kto", recipe=KTORecipe, trl_config="trl:KTOConfig", runner="align.train.kto:run_kto", data="unpaired",
        reference=True, sequences_per_row=2, disables_dropout=True,  # each completion, and a mismatched one for KL
        summary="KTO: alignment from unpaired feedback (answers marked desirable or undesirable), or from pairs split "
                "in two, with the SFT adapter as its own reference (the same --ref modes and step-0 check as DPO). "
                "Class weights balance the two kinds unless set; `train` takes any KTOConfig field."),
    TrainingMethod(
        name="orpo", recipe=ORPORecipe, trl_config="trl.experimental.orpo:ORPOConfig",
        runner="align.train.orpo:run_orpo", data="pairs", reference=False, sequences_per_row=2,
        disables_dropout=True,
        summary="ORPO: SFT on the chosen answer plus an odds-ratio penalty on the rejected one, with no reference "
                "model (one copy of the weights, no reference forward). From the base or an SFT adapter; `train` "
                "takes any ORPOConfig field (TRL's experimental trainer, pinned by tests/test_reference_free.py)."),
    TrainingMethod(
        name="simpo", recipe=SimPORecipe, trl_config="trl.experimental.cpo:CPOConfig",
        runner="align.train.simpo:run_simpo", data="pairs", reference=False, sequences_per_row=2,
        disables_dropout=True,
        summary="SimPO: a length-normalized log-likelihood margin with a target gap, no reference model. From the "
                "base or an SFT adapter; `train` takes any CPOConfig field (TRL's experimental CPOTrainer with "
                "loss_type simpo, pinned by tests/test_reference_free.py)."),
    TrainingMethod(
        name="grpo", recipe=GRPORecipe, trl_config="trl:GRPOConfig", runner="align.train.grpo:run_grpo",
        data="prompts", reference=True, disables_dropout=True,  # our default, not TRL's (GRPOTrainSettings)
        # TRL's batch counts completions, not prompts (a prompt's num_generations completions are num_generations
        # rows of it), so each batch row is one sequence. Sampling (a whole generation batch under no_grad, after the
        # previous step's activations are freed) is its own moment of the plan. Not planned: with beta > 0, the
        # reference's no-grad forward (one layer at a time over one micro-batch, below the training forward).
        sequences_per_row=1, samples=True,
        summary="GRPO: online RL from reward functions over TRL's GRPOTrainer. For each prompt a group of "
                "completions is sampled and scored (--reward: pig-latin, exact, regex:PATTERN, length[:N], "
                "FILE.py:FUNCTION or rm:DIR, weighted by --reward-weights), with a KL to the frozen SFT adapter or the "
                "base (--ref adapter|base; --beta 0: none) and a step-0 check; `train` takes any GRPOConfig field."),
    TrainingMethod(
        name="rm", recipe=RMRecipe, trl_config="trl:RewardConfig", runner="align.train.rm:run_rm", data="pairs",
        reference=False, sequences_per_row=2, disables_dropout=True,  # chosen and rejected in one batch
        summary="A LoRA reward model over TRL's RewardTrainer: the base with a one-output score head, trained on the "
                "pairs `align dpo` reads so the chosen answer scores above the rejected one. run.json records held-out "
                "pair accuracy with a Wilson 95% interval (--eval-size or --eval-data); the output is a PEFT "
                "sequence-classification adapter; `train` takes any RewardConfig field."),
)}


def method_of(name: str) -> TrainingMethod:
    from align.core.errors import AlignError, did_you_mean

    if name not in METHODS:
        raise AlignError(f"unknown training method {name!r}{did_you_mean(name, list(METHODS))} "
                         f"(methods: {', '.join(METHODS)})")
    return METHODS[name]
