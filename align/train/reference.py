"""What the methods with a reference share (`align dpo`, `align kto`): which reference a run trains against, how it
is made (one base model in memory), and the step-0 check that proves it.

Where the reference comes from (`--ref`, recorded in run.json under "reference" with the reason):
- auto (the default): precompute where the data allows it, else adapter (base without an SFT adapter); see
  `choose_reference`.
- adapter: the policy is a trainable copy of the SFT adapter ("default"); the reference is a frozen copy ("ref") on
  the same base. TRL 1.16 makes that copy itself when it gets a PeftModel and no ref_model, and runs its reference
  forward under `use_adapter(model, "ref")`.
- base: a fresh LoRA, handed to TRL as `peft_config`, so its reference forward runs with adapters disabled.
- precompute: `precompute_ref_log_probs=True`: TRL scores the data once with the reference before training (the SFT
  adapter when there is one, else the base), so training runs no reference forward.
- model:PATH: a separate reference model (a second copy of the weights; the memory-hungry baseline).

A wrong reference does not crash DPO, it trains toward the wrong target, so it is checked: before the first update
the loss and rewards on the first batch must be those of a policy equal to its reference (ln 2 and 0 for sigmoid).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from align.core.config import ReferenceRecipe, with_defaults
from align.core.errors import AlignError
from align.core.models import LoadOptions, ResolvedModel, load_model, resolve_model
from align.core.reference import ReferenceMode, parse_reference
from align.train.preference import resolve_policy

# The step-0 check compares against exact values. Policy and reference run the same weights through the same
# kernels, so in the adapter and base modes they agree bit for bit, in every dtype; precompute is checked on the batch
# the reference was precomputed on (same shapes, same kernels: see `precompute_batch`), so it agrees bit for bit too;
# model:PATH runs a second copy of the weights (an adapter stays unmerged), ~1e-5 nats apart at most in fp32. A wrong
# reference moves summed log-probs by whole nats (the SFT adapter's effect on a completion), i.e. rewards of ~beta
# nats. 1e-4 sits orders of magnitude from both, and no dtype needs its own tolerance (tests/test_dpo_precision.py).
STEP0_TOLERANCE = 1e-4



# ---- reference plan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferencePlan:
    """Which reference the run uses; `describe()` is run.json's "reference"."""

    mode: ReferenceMode
    adapter: Path | None
    """The SFT adapter: the policy's starting point, and the reference in adapter (and precompute) mode."""
    model: str | None = None
    """The `model:PATH` spec."""
    requested: str = "auto"
    """What `--ref` asked for; `auto` is resolved into `mode` by `choose_reference`."""
    reason: str = "requested"

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "adapter": str(self.adapter) if self.adapter else None, "model": self.model,
                "requested": self.requested, "reason": self.reason}



def plan_reference(recipe: ReferenceRecipe) -> tuple[ResolvedModel, ReferencePlan]:
    """The policy's model (base, plus the SFT adapter when given) and the reference; refuses combinations whose
    reference would not equal the starting policy."""
    policy = resolve_policy(recipe)
    requested, model = parse_reference(recipe.ref or "auto")
    # auto starts from the reference that always works and becomes precompute in `choose_reference` once the data is
    # known; the checks below hold for both (precompute scores with the same reference).
    mode = ("adapter" if policy.adapter else "base") if requested == "auto" else requested
    if mode == "adapter" and policy.adapter is None:
        raise AlignError("--ref adapter needs the SFT adapter: pass --adapter SFT_DIR (or --ref base for a fresh LoRA "
                         "against the base model)")
    if mode == "base" and policy.adapter is not None:
        raise AlignError("--ref base with an SFT adapter: the reference would be the base model while the policy starts "
                         "from the SFT adapter, so training would pull toward the wrong target; use --ref adapter")
    if policy.adapter is None and mode in ("base", "precompute") and recipe.lora.init in ("pissa", "loftq"):
        raise AlignError(f"lora.init={recipe.lora.init} rewrites the base weights, so the base with adapters disabled "
                         "is not the starting policy; use lora.init default or gaussian")
    return policy, ReferencePlan(mode, policy.adapter, model, requested)



