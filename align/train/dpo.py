"""`align dpo`: preference alignment of a LoRA adapter with TRL's DPOTrainer, one base model in memory.

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

Stages, in data-flow order: validate inputs -> load data -> load models -> build trainer -> check reference -> train
-> save. Every input check happens before the output dir is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from align.core.artifacts import Timer, partial_dir
from align.core.config import DPORecipe, MixtureSource, PreferenceDataSpec, PreferenceRecipe, with_defaults
from align.core.data import Rows, fingerprint_rows, hold_out
from align.core.errors import AlignError
from align.core.mixture import Mixture, mix_sources
from align.core.models import LoadOptions, ResolvedModel, load_model, load_tokenizer, resolve_model
from align.core.preferences import PreferenceData, load_preference_data, normalize_preference_rows
from align.core.reference import ReferenceMode, parse_reference
from align.train.training import (
    attach_lora, check_run_inputs, continued_lora, finished_run, estimated_steps, final_metrics, finish_training,
    log_series, lora_config, evaluate_at_saves, plan_machine, prepare_quantized, progress_callback, quiet_trainer,
    run_config, run_record, train, trainer_arguments, training_run,
)
from align.train.truncation import (
    check_eval_kept, check_prompts_fit, check_truncation, dpo_truncation, numbered, prompt_lengths,
)

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


def resolve_policy(recipe: PreferenceRecipe) -> ResolvedModel:
    """The policy's starting point: the base, plus the SFT adapter when given (`--adapter`, or an adapter dir as
    `--model`); refuses an adapter trained on another base than `--model`."""
    if recipe.adapter:
        policy = resolve_model(recipe.adapter)
        if policy.adapter is None:
            raise AlignError(f"--adapter {recipe.adapter}: not a PEFT adapter dir (no adapter_config.json)")
        if "name" in recipe.model.model_fields_set:  # left unset, --model means the adapter's own base
            named = resolve_model(recipe.model.name)
            if named.adapter is not None and named.adapter != policy.adapter:
                raise AlignError(f"--model {recipe.model.name} is itself an adapter: pass the base model as --model")
            if named.base != policy.base:
                raise AlignError(f"--adapter {recipe.adapter} was trained on {policy.base}, not on --model "
                                 f"{recipe.model.name}")
    else:
        policy = resolve_model(recipe.model.name)  # an adapter dir as --model counts as the SFT adapter
    return policy


def plan_reference(recipe: DPORecipe) -> tuple[ResolvedModel, ReferencePlan]:
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
                         "from the SFT adapter, so DPO would pull toward the wrong target; use --ref adapter")
    if policy.adapter is None and mode in ("base", "precompute") and recipe.lora.init in ("pissa", "loftq"):
        raise AlignError(f"lora.init={recipe.lora.init} rewrites the base weights, so the base with adapters disabled "
                         "is not the starting policy; use lora.init default or gaussian")
    return policy, ReferencePlan(mode, policy.adapter, model, requested)


def choose_reference(reference: ReferencePlan, train: dict[str, Any], pairs: int) -> ReferencePlan:
    """`--ref auto` once the data is known: precompute where the reference's log-probs, computed once, stay valid
    for the whole run and cost less than computing them in every step; else the adapter (the base without one).

    Precompute is valid here because `align dpo` trains on a fixed list of pairs (no generation during training)
    through the same collator TRL precomputes with, and the reference is frozen, unless `sync_ref_model` moves it.
    It costs one reference forward per pair, the adapter mode one per pair read; a run that stops before reading
    every pair once (max_steps) would precompute more than it saves."""
    if reference.requested != "auto":
        return reference
    fallback = f"{reference.mode} (the frozen {'SFT adapter' if reference.mode == 'adapter' else 'base'})"
    if train.get("sync_ref_model"):
        return replace(reference, reason=f"{fallback}: sync_ref_model moves the reference during training, so "
                                         "log-probs computed once would go stale")
    read = pairs_read(train, pairs)
    if read < pairs:
        return replace(reference, reason=f"{fallback}: the run reads {read} of {pairs} pairs, and precomputing "
                                         f"would score all {pairs}, more reference forwards than the {read} it needs")
    return replace(reference, mode="precompute",
                   reason=f"precompute: a fixed dataset ({pairs} pairs, {read} read in training) and a frozen "
                          "reference, so its log-probs are computed once before training instead of in every step")


def pairs_read(train: dict[str, Any], pairs: int) -> int:
    """Pairs the run's optimizer steps read: max_steps x effective batch x processes, else every pair per epoch."""
    import os

    settings = with_defaults(train)
    epochs = math.ceil(float(settings["num_train_epochs"]))
    steps = int(settings["max_steps"])
    if steps <= 0:
        return pairs * epochs
    batch = int(settings["per_device_train_batch_size"]) * int(settings["gradient_accumulation_steps"])
    return steps * batch * int(os.environ.get("WORLD_SIZE", "1"))


