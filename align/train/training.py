"""What SFT and DPO share: LoRA set-up, the trainer arguments we choose for the machine, progress, checkpoints,
and writing the finished adapter with its provenance.

We wrap TRL's trainers and configure them; we do not subclass them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.core.artifacts import OutputDir, plot_series, provenance
from align.core.config import LoraSpec, ModelSpec, TrainRecipe, TrainSettings, recipe_dict, with_defaults
from align.core.errors import AlignError, os_error_in, raise_write_error
from align.core.trl_fields import PACKING_ATTENTION, VARLEN_ATTENTION
from align.core.models import Precision, ResolvedModel, model_summary, pick_precision
from align.train.divergence import FiniteGuard



def lora_config(spec: LoraSpec, task: str = "CAUSAL_LM") -> Any:
    """PEFT's LoraConfig for the recipe's lora section. No target modules (only modules_to_save trained) is PEFT's
    dummy target, the one value its injection accepts for an adapter without LoRA matrices (X-LoRA's base uses it);
    the adapter then loads with plain `PeftModel.from_pretrained` like any other."""
    from peft import LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    init: Any = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}[spec.init]
    extra: dict[str, Any] = {}
    if spec.init == "loftq":
        from peft import LoftQConfig

        extra["loftq_config"] = LoftQConfig(loftq_bits=4)
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules or DUMMY_TARGET_MODULES,
        modules_to_save=spec.modules_to_save or None,
        use_rslora=spec.rslora,
        use_dora=spec.dora,
        init_lora_weights=init,
        task_type=task,
        **extra,
    )


# A recipe's lora.* field and the adapter_config.json key that records it.
ADAPTER_CONFIG_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
                       "modules_to_save": "modules_to_save", "rslora": "use_rslora", "dora": "use_dora",
                       "init": "init_lora_weights"}


def adapter_lora(adapter: Path) -> dict[str, Any]:
    """An adapter's LoRA settings as recipe lora.* values, read from its adapter_config.json."""
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(adapter)).to_dict()
    except (OSError, ValueError, TypeError) as exc:
        raise AlignError(f"{adapter}: cannot read adapter_config.json ({str(exc).splitlines()[0]})") from None
    own = {field: config.get(key) for field, key in ADAPTER_CONFIG_KEYS.items()}
    own["target_modules"] = module_names(own["target_modules"])
    own["modules_to_save"] = sorted(own["modules_to_save"] or [])
    own["init"] = "default" if own["init"] in (True, None) else str(own["init"])
    return own


def continued_lora(recipe: TrainRecipe, adapter: Path | None) -> TrainRecipe:
    """The recipe a run that keeps training `adapter` actually runs: its lora section is the adapter's own shape,
    since a saved adapter is trained as it is. A lora.* value the recipe sets that differs cannot apply, so it is
    refused (before anything loads) rather than recorded in run.json as if it had."""
    if adapter is None:
        return recipe
    own = adapter_lora(adapter)
    given = recipe.lora.model_dump(include=recipe.lora.model_fields_set)
    differ = [field for field, value in given.items()
              if field in own and not _same_lora_value(field, value, own[field])]
    if differ:
        asked = ", ".join(f"lora.{f}={given[f]}" for f in differ)
        theirs = ", ".join(f"{f}={own[f]}" for f in differ)
        raise AlignError(f"{asked}: the adapter being continued ({adapter}) has {theirs}; continuing an adapter "
                         "trains it as it was saved, so drop these lora settings or give the adapter's own values")
    shape = {field: value for field, value in own.items() if field != "init"}  # how it began no longer applies
    return recipe.model_copy(update={"lora": type(recipe.lora).model_validate({**recipe.lora.model_dump(), **shape})})


def module_names(targets: Any) -> Any:
    """LoRA target modules as sorted module names: PEFT saves an `all-linear` adapter's targets as full paths
    (`model.layers.0.mlp.down_proj`), a listed one's as given; a regex string stays as it is; PEFT's dummy target
    (no LoRA matrices) is no module."""
    from peft.utils.constants import DUMMY_TARGET_MODULES

    if targets == DUMMY_TARGET_MODULES:
        return []
    if isinstance(targets, (list, set, tuple)):
        return sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    return targets


def _same_lora_value(field: str, value: Any, own: Any) -> bool:
    if field == "target_modules":
        # all-linear is expanded into module names when an adapter is made, so any saved list may be what it meant
        return value == "all-linear" or module_names([value] if isinstance(value, str) else value) == own
    if field == "modules_to_save":
        return sorted(value or []) == own
    if field == "alpha" and value is None:
        return True  # unset: 2*r by default, which the adapter's own alpha replaces
    return value == own


def check_lora_compatibility(recipe: TrainRecipe) -> None:
    """Incompatible flag combinations, caught before anything loads."""
    if recipe.lora.init == "loftq" and recipe.model.quantize:
        raise AlignError("--lora-init loftq quantizes the base itself: load it unquantized (drop --quantize)")
    if recipe.lora.init == "pissa" and recipe.model.quantize:
        raise AlignError("PiSSA init needs the full-precision base weights (drop --quantize, or use lora.init=default)")
    if recipe.lora.dora and recipe.model.quantize == "8bit":
        raise AlignError("DoRA is not supported on an 8-bit base (use --quantize 4bit or none)")