def choose_reference(reference: ReferencePlan, train: dict[str, Any], pairs: int,
                     unit: str = "pairs") -> ReferencePlan:
    """`--ref auto` once the data is known: precompute where the reference's log-probs, computed once, stay valid
    for the whole run and cost less than computing them in every step; else the adapter (the base without one).

    Precompute is valid here because `align dpo` trains on a fixed list of pairs (no generation during training)
    through the same collator TRL precomputes with, and the reference is frozen, unless `sync_ref_model` moves it.
    It costs one reference forward per pair, the adapter mode one per pair read; a run that stops before reading
    every pair once (max_steps) would precompute more than it saves. `unit` names the rows in the reason (KTO's are
    labelled examples)."""
    if reference.requested != "auto":
        return reference
    fallback = f"{reference.mode} (the frozen {'SFT adapter' if reference.mode == 'adapter' else 'base'})"
    if train.get("sync_ref_model"):
        return replace(reference, reason=f"{fallback}: sync_ref_model moves the reference during training, so "
                                         "log-probs computed once would go stale")
    read = rows_read(train, pairs)
    if read < pairs:
        return replace(reference, reason=f"{fallback}: the run reads {read} of {pairs} {unit}, and precomputing "
                                         f"would score all {pairs}, more reference forwards than the {read} it needs")
    return replace(reference, mode="precompute",
                   reason=f"precompute: a fixed dataset ({pairs} {unit}, {read} read in training) and a frozen "
                          "reference, so its log-probs are computed once before training instead of in every step")



def rows_read(train: dict[str, Any], rows: int) -> int:
    """Rows (pairs, labelled examples) the run's optimizer steps read: max_steps x effective batch x processes,
    else every row per epoch."""
    import os

    settings = with_defaults(train)
    epochs = math.ceil(float(settings["num_train_epochs"]))
    steps = int(settings["max_steps"])
    if steps <= 0:
        return rows * epochs
    batch = int(settings["per_device_train_batch_size"]) * int(settings["gradient_accumulation_steps"])
    return steps * batch * int(os.environ.get("WORLD_SIZE", "1"))



# ---- models ------------------------------------------------------------------------------------------------------


def load_reference_model(spec: str, recipe: ReferenceRecipe, tokenizer: Any, policy_model: Any) -> Any:
    """The `model:PATH` reference: a model dir, .gguf or adapter dir, frozen.

    An adapter stays unmerged, injected into the modules of its own copy of the base, and TRL gets that inner
    transformers model: TRL patches a plain model's forward with its fused log-prob head (not a PeftModel's), and an
    unmerged adapter computes exactly what the policy computes at step 0, where merged weights round differently
    (under bf16 autocast by more than the step-0 tolerance).
    """
    resolved = resolve_model(spec)
    options = LoadOptions(recipe.model.dtype, recipe.model.attn, recipe.model.quantize)
    model = load_model(resolved, options, tokenizer, adapter="load")
    if resolved.adapter is not None:
        model = model.get_base_model()
    if model.get_input_embeddings().weight.shape[0] != policy_model.get_input_embeddings().weight.shape[0]:
        raise AlignError(f"--ref model:{spec}: its vocabulary ({model.get_input_embeddings().weight.shape[0]} tokens) "
                         f"differs from the policy's ({policy_model.get_input_embeddings().weight.shape[0]})")
    model.eval()
    model.requires_grad_(False)
    return model



def prepare_reference(trainer: Any, reference: ReferencePlan) -> None:
    """Make sure the reference TRL set up is the one the plan names: in adapter (and precompute-with-adapter) mode,
    a frozen "ref" adapter holding exactly the SFT adapter's saved weights."""
    from peft import get_peft_model_state_dict

    model = trainer.model
    if reference.mode not in ("adapter", "precompute") or reference.adapter is None:
        return
    if "ref" not in getattr(model, "peft_config", {}):
        raise AlignError(f"--ref {reference.mode}: TRL did not create the frozen reference adapter")
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    for name, param in model.named_parameters():
        if ".ref." in name:
            param.requires_grad_(False)
            if quantized:  # TRL casts the trainable adapter to bf16 after copying it into "ref": round "ref" alike
                param.data = param.data.to(model.get_parameter(name.replace(".ref.", ".default.")).dtype)
    saved = saved_adapter_weights(reference)
    current = get_peft_model_state_dict(model, adapter_name="ref")
    for key, tensor in saved.items():
        if key not in current or not torch.equal(current[key].cpu(), tensor.to(current[key].dtype)):
            raise AlignError(f"--ref {reference.mode}: the frozen reference adapter does not hold the weights saved in "
                             f"{reference.adapter} (first difference: {key})")