# ---- data --------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceSplits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    record: dict[str, Any]
    locations: list[str]
    """Where each training pair came from (file and line)."""


def prepare_preference_data(recipe: DPORecipe) -> PreferenceSplits:
    spec = recipe.data
    mixture = None
    if spec.mixture:
        mixture, loaded = preference_mixture(spec, recipe.train_seed)
    else:
        loaded = load_preference_data(spec.path, spec.format, spec.split, spec.limit, spec.skip_invalid, spec.pairs,
                                      spec.score_margin, spec.config)
    train, held, locations = loaded.pairs, [], loaded.raw.kept
    if spec.eval_path:
        held = load_preference_data(spec.eval_path, spec.format, spec.eval_split, None, spec.skip_invalid, spec.pairs,
                                    spec.score_margin, spec.eval_config).pairs
    elif spec.eval_size > 0:
        train, held = hold_out(train, spec.eval_size, recipe.train_seed, loaded.raw.source)
        locations, _ = hold_out(locations, spec.eval_size, recipe.train_seed, loaded.raw.source)
    if loaded.raw.skipped:
        import logging

        logging.getLogger(__name__).warning("skipped %d invalid rows (first: %s)", loaded.raw.skipped,
                                            loaded.raw.problems[0])
    record = {
        "source": "data.mixture" if mixture else spec.path,
        "format": loaded.format,
        "rows": len(loaded.raw),
        "pairs": len(train),
        "eval_pairs": len(held),
        "skipped_invalid": loaded.raw.skipped,
        "rows_without_pair": loaded.rows_without_pair,
        "fingerprint": fingerprint_rows(train),
        "eval_fingerprint": fingerprint_rows(held) if held else None,
        "mixture": mixture.sources if mixture else None,
    }
    return PreferenceSplits(train, held, record, locations)


def preference_mixture(spec: PreferenceDataSpec, seed: int) -> tuple[Mixture, PreferenceData]:
    """data.mixture of preference sources: each source's rows sampled with the seed on its own, then turned into
    pairs (a scored row may give several, or none)."""
    without_pair = []

    def normalize(source: MixtureSource, rows: Rows) -> tuple[list[dict[str, Any]], str]:
        loaded = normalize_preference_rows(rows, source.format or spec.format, spec.skip_invalid, spec.pairs,
                                           spec.score_margin)
        without_pair.append(loaded.rows_without_pair)
        return loaded.pairs, loaded.format

    mixture = mix_sources(spec.mixture or [], normalize, seed, spec.limit)
    return mixture, PreferenceData(*mixture.as_loaded(), rows_without_pair=sum(without_pair))