def check_run_inputs(recipe: TrainRecipe) -> Path:
    """The output dir and flag combinations a training command can refuse before loading anything."""
    from align.core.artifacts import check_output_dir

    if not recipe.output:
        raise AlignError("no output dir: pass --output DIR")
    out = Path(recipe.output)
    check_output_dir(out, recipe.overwrite, recipe.resume)
    check_lora_compatibility(recipe)
    return out


def attach_lora(model: Any, spec: LoraSpec, gradient_checkpointing: bool, seed: int) -> Any:
    """A fresh LoRA adapter, or keep training the adapter `--model` named. Quantized bases are prepared for QLoRA
    (frozen base, input grads; see `prepare_quantized`).

    Seeded here because LoRA's A matrices are drawn when the adapter is created, before the Trainer seeds anything:
    without it two runs with the same seed differ from step 2 on, and a resumed run cannot match an unbroken one.
    The seed is the run's (train.seed): no default, so no caller can reset the global random state to another one.
    """
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    set_seed(seed)
    model = prepare_quantized(model, gradient_checkpointing)
    if isinstance(model, PeftModel):
        return model
    check_modules_to_save(model, spec.modules_to_save or [])
    return get_peft_model(model, lora_config(spec))


def check_modules_to_save(model: Any, names: list[str]) -> None:
    """Each lora.modules_to_save entry must name a module (PEFT's rule: a module path ending with it), or PEFT
    would train nothing for it without a word. A mixture's router trained alone must get a gradient: with one
    expert per token Mixtral renormalizes the chosen expert's weight to exactly 1, so the loss does not depend on
    the router's weights at all (its gradient is zero) and the run would end with the router it started with."""
    paths = [name for name, _ in model.named_modules(remove_duplicate=False)]
    for entry in names:
        matched = [path for path in paths if path.endswith(entry)]
        if not matched:
            raise AlignError(f"lora.modules_to_save: no module named '{entry}' in {type(model).__name__} "
                             f"(its layers hold: {', '.join(layer_module_names(model))})")
        routers = [path for path in matched if type(model.get_submodule(path)).__name__.endswith("Router")]
        if routers and getattr(model.config, "num_experts_per_tok", None) == 1:
            raise AlignError(f"lora.modules_to_save: '{entry}' is the router of a mixture with one expert per token, "
                             "which gets no gradient (the chosen expert's weight is renormalized to 1); build the "
                             "mixture with experts_per_token 2 or more to train its router")


def layer_module_names(model: Any) -> list[str]:
    """The module names inside the first decoder layer (`self_attn`, `mlp.gate`, ...): what modules_to_save can name."""
    import re

    found: list[str] = []
    for name, _ in model.named_modules():
        match = re.search(r"\.0\.(.+)$", name)
        if match and match.group(1) not in found:
            found.append(match.group(1))
    return found


def prepare_quantized(model: Any, gradient_checkpointing: bool) -> Any:
    """A quantized base made ready for LoRA training, the way plain TRL's QLoRA path does it; other models pass
    through.

    Not PEFT's `prepare_model_for_kbit_training`: it upcasts every non-quantized tensor (embeddings, the tied head,
    norms) to fp32, which on a 1.07B Llama on an H100 cost 3.6 GB and 11% of the speed, so 4-bit used more memory
    than bf16 LoRA (issue 12). Beyond what PEFT does anyway (get_peft_model and a trainable PeftModel.from_pretrained
    freeze the base), QLoRA needs only input gradients when checkpointing, so the checkpointed layers'
    recomputation has a graph to hang the LoRA gradients on (the Trainer's own call is skipped for PEFT models,
    transformers#42489). Everything else stays in the dtype it was loaded in (`--dtype`: the compute dtype on a
    GPU). The fp32 tensors left are named in `QLORA_FP32_EXCEPTIONS`.
    """
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return model
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


# What may still be held in fp32 after `prepare_quantized` on a model loaded in a 16-bit dtype, and why:
# - LoRA (and DoRA) weights: PEFT keeps adapters in fp32 (`autocast_adapter_dtype`) so small updates are not lost
#   to rounding; TRL's QLoRA path then casts them to bf16 itself (all but DoRA's magnitude vector).
# - norms: none. transformers' RMSNorm/LayerNorm upcast their input to fp32 inside forward, so an fp32 weight buys
#   no precision, and plain TRL's QLoRA leaves them in the compute dtype.
# - embeddings and the output head: none; they stay in the compute dtype (load in fp32 with --dtype float32 to ask
#   otherwise).
# - RoPE inverse frequencies (buffers, head_dim/2 values per model): transformers keeps them in fp32 on purpose.
QLORA_FP32_EXCEPTIONS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                         "inv_freq", "original_inv_freq")