def saved_adapter_weights(reference: ReferencePlan) -> dict[str, torch.Tensor]:
    """The SFT adapter's weights as saved (safetensors, or PEFT's older adapter_model.bin), read by PEFT's own loader.
    No saved weights is an error: the reference could then not be checked at all."""
    from peft.utils import load_peft_weights

    adapter = reference.adapter
    assert adapter is not None
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise AlignError(f"--ref {reference.mode}: {adapter} has no adapter_model.safetensors (or .bin), so the "
                         "frozen reference cannot be checked against the SFT adapter's weights")
    return load_peft_weights(str(adapter), device="cpu")



def reference_arguments(reference: ReferencePlan, trainer_args: dict[str, Any]) -> dict[str, Any]:
    """The trainer arguments (`trainer_arguments`: our machine defaults and the recipe's train settings) with the
    reference mode's switch."""
    args = dict(trainer_args)
    if reference.mode == "precompute":
        args["precompute_ref_log_probs"] = True
    elif args.get("precompute_ref_log_probs"):
        raise AlignError("train.precompute_ref_log_probs: choose it with --ref precompute, so run.json records it")
    return args



@contextlib.contextmanager
def library_bars_as_transformers() -> Iterator[None]:
    """TRL's reference precompute draws a tqdm bar that only the TQDM_DISABLE variable turns off; while the
    trainer is built (when it precomputes), follow transformers' progress-bar switch, which the CLI turns off with
    the other libraries' chatter, so an error after it is still one line."""
    import os

    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled():
        yield
        return
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = previous



# ---- the step-0 reference check ----------------------------------------------------------------------------------


def precompute_batch(trainer: Any) -> dict[str, Any]:
    """The rows this process's first reference batch held when TRL precomputed the log-probs, collated the same
    way, so the policy's step-0 forward has the very shapes (padding, batch size) the reference forward had.

    Why not the first training batch: bf16 (and fp16) matmuls round differently for other shapes, and the shuffled
    training batch puts each row beside other rows with other padding than the sequential precompute did. On long
    multi-turn rows that rounding alone moved the summed log-probs by ~0.02 nats in bf16 (issue 12: margin -0.002 at
    beta 0.1), enough to fail a check that must also catch a wrong reference. With the same batch the comparison no
    longer depends on the training batch's composition, in any dtype, so the tolerance stays the same for all.
    TRL precomputes in order (shuffle=False) in batches of `precompute_ref_batch_size` (else the training batch
    size), each process taking every n-th batch, so process k's first batch is rows [k*B, (k+1)*B)."""
    dataset = trainer.train_dataset
    size = int(trainer.args.precompute_ref_batch_size or trainer.args.per_device_train_batch_size)
    start = trainer.accelerator.process_index * size
    start = start if start < len(dataset) else 0
    rows = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
    return trainer.data_collator(rows)



@dataclass(frozen=True)
class Step0Rule:
    """What a method's step-0 check expects with the policy equal to its reference: every logged reward (and KTO's
    KL estimate) zero, and the loss `expected(trainer, batch)` where it is a constant (None: rewards alone)."""

    method: str
    """The method's name: `<name>_config.py` / `<name>_trainer.py` are where TRL checks its settings."""
    expected: Callable[[Any, dict[str, Any]], float | None]
    rows: Callable[[dict[str, Any]], tuple[str, int]]
    """What the batch holds, for the record: ("pairs", n) or ("examples", n)."""


STEP0_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl")