@dataclass
class LengthLimitedCollator:
    """Trims prompts (keeping their end, next to the answer) and completions (keeping their start) before TRL's own
    collator pads them. TRL 1.16 dropped max_prompt_length / max_completion_length; only the total max_length is left."""

    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    max_prompt_length: int | None
    max_completion_length: int | None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompt, completion = self.max_prompt_length, self.max_completion_length
        trimmed = [
            {
                **example,
                "prompt_ids": example["prompt_ids"][-prompt:] if prompt else example["prompt_ids"],
                "chosen_ids": example["chosen_ids"][:completion] if completion else example["chosen_ids"],
                "rejected_ids": example["rejected_ids"][:completion] if completion else example["rejected_ids"],
            }
            for example in examples
        ]
        return self.collate(trimmed)


def preference_collator(recipe: DPORecipe, config: Any, tokenizer: Any) -> LengthLimitedCollator | None:
    """None (TRL builds its own) unless prompt or completion lengths are limited."""
    if recipe.max_prompt_length is None and recipe.max_completion_length is None:
        return None
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    inner = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=config.max_length,
                                      truncation_mode=config.truncation_mode,
                                      pad_to_multiple_of=config.pad_to_multiple_of)
    return LengthLimitedCollator(inner, recipe.max_prompt_length, recipe.max_completion_length)


# ---- models ------------------------------------------------------------------------------------------------------


def load_policy(policy: ResolvedModel, recipe: DPORecipe, tokenizer: Any, gradient_checkpointing: bool,
                seed: int) -> tuple[Any, Any]:
    """(model, peft_config for TRL). With an SFT adapter: a PeftModel whose trainable "default" adapter is the SFT
    adapter (TRL then adds the frozen "ref" copy). Without: the bare base and a fresh LoraConfig, which TRL wraps."""
    options = LoadOptions(recipe.model.dtype, recipe.model.attn, recipe.model.quantize)
    model = load_model(policy, options, tokenizer, adapter="trainable")
    if policy.adapter is not None:
        return attach_lora(model, recipe.lora, gradient_checkpointing, seed), None
    return prepare_quantized(model, gradient_checkpointing), lora_config(recipe.lora)


def load_reference_model(spec: str, recipe: DPORecipe, tokenizer: Any, policy_model: Any) -> Any:
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


# ---- the step-0 reference check ----------------------------------------------------------------------------------


# Each loss type's value when every log-ratio is 0 (the policy equal to its reference), from TRL's own formulas
# (DPOTrainer._compute_loss), as functions of beta and label smoothing (eps). `sft` has none: it is the data's NLL.
# tests/test_dpo.py checks every entry against the loss TRL computes at step 0, and that the table covers every loss
# type the installed DPOConfig lists.
STEP0_LOSS: dict[str, Callable[[float, float], float]] = {
    "sigmoid": lambda beta, eps: math.log(2),
    "sigmoid_norm": lambda beta, eps: math.log(2),
    "robust": lambda beta, eps: math.log(2),  # ((1 - eps) ln 2 - eps ln 2) / (1 - 2 eps)
    "aot": lambda beta, eps: math.log(2),
    "aot_unpaired": lambda beta, eps: math.log(2),
    "hinge": lambda beta, eps: 1.0,
    "ipo": lambda beta, eps: (1 / (2 * beta)) ** 2,
    "exo_pair": lambda beta, eps: -math.log(2) - 0.5 * math.log(eps * (1 - eps)),
    "nca_pair": lambda beta, eps: 2 * math.log(2),
    "bco_pair": lambda beta, eps: 2 * math.log(2),
    "sppo_hard": lambda beta, eps: 2 * (0.5 / beta) ** 2,
    "apo_zero": lambda beta, eps: 1.0,
    "apo_down": lambda beta, eps: 1.0,
    "discopop": lambda beta, eps: 0.5 * (math.log(2) + 1),
}