def is_qlora_fp32_exception(name: str) -> bool:
    """Whether a parameter's name puts it among `QLORA_FP32_EXCEPTIONS`."""
    return any(f".{part}." in f".{name}." for part in QLORA_FP32_EXCEPTIONS)


# ---- choices for the machine ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachinePlan:
    """The defaults we pick for this machine and run, recorded in run.json with the reasons."""

    precision: Precision
    gradient_checkpointing: bool
    torch_compile: bool
    reasons: dict[str, str] = field(default_factory=dict)
    micro_batch: tuple[int, int] | None = None
    """(per-device batch, accumulation) chosen because the recipe's batch does not fit; None: the recipe's."""
    packing: bool | None = None
    """Padding-free packing (SFT); None where the stage has no such choice."""
    liger: bool = False
    """Liger's fused layer kernels (RMSNorm, RoPE, SwiGLU) through the Trainer's `use_liger_kernel`."""

    def describe(self) -> dict[str, Any]:
        return {"precision": self.precision.name, "gradient_checkpointing": self.gradient_checkpointing,
                "torch_compile": self.torch_compile, "micro_batch": self.micro_batch, "packing": self.packing,
                "liger_kernel": self.liger, "reasons": {"precision": self.precision.reason, **self.reasons}}

    def trainer_overrides(self) -> dict[str, Any]:
        """The TRL/Trainer arguments these choices set (each choice already yields to the recipe's own setting)."""
        overrides: dict[str, Any] = {"use_liger_kernel": self.liger}
        if self.micro_batch is not None:
            overrides["per_device_train_batch_size"], overrides["gradient_accumulation_steps"] = self.micro_batch
        if self.packing is not None:
            overrides["packing"] = self.packing
        return overrides


def plan_machine(model_spec: ModelSpec, train: dict[str, Any], recipe: TrainRecipe | None = None,
                 stage: str = "sft", ref: str | None = None, lengths: list[int] | None = None) -> MachinePlan:
    """`lengths`: the tokenized training rows' lengths (SFT), for the packing decision."""
    precision = pick_precision(model_spec.dtype)
    reasons: dict[str, str] = {}
    micro_batch = None
    checkpointing = train.get("activation_checkpointing", train.get("gradient_checkpointing", model_spec.gradient_checkpointing))
    if checkpointing == "auto":
        checkpointing, micro_batch, reasons["gradient_checkpointing"] = memory_layout(recipe, stage, ref)
    else:
        reasons["gradient_checkpointing"] = "requested"
    packing = None
    if stage == "sft":
        packing, reasons["packing"] = packing_choice(model_spec, train, lengths)
    liger, reasons["liger_kernel"] = liger_choice(train, ref)
    compile_ = train.get("torch_compile", model_spec.compile)
    if compile_ == "auto":
        # Chat batches change shape every step, and torch.compile recompiles for each new length: measured on the
        # embedded model (2-core CPU, 40 steps) it ran at 25 tokens/s against 142 without it. Opt in with --compile.
        compile_ = False
        reasons["torch_compile"] = "off: variable batch shapes make it recompile every step (opt in with --compile)"
    else:
        reasons["torch_compile"] = "requested"
    return MachinePlan(precision, bool(checkpointing), bool(compile_), reasons, micro_batch, packing, liger)


def memory_layout(recipe: TrainRecipe | None, stage: str, ref: str | None
                  ) -> tuple[bool, tuple[int, int] | None, str]:
    """(checkpointing, (micro-batch, accumulation) or None, reason). When the memory planner says the recipe's
    batch would not fit, it picks the fastest predicted of a smaller micro-batch with accumulation (the same
    effective batch), checkpointing (~33% more compute), or both (`estimate.choose_layout`); the same plan
    `--dry-run` prints."""
    if recipe is None:
        return False, None, "off: no plan to go by (turn on with --gradient-checkpointing)"
    from align.train.estimate import available_memory, human, plan_from_recipe

    try:
        plan = plan_from_recipe(recipe, stage, ref)  # type: ignore[arg-type]
    except AlignError as exc:  # a model the planner cannot describe: train as asked, say why
        return False, None, f"off: the memory planner could not plan this model ({exc})"
    setup = plan.setup
    if plan.layout:
        asked = int(recipe.train_arguments()["per_device_train_batch_size"])
        micro = (setup.batch_size, setup.grad_accum) if setup.batch_size != asked else None
        return setup.gradient_checkpointing, micro, ("on: " if setup.gradient_checkpointing else "off: ") + plan.layout
    limit = available_memory(setup.device)
    verdict = "on" if setup.gradient_checkpointing else "off"
    return setup.gradient_checkpointing, None, (f"{verdict}: planned peak {human(plan.peak_bytes)} "
                                                f"against {human(limit)} of {setup.device} memory")