def check_reference_at_step0(trainer: Any, mode: str, rule: Step0Rule,
                             tolerance: float = STEP0_TOLERANCE) -> dict[str, Any]:
    """The loss and rewards on the first training batch (in precompute mode: the first batch the reference was
    precomputed on, see `precompute_batch`), through TRL's own loss code, before any update.

    Dropout is off (eval mode) so policy and reference are deterministic; the RNG is restored so the check does not
    change the data order. Raises AlignError naming the reference mode when the policy is not its reference.
    """
    model = trainer.model
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        batch = trainer._prepare_inputs(precompute_batch(trainer) if mode == "precompute"
                                        else next(iter(trainer.get_train_dataloader())))
    model.eval()
    try:
        with torch.no_grad(), trainer.accelerator.autocast():
            loss = float(trainer.compute_loss(model, batch))
    except (ValueError, NotImplementedError) as exc:  # TRL checks loss types only when it first computes the loss
        raise_settings_error(exc, rule.method)
        raise
    finally:
        model.train(was_training)
    logged = trainer._metrics["eval"]  # TRL files metrics under "eval" when the model is not training
    measured = {key: float(logged[key][-1]) for key in STEP0_METRICS if logged.get(key)}
    logged.clear()
    expected = rule.expected(trainer, batch)
    deviation = max([abs(v) for v in measured.values()] + ([abs(loss - expected)] if expected is not None else []))
    unit, rows = rule.rows(batch)
    result = {"passed": deviation <= tolerance, "loss": loss, "expected_loss": expected, **measured,
              "max_deviation": deviation, "tolerance": tolerance, unit: rows}
    if not result["passed"]:
        want = f"loss {expected:.4f} and " if expected is not None else ""
        got = ", ".join(f"{key} {value:.6f}" for key, value in measured.items())
        raise AlignError(
            f"step-0 reference check failed for --ref {mode}: with the policy equal to its reference, "
            f"{rule.method.upper()} must give {want}zero rewards, got loss {loss:.6f}, {got}; the reference is not "
            "the model the policy starts from"
        )
    return result



def raise_settings_error(exc: BaseException, method: str) -> None:
    """A ValueError that one of TRL's own settings checks for `method` raised (a `raise` statement in its config's
    `__post_init__`, its trainer's `__init__` or its loss) becomes `<METHOD> settings: <TRL's message>`; anything
    else (a data or tensor error, which surfaces through the same calls) is left as it is, so it is reported as
    what it is."""
    import linecache

    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return
    code = tb.tb_frame.f_code
    raised_here = linecache.getline(code.co_filename, tb.tb_lineno).lstrip().startswith("raise ")
    checks = {(f"{method}_config.py", "__post_init__"), (f"{method}_trainer.py", "__init__"),
              (f"{method}_trainer.py", "_compute_loss")}
    if raised_here and (Path(code.co_filename).name, code.co_name) in checks:
        raise AlignError(f"{method.upper()} settings: {str(exc).splitlines()[0]}") from None


def build_trainer(trainer_class: type, method: str, recipe: ReferenceRecipe, policy: ResolvedModel,
                  reference: ReferencePlan, tokenizer: Any, config: Any, data: Any, gradient_checkpointing: bool,
                  callbacks: list[Any], **extra: Any) -> Any:
    """A TRL trainer of a method with a reference: the policy (the SFT adapter, or a fresh LoRA TRL makes), the
    `model:PATH` reference when asked, the rows numbered for the truncation count, TRL's own settings errors named
    as the method's, and the reference TRL made checked against the plan (`prepare_reference`)."""
    from align.train.preference import load_policy
    from align.train.truncation import numbered

    model, peft_config = load_policy(policy, recipe, tokenizer, gradient_checkpointing, int(config.seed))
    ref_model = load_reference_model(reference.model, recipe, tokenizer, model) if reference.model else None
    try:
        with library_bars_as_transformers():  # precompute's pass over the data runs inside
            trainer = trainer_class(
                model=model, ref_model=ref_model, args=config, processing_class=tokenizer, peft_config=peft_config,
                train_dataset=numbered(data.train), eval_dataset=numbered(data.eval) if data.eval else None,
                callbacks=callbacks, **extra,
            )
    except (ValueError, NotImplementedError) as exc:
        raise_settings_error(exc, method)
        raise
    prepare_reference(trainer, reference)
    return trainer