def step0_loss(loss_types: list[str], loss_weights: list[float] | None, beta: float, label_smoothing: float = 0.0,
               weighted: bool = False) -> float | None:
    """The loss when every log-ratio is 0 (policy = reference), where it is a constant: None for `sft` (the NLL of
    the data) and under WPO weighting (`use_weighting`, which scales each pair by the policy's probabilities)."""
    if weighted or not all(t in STEP0_LOSS for t in loss_types):
        return None
    weights = loss_weights or [1.0] * len(loss_types)
    return sum(STEP0_LOSS[t](beta, label_smoothing) * w for t, w in zip(loss_types, weights))


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


def check_reference_at_step0(trainer: Any, mode: str, tolerance: float = STEP0_TOLERANCE) -> dict[str, Any]:
    """DPO loss and rewards on the first training batch (in precompute mode: the first batch the reference was
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
        raise_settings_error(exc)
        raise
    finally:
        model.train(was_training)
    logged = trainer._metrics["eval"]  # TRL files metrics under "eval" when the model is not training
    measured = {key: float(logged[key][-1]) for key in ("rewards/chosen", "rewards/rejected", "rewards/margins")}
    logged.clear()
    expected = step0_loss(list(trainer.loss_types), trainer.loss_weights, trainer.beta, trainer.label_smoothing,
                          trainer.use_weighting)
    deviation = max([abs(v) for v in measured.values()] + ([abs(loss - expected)] if expected is not None else []))
    result = {"passed": deviation <= tolerance, "loss": loss, "expected_loss": expected, **measured,
              "max_deviation": deviation, "tolerance": tolerance, "pairs": int(batch["input_ids"].shape[0] // 2)}
    if not result["passed"]:
        want = f"loss {expected:.4f} and " if expected is not None else ""
        raise AlignError(
            f"step-0 reference check failed for --ref {mode}: with the policy equal to its reference, DPO must give "
            f"{want}zero rewards, got loss {loss:.6f}, margin {measured['rewards/margins']:.6f} (chosen "
            f"{measured['rewards/chosen']:.6f}, rejected {measured['rewards/rejected']:.6f}); the reference is not "
            "the model the policy starts from"
        )
    return result


# ---- the run -----------------------------------------------------------------------------------------------------


# Where TRL checks DPO settings: DPOConfig's and DPOTrainer's constructors, and the loss computation (loss types).
TRL_SETTINGS_CHECKS = {("dpo_config.py", "__post_init__"), ("dpo_trainer.py", "__init__"),
                       ("dpo_trainer.py", "_compute_loss")}


def raise_settings_error(exc: BaseException) -> None:
    """A ValueError that one of TRL's own settings checks raised (a `raise` statement in one of
    `TRL_SETTINGS_CHECKS`) becomes `DPO settings: <TRL's message>`; anything else (a data or tensor error, which
    surfaces through the same calls) is left as it is, so it is reported as what it is."""
    import linecache

    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return
    code = tb.tb_frame.f_code
    raised_here = linecache.getline(code.co_filename, tb.tb_lineno).lstrip().startswith("raise ")
    if raised_here and (Path(code.co_filename).name, code.co_name) in TRL_SETTINGS_CHECKS:
        raise AlignError(f"DPO settings: {str(exc).splitlines()[0]}") from None


def dpo_config(args: dict[str, Any]) -> Any:
    from trl import DPOConfig

    try:
        return DPOConfig(**args)
    except (TypeError, ValueError) as exc:
        raise AlignError(f"invalid train settings: {str(exc).splitlines()[0]}") from None


def dpo_arguments(recipe: DPORecipe, reference: ReferencePlan, trainer_args: dict[str, Any]) -> dict[str, Any]:
    """Our machine defaults and the recipe's train settings (trainer_arguments; DPO's own defaults are in
    config.DPOTrainSettings), and the reference mode's switch."""
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