def packing_choice(model_spec: ModelSpec, train: dict[str, Any], lengths: list[int] | None) -> tuple[bool, str]:
    """Padding-free packing (TRL's bfd) where the attention path keeps sequences apart and it is predicted faster.

    A varlen kernel never computes across sequences, so packing only removes padding: always on. sdpa/eager keep
    sequences apart with a mask over the whole flattened batch, so their attention grows with (batch x max_length)^2
    instead of each sequence's length squared: on where `estimate.packing_speedup` (FLOPs, padding included)
    predicts a gain, which on long-tailed chat data it does and on short uniform rows it does not."""
    if "packing" in train or "padding_free" in train:
        return bool(train.get("packing")), "requested"
    attn = str(model_spec.attn)
    if attn not in PACKING_ATTENTION:
        return False, f"off: attention {attn!r} is not known to keep packed sequences apart"
    from align.train.estimate import load_shape

    try:
        shape = load_shape(model_spec.name)
    except AlignError as exc:
        return False, f"off: cannot read the model's config to decide ({exc})"
    if not builds_packed_mask(shape.model_type):
        return False, (f"off: {shape.model_type} does not build its mask with transformers' masking utilities, so "
                       "packed sequences would attend to each other")
    if attn in VARLEN_ATTENTION:
        return True, f"on: {attn} runs each packed sequence alone (varlen), so packing only removes padding"
    if not lengths:
        return False, "off: no data lengths to predict its cost from"
    from align.train.estimate import packing_speedup

    settings = with_defaults(train)
    batch = int(settings["per_device_train_batch_size"])
    max_length = int(settings["max_length"] or TrainSettings.model_fields["max_length"].default)
    speedup = packing_speedup(shape, lengths, batch, max_length, dense_mask=True)
    how = (f"{attn} keeps sequences apart with a block-diagonal mask but computes attention over the whole "
           f"flattened batch ({batch} x {max_length} tokens); predicted {speedup:.2f}x the unpacked speed")
    return (True, f"on: {how}") if speedup > 1.0 else (False, f"off: {how} (turn on with --packing; it is exact)")


def builds_packed_mask(model_type: str) -> bool:
    """Whether the architecture's attention mask comes from `transformers.masking_utils`, which reads packed
    sequences from position ids (older architectures build their own causal mask and do not)."""
    import importlib

    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return False
    return hasattr(module, "create_causal_mask")


def liger_choice(train: dict[str, Any], ref: str | None) -> tuple[bool, str]:
    """Liger's fused layer kernels (RMSNorm, RoPE, SwiGLU; TRL keeps its own fused LM head instead of Liger's
    cross-entropy) on CUDA when the package imports; `train.use_liger_kernel` decides when set."""
    if "use_liger_kernel" in train:
        return bool(train["use_liger_kernel"]), "requested"
    if not torch.cuda.is_available():
        return False, "off: no CUDA device (Liger's kernels are Triton GPU kernels)"
    if ref == "model":
        return False, ("off: the Trainer patches the policy only, so a separate reference model would run other "
                       "kernels and fail the step-0 check (turn on with --set train.use_liger_kernel=true)")
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install (e.g. no Triton) must not stop training
        return False, f"off: liger-kernel does not import ({type(exc).__name__}; pip install 'alignmerge[gpu]')"
    return True, "on: CUDA and liger-kernel installed (off with --set train.use_liger_kernel=false)"


def trainer_arguments(recipe: TrainRecipe, plan: MachinePlan, workdir: Path) -> dict[str, Any]:
    """TRL/Trainer keyword arguments: our machine-aware choices, then the recipe's `train` section with its defaults
    (written once, in config.TrainSettings)."""
    precision = plan.precision
    defaults: dict[str, Any] = {
        "output_dir": str(workdir),
        "bf16": precision.bf16_autocast or precision.weights == torch.bfloat16,
        "fp16": precision.weights == torch.float16,
        "torch_compile": plan.torch_compile,
        "use_cpu": not torch.cuda.is_available(),
    }
    merged = {**defaults, **recipe.train_arguments(), **plan.trainer_overrides()}
    merged["output_dir"] = str(workdir)  # artifacts always go through the atomic output dir
    # The plan already folded in either spelling of the flag; the kwargs keep the recipe's, under the installed name.
    flag, kwargs_name = checkpointing_argument_names()
    user_kwargs = [merged.pop(name) for name in CHECKPOINTING_KWARGS if name in merged]
    for name in CHECKPOINTING_FLAGS:
        merged.pop(name, None)
    merged[flag] = plan.gradient_checkpointing
    merged[kwargs_name] = user_kwargs[0] if user_kwargs else {"use_reentrant": False}
    merged["torch_compile"] = plan.torch_compile
    merged.update(tracking_arguments(recipe))
    return merged


# Local trackers, in the order `report_to: auto` tries them; wandb is never picked for the user (it is remote).
LOCAL_TRACKERS = ("tensorboard", "trackio")


def tracker_installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def resolve_report_to(choice: str, installed: Callable[[str], bool] = tracker_installed) -> str:
    """`auto` becomes the first local tracker that is installed, else none; an explicit choice must be installed."""
    if choice == "auto":
        return next((name for name in LOCAL_TRACKERS if installed(name)), "none")
    if choice != "none" and not installed(choice):
        raise AlignError(f"report_to {choice}: the {choice} package is not installed (pip install {choice})")
    return choice


def tracking_arguments(recipe: TrainRecipe) -> dict[str, Any]:
    """Trainer arguments for the experiment tracker: report_to resolved, and a project and run name.

    TensorBoard writes event files under the output dir (`runs/<time>_<host>/`, moved with it at commit); trackio
    keeps its local store (a Space only when train.trackio_space_id is set). Both stay offline. The run is named
    after the output dir unless train.run_name says otherwise; `align run` names the project after its run dir.
    """
    asked = recipe.train.get("report_to", recipe.report_to)  # TRL's own field name wins when a recipe uses it
    choice = [resolve_report_to(str(c)) for c in asked] if isinstance(asked, list) else resolve_report_to(str(asked))
    arguments: dict[str, Any] = {
        "report_to": choice,
        "run_name": recipe.train.get("run_name") or Path(recipe.output or "run").name,
        "project": recipe.train.get("project") or "alignmerge",
    }
    if choice == "wandb":
        # transformers' WandbCallback reads the project from the environment only
        os.environ.setdefault("WANDB_PROJECT", arguments["project"])
    return arguments


CHECKPOINTING_FLAGS = ("activation_checkpointing", "gradient_checkpointing")
CHECKPOINTING_KWARGS = ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")


def checkpointing_argument_names() -> tuple[str, str]:
    """(flag, kwargs) as the installed `TrainingArguments` spells them. transformers 5.23 renamed
    `gradient_checkpointing` to `activation_checkpointing` (keeping the old name as a deprecated alias); 5.17 knows
    only the old name and refuses the new one. Read from the dataclass fields, so a backport or a removal of the
    alias is followed without a version table."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    if "activation_checkpointing" in names:
        return "activation_checkpointing", "activation_checkpointing_kwargs"
    return "gradient_checkpointing", "gradient_checkpointing_kwargs"


def estimated_steps(train: dict[str, Any], rows: int) -> int:
    """Optimizer steps the run will take: max_steps, else epochs over the data."""
    settings = with_defaults(train)
    if settings["max_steps"] > 0:
        return int(settings["max_steps"])
    batch = int(settings["per_device_train_batch_size"]) * int(settings["gradient_accumulation_steps"])
    return math.ceil(rows / max(batch, 1)) * int(math.ceil(float(settings["num_train_epochs"])))


def quiet_trainer(trainer: Any) -> Any:
    """Drop the Trainer's PrinterCallback (it prints every log dict to stdout when tqdm is off); our bar shows them."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


# ---- progress ----------------------------------------------------------------------------------------------------