def build_trainer(recipe: DPORecipe, policy: ResolvedModel, reference: ReferencePlan, tokenizer: Any, config: Any,
                  data: PreferenceSplits, gradient_checkpointing: bool, callbacks: list[Any]) -> Any:
    from trl import DPOTrainer

    model, peft_config = load_policy(policy, recipe, tokenizer, gradient_checkpointing, int(config.seed))
    ref_model = load_reference_model(reference.model, recipe, tokenizer, model) if reference.model else None
    try:
        with library_bars_as_transformers():  # precompute's pass over the data runs inside
            trainer = DPOTrainer(
                model=model,
                ref_model=ref_model,
                args=config,
                data_collator=preference_collator(recipe, config, tokenizer),
                train_dataset=numbered(data.train),
                eval_dataset=numbered(data.eval) if data.eval else None,
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=callbacks,
            )
    except (ValueError, NotImplementedError) as exc:
        raise_settings_error(exc)
        raise
    prepare_reference(trainer, reference)
    return quiet_trainer(trainer)


def run_dpo(recipe: DPORecipe, progress: bool = True) -> Path:
    """Train a LoRA adapter on preference pairs as the recipe says; return the finished output dir."""
    out = check_run_inputs(recipe)
    if finished_run(recipe):
        return out
    timer = Timer()
    with timer.phase("resolve_model"):
        policy, reference = plan_reference(recipe)
        recipe = continued_lora(recipe, policy.adapter)
        tokenizer = load_tokenizer(policy, recipe.model.chat_template)
    with timer.phase("data"):
        data = prepare_preference_data(recipe)
    reference = choose_reference(reference, recipe.train, len(data.train))
    steps = estimated_steps(recipe.train, len(data.train))
    plan = plan_machine(recipe.model, recipe.train, recipe, "dpo", reference.mode)
    args = dpo_arguments(recipe, reference, trainer_arguments(recipe, plan, partial_dir(out)))
    evaluate_at_saves(args, bool(data.eval), recipe.train)
    config = dpo_config(args)

    check_prompts_fit(prompt_lengths(tokenizer, data.train), data.locations, config.max_length,
                      config.truncation_mode)

    with training_run(recipe, out, run_config(recipe, policy, args, data.record)) as run:
        handle, checkpoint = run.handle, run.checkpoint
        with timer.phase("load_model"):
            set_seed(int(args["seed"]))  # LoRA init (here or inside TRL for --ref base) draws from the global RNG
            trainer = build_trainer(recipe, policy, reference, tokenizer, config, data, plan.gradient_checkpointing,
                                    [progress_callback(steps, progress and run.writer), *run.callbacks()])
        data.record["truncation"] = check_truncation(dpo_truncation(trainer, len(data.train), data.locations), None)
        check_eval_kept(trainer, len(data.eval))
        # before train() loads any checkpoint, so a resumed run checks the same starting point
        with timer.phase("step0_check"):
            step0 = check_reference_at_step0(trainer, reference.mode)
        with timer.phase("train"):
            output = train(trainer, checkpoint, handle.path)
        run.raise_if_stopped(trainer.state.global_step)
        if data.eval:
            with timer.phase("eval"):
                trainer.evaluate()
        history = list(trainer.state.log_history)
        metrics = final_metrics(history, output)
        metrics.update(final_rewards(history))
        record = run_record("dpo", recipe, policy, plan, args, data.record, history, metrics,
                            {**timer.phases, "total": timer.total()}, trainer.model,
                            extra={"reference": reference.describe(), "beta": float(config.beta),
                                   "loss_type": list(config.loss_type), "step0_check": step0,
                                   "resumed_from": checkpoint, "resume": run.resume})
        plots = {"loss.png": log_series(history, "loss", "eval_loss"),
                 "rewards.png": log_series(history, *REWARD_KEYS)}
        return finish_training(handle, "dpo", trainer, tokenizer, recipe, policy, record, plots)


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def final_rewards(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of each reward metric, train and eval."""
    out: dict[str, float] = {}
    for key in REWARD_KEYS + tuple(f"eval_{k}" for k in REWARD_KEYS):
        values = [h[key] for h in history if key in h]
        if values:
            out[key] = values[-1]
    return out