def progress_callback(total_steps: int, enabled: bool = True) -> Any:
    """A tqdm bar showing loss and non-padding tokens/s, updated from the trainer's own logs."""
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.start = 0.0
            self.tokens_at_start = 0

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if not enabled or not state.is_world_process_zero:
                return
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps or total_steps, initial=state.global_step, desc="train",
                            unit="step", dynamic_ncols=True, file=sys.stderr)
            self.start = time.perf_counter()
            self.tokens_at_start = int(state.num_input_tokens_seen or 0)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if self.bar is None or not logs:
                return
            shown = {}
            if "loss" in logs:
                shown["loss"] = f"{logs['loss']:.4f}"
            elapsed = time.perf_counter() - self.start
            tokens = int(state.num_input_tokens_seen or 0) - self.tokens_at_start
            if elapsed > 0 and tokens > 0:
                shown["tok/s"] = f"{tokens / elapsed:.0f}"
            if "rewards/margins" in logs:
                shown["margin"] = f"{logs['rewards/margins']:.3f}"
            if shown:
                self.bar.set_postfix(shown, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.close_bar()

        def close_bar(self) -> None:
            """Also called by `train` when training raises, so the error starts on a line of its own."""
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ProgressBar()


# ---- checkpoints and resume -------------------------------------------------------------------------------------


# trainer_state.json is written last by the Trainer; optimizer/scheduler are required too because a kill during
# checkpoint rotation (rmtree of an old checkpoint) can leave a state file beside missing optimizer files.
CHECKPOINT_MARKERS = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def complete_checkpoints(workdir: Path) -> list[Path]:
    """Checkpoints that finished saving, oldest first. The Trainer writes trainer_state.json after the weights and
    optimizer, so a checkpoint killed mid-save lacks it (or its weights) and is skipped."""
    found = []
    for path in workdir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if not suffix.isdigit() or not path.is_dir():
            continue
        weights = list(path.glob("adapter_model.safetensors")) + list(path.glob("model*.safetensors"))
        if all((path / m).is_file() for m in CHECKPOINT_MARKERS) and weights and _state_readable(path):
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def _state_readable(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def finished_run(recipe: TrainRecipe) -> Path | None:
    """The output dir when `--resume` names one that already holds a finished run (its run.json is written last), so
    there is nothing to resume: the caller returns it without training. Without this a scheduler that resubmits a
    finished job retrained from step 0 and replaced the run. `--overwrite` still means train again."""
    import logging

    from align.core.artifacts import is_complete

    if not recipe.resume or recipe.overwrite or not recipe.output or not is_complete(Path(recipe.output)):
        return None
    logging.getLogger(__name__).warning("%s already holds a finished run (run.json): nothing to resume, not training "
                                        "(pass --overwrite to train again)", recipe.output)
    return Path(recipe.output)


def resume_checkpoint(workdir: Path, resume: bool, delete_broken: bool = True) -> str | None:
    """The last complete checkpoint to resume from. Half-written ones are removed (by the writing process only),
    so the previous checkpoint wins and the Trainer's rotation does not count them."""
    if not resume:
        return None
    checkpoints = complete_checkpoints(workdir)
    for broken in set(workdir.glob("checkpoint-*")) - set(checkpoints):
        if delete_broken:
            shutil.rmtree(broken, ignore_errors=True)
    return str(checkpoints[-1]) if checkpoints else None


@dataclass
class TrainingRun:
    """What a training command holds while it runs: its output dir, the signal guard, the non-finite guard, whether
    this process writes, the checkpoint it resumes from (and how its config compares), and the callbacks that carry
    all of it into the Trainer."""

    handle: OutputDir
    stop: Any
    guard: FiniteGuard
    writer: bool
    checkpoint: str | None
    resume: dict[str, Any] | None
    """run.json's `resume`: the checkpoint, and under --force the keys that differ and both configs."""
    config: dict[str, Any]

    def callbacks(self) -> list[Any]:
        return [self.stop.callback(), self.guard.callback(), run_config_callback(self.config)]

    def raise_if_stopped(self, step: int) -> None:
        """After `train()`: a diverged run (no adapter; its last finite checkpoint stays) or a signal (a checkpoint
        to resume from) ends the command here."""
        finite = complete_checkpoints(self.handle.path)
        self.guard.raise_if_diverged(str(finite[-1]) if finite else None)
        self.stop.raise_if_stopped(step, str(self.handle.path))


@contextlib.contextmanager
def training_run(recipe: TrainRecipe, out: Path, config: dict[str, Any]) -> Iterator[TrainingRun]:
    """The output dir (locked; kept after a crash once it holds a checkpoint), SIGINT/SIGTERM turned into a clean
    stop, and the last complete checkpoint when resuming, refused when it was trained under another `config`
    (`run_config`) unless --force. Only the main process of a distributed run writes."""
    from align.core.artifacts import output_dir
    from align.core.runtime import GracefulStop, is_main_process

    writer = is_main_process()
    stop = GracefulStop()
    with output_dir(out, recipe.overwrite, recipe.resume, keep_on_error=True, writer=writer) as handle, \
            stop.installed():
        checkpoint = resume_checkpoint(handle.path, recipe.resume, delete_broken=writer)
        resume = check_resume(checkpoint, config, recipe.force)
        yield TrainingRun(handle, stop, FiniteGuard(), writer, checkpoint, resume, config)


# ---- what a resumed run must share with its checkpoint ----------------------------------------------------------


# Trainer arguments that cannot change what a run computes, so a resumed run may change them: where and how often
# it logs, evaluates, saves and reports, how the data is fed in, and recomputation (the same math, less memory).
RESUME_FREE = frozenset({
    "output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter",
    "save_steps", "save_strategy", "save_total_limit", "save_only_model", "eval_steps", "eval_strategy",
    "per_device_eval_batch_size", "eval_accumulation_steps", "report_to", "run_name", "project", "trackio_space_id",
    "disable_tqdm", "include_num_input_tokens_seen", "dataloader_num_workers", "dataloader_pin_memory",
    "ddp_find_unused_parameters", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "torch_compile",
    *CHECKPOINTING_FLAGS, *CHECKPOINTING_KWARGS,
})
# Recipe fields that steer the command rather than the training, and paths whose content the fingerprints stand for
# (a model or data file moved elsewhere is the same run).
RESUME_FREE_FIELDS = ("output", "resume", "overwrite", "force", "report_to", "train", "adapter", "model.name",
                      "data.path", "data.eval_path", "data.mixture")
RUN_CONFIG_CALLBACK = "RunConfig"


def run_config(recipe: TrainRecipe, resolved: ResolvedModel, trainer_args: dict[str, Any],
               data: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides what a run computes, as flat keys (`lora.r`, `train.learning_rate`,
    `data.fingerprint`): the recipe, the trainer arguments as resolved for the machine (batch layout, precision),
    and fingerprints of the model (an SFT adapter included) and the data. Each checkpoint stores it; `--resume`
    compares."""
    fields = {key: value for key, value in flatten(recipe_dict(recipe)).items()
              if not any(key == free or key.startswith(free + ".") for free in RESUME_FREE_FIELDS)}
    config = {**fields, "model.fingerprint": resolved.fingerprint, "data.fingerprint": data.get("fingerprint"),
              "data.eval_fingerprint": data.get("eval_fingerprint"),
              **{f"train.{key}": value for key, value in trainer_args.items() if key not in RESUME_FREE}}
    return json.loads(json.dumps(config, sort_keys=True, default=str))  # as it reads back from the checkpoint


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_config_callback(config: dict[str, Any]) -> Any:
    """Stores `config` in every checkpoint's trainer_state.json (the Trainer's `ExportableState`), so it is written
    with the file that marks the checkpoint complete. It sits beside the `args` and `attributes` the Trainer would
    restore (with train.restore_callback_states_from_checkpoint), so a resumed run always stores its own."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class RunConfig(TrainerCallback, ExportableState):
        def state(self) -> dict[str, Any]:
            return {"args": {}, "attributes": {}, "config": config}

    assert RunConfig.__name__ == RUN_CONFIG_CALLBACK
    return RunConfig()


def checkpoint_config(checkpoint: Path) -> dict[str, Any] | None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())  # complete_checkpoints checked it reads
    stored = (state.get("stateful_callbacks") or {}).get(RUN_CONFIG_CALLBACK)
    return stored.get("config") if isinstance(stored, dict) else None


def check_resume(checkpoint: str | None, config: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """Resume only what was trained under the same config: otherwise the first steps follow one recipe and the rest
    another, while run.json records only the second. --force continues anyway and run.json keeps both."""
    if checkpoint is None:
        return None
    stored = checkpoint_config(Path(checkpoint))
    if stored is None:
        if not force:
            raise AlignError(f"--resume: {checkpoint} does not record the settings it was trained with, so resuming "
                             "cannot be checked (pass --force to resume it anyway)")
        differs = ["(not recorded)"]
    else:
        differs = sorted(k for k in set(config) | set(stored) if config.get(k) != stored.get(k))
        if differs and not force:
            shown = ", ".join(_difference(key, stored.get(key), config.get(key)) for key in differs)
            raise AlignError(f"--resume: {checkpoint} was trained with other settings: {shown}; resume with the "
                             "settings it was trained with, or pass --force to continue under the new ones")
    record: dict[str, Any] = {"checkpoint": checkpoint, "forced": bool(differs), "differs": differs}
    if differs:
        record.update(checkpoint_config=stored, config=config)
    return record


def _difference(key: str, old: Any, new: Any) -> str:
    values = f"{json.dumps(old)} -> {json.dumps(new)}"
    return f"{key} ({values})" if len(values) <= 60 else key


def evaluate_at_saves(args: dict[str, Any], has_eval: bool, train: dict[str, Any]) -> None:
    """With eval data and no eval schedule of the user's, compute eval loss whenever a checkpoint is saved."""
    if has_eval and "eval_strategy" not in train:
        args.update(eval_strategy="steps", eval_steps=args.get("save_steps", 100))


def train(trainer: Any, checkpoint: str | None, workdir: Path) -> Any:
    """`trainer.train`, with a full disk or a denied write (the Trainer saves checkpoints as it goes, safetensors
    reports it as `os error 28`) turned into one line naming the dir; the previous output, if any, is untouched
    because it is only replaced at commit."""
    try:
        return trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError:
        raise AlignError(out_of_memory_message(trainer)) from None
    except Exception as exc:
        raise_write_error(exc, workdir)
        raise
    finally:
        for callback in trainer.callback_handler.callbacks:
            if hasattr(callback, "close_bar"):  # the progress bar
                callback.close_bar()


def out_of_memory_message(trainer: Any) -> str:
    """One line for a GPU out of memory, with the memory planner's cheapest change for the run that failed (the
    first of `estimate.candidate_changes`, the same order `align estimate --budget` suggests them in)."""
    from align.train.estimate import TrainSetup, candidate_changes

    args = trainer.args
    model = trainer.model
    quantize = ("4bit" if getattr(model, "is_loaded_in_4bit", False)
                else "8bit" if getattr(model, "is_loaded_in_8bit", False) else None)
    flag, _ = checkpointing_argument_names()
    setup = TrainSetup(device="cuda", batch_size=int(args.per_device_train_batch_size),
                       grad_accum=int(args.gradient_accumulation_steps), optim=str(getattr(args.optim, "value", args.optim)),
                       gradient_checkpointing=bool(getattr(args, flag, False)), quantize=quantize)
    changes = candidate_changes(setup)
    fix = f"; try {changes[0][0]}" if changes else ""
    return (f"CUDA out of memory at step {trainer.state.global_step} (batch {setup.batch_size}, "
            f"{'with' if setup.gradient_checkpointing else 'no'} gradient checkpointing){fix} "
            "(`--dry-run` prints the plan)")


# ---- finishing a run ---------------------------------------------------------------------------------------------


def log_series(history: list[dict[str, Any]], *keys: str) -> dict[str, list[tuple[float, float]]]:
    return {key: [(h["step"], h[key]) for h in history if key in h and "step" in h] for key in keys}


def save_adapter(model: Any, tokenizer: Any, path: Path) -> None:
    """The trained adapter alone (safetensors) plus the tokenizer, loadable with AutoPeftModelForCausalLM."""
    unwrapped = model
    while hasattr(unwrapped, "module") and not hasattr(unwrapped, "peft_config"):
        unwrapped = unwrapped.module
    if hasattr(unwrapped, "_orig_mod"):
        unwrapped = unwrapped._orig_mod
    try:
        unwrapped.save_pretrained(str(path), selected_adapters=["default"], safe_serialization=True)
        tokenizer.save_pretrained(str(path))
    except Exception as exc:
        cause = os_error_in(exc)
        if cause is None:
            raise
        raise AlignError(f"cannot save the adapter to {path}: {cause.strerror or cause}") from None


def write_model_card(path: Path, stage: str, recipe: TrainRecipe, resolved: ResolvedModel, metrics: dict[str, Any],
                     loader: str = "AutoPeftModelForCausalLM", load_arguments: str = "") -> None:
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {resolved.base if resolved.kind in ('hub',) else resolved.spec}",
        f"tags: [alignmerge, {stage}, lora, trl]",
        "---",
        "",
        f"# {stage.upper()} LoRA adapter",
        "",
        f"Trained with alignmerge `align {stage}` on `{recipe.data.path}` from `{resolved.spec}`.",
        "",
        "```python",
        f"from peft import {loader}",
        "from transformers import AutoTokenizer",
        f'model = {loader}.from_pretrained("{path.name}"{load_arguments})',
        f'tokenizer = AutoTokenizer.from_pretrained("{path.name}")',
        "```",
        "",
        f"LoRA: r={recipe.lora.r}, alpha={recipe.lora.lora_alpha}, dropout={recipe.lora.dropout}, "
        f"targets={recipe.lora.target_modules or 'none'}"
        + (f", trained whole: {','.join(recipe.lora.modules_to_save)}." if recipe.lora.modules_to_save else "."),
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
        "",
        "`run.json` beside this file holds the resolved recipe, versions, data fingerprint and per-step logs.",
    ]
    (path / "README.md").write_text("\n".join(lines) + "\n")


def run_record(
    stage: str,
    recipe: TrainRecipe,
    resolved: ResolvedModel,
    plan: MachinePlan,
    trainer_args: dict[str, Any],
    data: dict[str, Any],
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    timings: dict[str, float],
    model: Any,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """run.json: everything needed to know what was run, on what, and how it went."""
    return {
        "stage": stage,
        "recipe": recipe_dict(recipe),
        "model": resolved.describe(),
        "adapter": trained_adapter(model),
        "machine_plan": plan.describe(),
        "trainer_args": {k: v for k, v in trainer_args.items() if k != "output_dir"},
        "data": data,
        "parameters": model_summary(model),
        "log_history": history,
        "metrics": metrics,
        **provenance(timings),
        **(extra or {}),
    }


def trained_adapter(model: Any) -> dict[str, Any]:
    """The shape of the adapter that was trained (the model's own "default" LoRA config), for run.json."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return {}
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": module_names(config.target_modules),
            "modules_to_save": sorted(config.modules_to_save or []),
            "use_rslora": config.use_rslora, "use_dora": config.use_dora,
            "trained_parameters": trained_parameters(model)}


def trained_parameters(model: Any) -> dict[str, int]:
    """Trainable parameters by kind: LoRA matrices, and the whole modules trained beside them (modules_to_save)."""
    counts = {"lora": 0, "modules_to_save": 0, "other": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            kind = "modules_to_save" if ".modules_to_save." in name else "lora" if ".lora_" in name else "other"
            counts[kind] += param.numel()
    return counts


def finish_training(
    handle: OutputDir,
    stage: str,
    trainer: Any,
    tokenizer: Any,
    recipe: TrainRecipe,
    resolved: ResolvedModel,
    record: dict[str, Any],
    plots: dict[str, dict[str, list[tuple[float, float]]]],
    loader: str = "AutoPeftModelForCausalLM",
    load_arguments: str = "",
) -> Path:
    """Save adapter, tokenizer, plots and model card, then run.json last, and move the dir into place.
    Only the main process writes; the others return the same path. `loader` and `load_arguments`: how the card
    loads the adapter (a PEFT auto class, and what follows the path in its call)."""
    if not handle.writer:
        return handle.commit("run.json", record)
    save_adapter(trainer.model, tokenizer, handle.path)
    for name, series in plots.items():
        plot_series(handle.path / name, series, f"{stage}: {name.removesuffix('.png')}")
    write_model_card(handle.path, stage, recipe, resolved, record["metrics"], loader,
                     load_arguments)
    return handle.commit("run.json", record)


def final_metrics(history: list[dict[str, Any]], train_output: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = dict(train_output.metrics) if train_output is not None else {}
    losses = [h["loss"] for h in history if "loss" in h]
    if losses:
        metrics["first_loss"] = losses[0]
        metrics["last_loss"] = losses[-1]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if evals:
        metrics["eval_loss"] = evals[-1]
    return metrics
