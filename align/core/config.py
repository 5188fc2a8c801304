"""Recipes: typed, validated once at the edge. YAML sets defaults, CLI flags override, `--set` overrides both.

A recipe has sections `model`, `data`, `lora`, `train`. `train` passes straight through to TRL's `SFTConfig` /
`DPOConfig` field names, so every TRL option is reachable; its keys are checked against those dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from align.core.dotted import set_path
from align.core.errors import AlignError, did_you_mean
from align.core.flat_config import flat_to_recipe, is_flat_config
from align.core.reference import parse_reference
from align.core.trl_fields import check_trl_values, eval_strategy, installed_field_names


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a recipe field appears on `align sft` / `align dpo` (align/core/options.py builds the click option).
    The field's docstring is the option's help and its default is the shown default, so each is written once."""

    names: tuple[str, ...]
    unset: str | None = None
    """What a None default means, shown as the default (`all rows`, `auto-detect`)."""
    note: str | None = None
    """Said after the shown default, in parentheses."""
    choices: tuple[str, ...] | None = None
    """For a str field that accepts other values in YAML but only these on the command line."""
    negatable: bool = False
    """A bool flag with a --no- form (for fields whose default is not off)."""
    comma_list: bool = False
    """The value is comma-separated into a list, except the values in `keep`."""
    keep: tuple[str, ...] = ()
    metavar: str | None = None
    multiple: bool = False
    """The flag may be repeated; each occurrence adds one item to the list."""
    trl_choices: str | None = None
    """`module:Class` of the TRL config whose field lists the accepted values: `--help` shows the installed
    version's list (`trl_fields.field_choices`), and `check_trl_values` holds values to it."""

    def __init__(self, *names: str, **options: Any) -> None:
        object.__setattr__(self, "names", names)
        for key, value in {**{f.name: f.default for f in dataclasses.fields(Flag)[1:]}, **options}.items():
            object.__setattr__(self, key, value)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelSpec(Section):
    name: Annotated[str, Flag("--model", "-m")] = "smollm2-135m"
    """Model dir, hub id, .gguf file, PEFT adapter dir, or the embedded alias smollm2-135m."""
    dtype: Annotated[str, Flag("--dtype")] = "auto"
    """auto (bf16 where the hardware runs it fast, else fp32), float32, bfloat16, bf16-autocast, float16."""
    attn: Annotated[str, Flag("--attn", choices=("sdpa", "eager", "flash_attention_2"))] = "sdpa"
    """Attention implementation."""
    quantize: Annotated[Literal["4bit", "8bit"] | None, Flag("--quantize", unset="none")] = None
    """Load the base with bitsandbytes (4bit = QLoRA)."""
    gradient_checkpointing: Annotated[bool | Literal["auto"],
                                      Flag("--gradient-checkpointing", negatable=True,
                                           note="only when the planned peak does not fit the device")] = "auto"
    """Recompute activations in backward."""
    compile: Annotated[bool | Literal["auto"],
                       Flag("--compile", negatable=True, note="off: batch shapes vary, so it recompiles")] = "auto"
    """torch.compile the model."""
    chat_template: str | None = None
    """A chat template (Jinja) to train with instead of the model's own, as the alignment-handbook's `chat_template`
    sets it: saved with the adapter's tokenizer and recorded in run.json's template, which DPO and merges then use."""


class MixtureSource(Section):
    """One source of a dataset mixture: all its rows, `rows` of them, or a `weight` share of them."""

    path: str
    """A local jsonl/json/csv/parquet file, a hub dataset id, or `builtin:NAME` (as data.path)."""
    split: str | None = None
    config: str | None = None
    """The dataset's configuration (as data.config)."""
    format: str | None = None
    """Force this source's format (sources may differ in format; each is detected on its own)."""
    rows: int | None = Field(default=None, gt=0)
    """Take this many rows: a sample drawn with the seed, without replacement."""
    weight: float | None = Field(default=None, gt=0)
    """Take this share of the rows (a seeded sample); above 1 every row repeats floor(weight) times, plus a sample
    for the fraction."""

    @model_validator(mode="after")
    def _rows_or_weight(self) -> "MixtureSource":
        if self.rows is not None and self.weight is not None:
            raise ValueError("give rows or weight, not both")
        return self


class DataSpec(Section):
    path: Annotated[str, Flag("--data", "-d")] = "builtin:pig-latin"
    """jsonl/json/csv/parquet file, hub dataset, or builtin:NAME."""
    mixture: list[MixtureSource] | None = None
    """Several sources instead of `path`, e.g. [{path: a.jsonl, rows: 100}, {path: b.jsonl, weight: 0.5}]; sampled
    with train.seed, recorded per source in run.json's data record."""
    format: Annotated[str | None, Flag("--format", unset="auto-detect")] = None
    """Force the data format instead of detecting it."""
    split: Annotated[str | None, Flag("--split", unset="train")] = None
    """Dataset split."""
    config: str | None = None
    """The dataset's configuration (`load_dataset(path, config)`), for hub datasets and local dataset dirs that have
    several; a single file has none, so it is noted and ignored there."""
    limit: Annotated[int | None, Field(gt=0), Flag("--limit", unset="all rows")] = None
    """Use only the first N rows."""
    eval_path: Annotated[str | None, Flag("--eval-data", unset="none")] = None
    """Separate evaluation data for eval loss."""
    eval_split: str | None = None
    """The split of eval_path."""
    eval_size: Annotated[int | float, Field(ge=0), Flag("--eval-size")] = 0
    """Hold out this share (below 1) or this number of the training rows for eval loss (when no eval data is given)."""
    skip_invalid: Annotated[bool, Flag("--skip-invalid")] = False
    """Drop invalid rows and report how many, instead of stopping at the first."""
    loss_on: Annotated[Literal["assistant", "last", "all"], Flag("--loss-on")] = "assistant"
    """Tokens that carry loss: assistant turns, the last assistant turn, or all."""

    @property
    def eval_config(self) -> str | None:
        """The configuration to read the eval data with: data.config when the eval data is the training dataset's
        other split (as the handbook's `dataset_test_split` is), else the eval dataset's default."""
        return self.config if self.eval_path == self.path else None

    @field_validator("eval_size")
    @classmethod
    def _share_or_rows(cls, value: int | float) -> int | float:
        return share_or_count(value, "rows")

    @model_validator(mode="after")
    def _path_or_mixture(self) -> "DataSpec":
        default = type(self).model_fields["path"].default
        if self.mixture is not None and self.path != default:
            raise ValueError("give data.path or data.mixture, not both")
        if self.mixture is not None and not self.mixture:
            raise ValueError("data.mixture is empty")
        return self


def share_or_count(value: int | float, of: str) -> int | float:
    """A share below 1, or a whole number of `of` (steps, rows), as transformers reads `warmup_steps`."""
    if value < 1 or float(value).is_integer():
        return value
    raise ValueError(f"expected a share of the {of} below 1, or a whole number of {of}")


Dropout = Annotated[float, Field(ge=0.0, lt=1.0), Flag("--lora-dropout")]


class LoraSpec(Section):
    r: Annotated[int, Field(gt=0), Flag("--lora-r")] = 16
    """LoRA rank."""
    alpha: Annotated[float | None, Field(gt=0), Flag("--lora-alpha", unset="2*r")] = None
    """LoRA alpha (scale alpha/r)."""
    dropout: Dropout = 0.05
    """LoRA dropout."""
    target_modules: Annotated[str | list[str],
                              Flag("--target-modules", comma_list=True, keep=("all-linear",))] = "all-linear"
    """Comma-separated module names, or all-linear; empty ('' or []) for no LoRA matrices at all, when
    modules_to_save names what is trained (a mixture's router alone: `--target-modules '' --modules-to-save
    gate`)."""
    modules_to_save: Annotated[list[str] | None, Flag("--modules-to-save", comma_list=True, unset="none"),
                               Field(exclude_if=lambda v: v is None)] = None
    """Comma-separated module names trained whole and saved in the adapter (PEFT's modules_to_save), e.g. gate
    (a Mixtral's routers)."""
    rslora: Annotated[bool, Flag("--rslora")] = False
    """Scale by alpha/sqrt(r)."""
    dora: Annotated[bool, Flag("--dora")] = False
    """Weight-decomposed LoRA."""
    init: Annotated[Literal["default", "gaussian", "pissa", "loftq"], Flag("--lora-init")] = "default"
    """LoRA initialization."""

    @model_validator(mode="after")
    def _something_to_train(self) -> LoraSpec:
        if not self.target_modules and not self.modules_to_save:
            raise ValueError("lora.target_modules is empty and lora.modules_to_save names nothing: nothing would "
                             "be trained")
        return self

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


class DPOLoraSpec(LoraSpec):
    dropout: Dropout = 0.0
    """LoRA dropout. Off: DPOConfig.disable_dropout (TRL's default) zeroes every dropout module, LoRA's included,
    so a policy equal to its reference scores the same in both forwards; set train.disable_dropout=false to use it."""


# ---- the `train` section: TRL's field names, our defaults --------------------------------------------------------

LearningRate = Annotated[float, Field(gt=0), Flag("--lr")]


class TrainSettings(BaseModel):
    """The SFTConfig / DPOConfig fields we set or offer as flags, with our defaults and their ranges. Any other field
    of those passes through `train:` by name (extra keys are checked against the TRL dataclass by `check_trl_keys`)."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    max_steps: Annotated[int, Flag("--max-steps", note="use epochs")] = -1
    """Optimizer steps to run."""
    num_train_epochs: Annotated[float, Field(gt=0), Flag("--epochs")] = 3.0
    """Epochs over the data (when --max-steps is not set)."""
    learning_rate: LearningRate = 2e-4
    """Peak learning rate."""
    lr_scheduler_type: Annotated[str, Flag("--scheduler")] = "cosine"
    """Learning-rate schedule (any transformers scheduler name)."""
    warmup_steps: Annotated[int | float, Field(ge=0), Flag("--warmup")] = 0.05
    """Warmup steps (an integer) or share of steps (below 1)."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    per_device_train_batch_size: Annotated[int, Field(gt=0), Flag("--batch-size")] = 8
    """Per-device micro-batch size."""
    gradient_accumulation_steps: Annotated[int, Field(gt=0), Flag("--grad-accum")] = 1
    """Gradient accumulation steps."""
    max_length: Annotated[int | None, Field(gt=0), Flag("--max-length")] = 1024
    """Maximum tokens per sequence (or per packed block)."""
    seed: Annotated[int, Field(ge=0), Flag("--seed")] = 0
    """Random seed (data order and init)."""
    data_seed: Annotated[int | None, Field(ge=0)] = 0
    optim: Annotated[str, Flag("--optim")] = "adamw_torch_fused"
    """Optimizer, e.g. adamw_torch_fused, adamw_torch, adamw_8bit, paged_adamw_8bit."""
    save_steps: Annotated[int | float, Field(gt=0), Flag("--save-steps")] = 100
    """Checkpoint every N steps."""
    save_strategy: str = "steps"
    save_total_limit: Annotated[int | None, Field(ge=0)] = 2
    """The last checkpoint and the one before it: enough to resume after a kill during a save."""
    logging_steps: Annotated[int | float, Field(gt=0)] = 1
    """Every step, for the progress bar and run.json's loss curve."""
    logging_nan_inf_filter: bool = False
    """Log a NaN/inf loss as it is (the Trainer's default averages it away, so a diverged run logged 0.0): the run
    then stops at that step instead of saving a NaN adapter (align/train/divergence.py)."""
    disable_tqdm: bool = True
    """Our own progress bar shows loss and tokens/s."""
    dataloader_num_workers: Annotated[int, Field(ge=0)] = 0
    """Rows are tokenized before training; workers would only add start-up time."""
    ddp_find_unused_parameters: bool | None = False
    """LoRA leaves no parameter unused; True costs an extra graph walk."""
    include_num_input_tokens_seen: str | bool = "non_padding"
    """Counts the tokens the progress bar's tokens/s divides by."""

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == -1 or value > 0:
            return value
        raise ValueError("expected a positive number of steps, or -1 to train for num_train_epochs")

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_share_or_steps(cls, value: int | float) -> int | float:
        return share_or_count(value, "steps")


def with_defaults(train: dict[str, Any], settings: type[TrainSettings] = TrainSettings) -> dict[str, Any]:
    """A `train` section with the defaults its settings own filled in, for code that reads a setting the user may
    not have given (the batch, epochs, max length every method shares): the default is written once, there."""
    return settings.model_validate(train).model_dump()


class SFTTrainSettings(TrainSettings):
    packing: Annotated[bool, Flag("--packing", negatable=True)] = False
    """Pack sequences into blocks."""
    neftune_noise_alpha: Annotated[float | None, Field(gt=0), Flag("--neftune", unset="off")] = None
    """NEFTune noise alpha (e.g. 5)."""
    padding_free: Annotated[bool, Flag("--padding-free", negatable=True, note="on with packing")] = False
    """Flatten batches without padding."""


class DPOTrainSettings(TrainSettings):
    learning_rate: LearningRate = 5e-5
    """Peak learning rate. LoRA DPO learns at ~5e-6 to 5e-5 (full fine-tuning at 5e-7 to 5e-6); SFT's 2e-4 would
    overshoot."""
    beta: Annotated[float, Field(gt=0), Flag("--beta")] = 0.1
    """DPO beta: lower lets the policy drift further from the reference."""
    loss_type: Annotated[str | list[str], Flag("--loss", "--loss-type", comma_list=True,
                                               trl_choices="trl:DPOConfig")] = ["sigmoid"]
    """DPO's loss, or several comma-separated (combined with train.loss_weights): any loss type the installed
    DPOConfig accepts. The step-0 check knows each one's value with the policy equal to its reference, except
    `sft` (a plain NLL) and WPO weighting, where only the rewards are checked."""
    label_smoothing: Annotated[float, Field(ge=0.0, lt=0.5), Flag("--label-smoothing")] = 0.0
    """Label smoothing (robust DPO: flip probability); at 0.5 chosen and rejected carry no signal."""


# ---- recipes -----------------------------------------------------------------------------------------------------


class TrainRecipe(Section):
    """What `align sft` and `align dpo` share."""

    train_settings: ClassVar[type[TrainSettings]] = TrainSettings
    """The typed fields of this command's `train` section."""

    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    lora: LoraSpec = LoraSpec()
    train: dict[str, Any] = {}
    """Passed to TRL's SFTConfig / DPOConfig (field names as TRL spells them): only the keys given, checked against
    `train_settings`; `train_arguments()` adds the defaults."""
    report_to: Annotated[Literal["auto", "none", "tensorboard", "trackio", "wandb"], Flag("--report-to")] = "auto"
    """Experiment tracker. auto: TensorBoard event files under the output dir if tensorboard is installed, else
    trackio's local store if trackio is, else none. wandb is the only remote choice (the only one that makes network
    calls). Name the experiment with train.project and the run with train.run_name (`align run` sets both)."""
    output: Annotated[str | None, Flag("--output", "-o", unset="required")] = None
    """Output dir for the adapter and run.json."""
    resume: Annotated[bool, Flag("--resume")] = False
    """Continue from the last checkpoint."""
    overwrite: Annotated[bool, Flag("--overwrite")] = False
    """Replace a non-empty output dir."""
    force: Annotated[bool, Flag("--force")] = False
    """With --resume: continue from a checkpoint trained under other settings (run.json records both)."""

    @model_validator(mode="after")
    def _force_resumes(self) -> "TrainRecipe":
        if self.force and not self.resume:
            raise ValueError("force continues a resumed run under changed settings: give it with --resume")
        return self

    @field_validator("train")
    @classmethod
    def _train_values_in_range(cls, value: dict[str, Any]) -> dict[str, Any]:
        return cls.train_settings.model_validate(value).model_dump(exclude_unset=True)

    def train_arguments(self) -> dict[str, Any]:
        """The `train` section with every default filled in: what TRL gets before the machine's choices."""
        return self.train_settings.model_validate(self.train).model_dump()

    @model_validator(mode="after")
    def _eval_needs_an_eval_set(self) -> "TrainRecipe":
        strategy = eval_strategy(self.train)
        if strategy != "no" and not (self.data.eval_path or self.data.eval_size):
            raise ValueError(f"train.eval_strategy {strategy!r} needs an eval set, and there is none: give "
                             "data.eval_path (--eval-data) or data.eval_size (--eval-size), or eval_strategy 'no'")
        return self

    @property
    def train_seed(self) -> int:
        """train.seed, or its default: what samples, orders and holds out the data as well as seeding training."""
        return int(self.train_arguments()["seed"])


class SFTRecipe(TrainRecipe):
    train_settings: ClassVar[type[TrainSettings]] = SFTTrainSettings


class PreferenceDataSpec(DataSpec):
    path: Annotated[str, Flag("--data", "-d")] = "builtin:pig-latin-prefs"
    """Preference data: jsonl/json/csv/parquet file, hub dataset, or builtin:NAME."""
    loss_on: Literal["assistant", "last", "all"] = "assistant"
    """Not used by DPO (its loss is on the completions)."""
    pairs: Annotated[Literal["best_worst", "all"], Flag("--pairs")] = "best_worst"
    """Scored completions: best vs worst, or every pair above --score-margin."""
    score_margin: Annotated[float, Field(ge=0.0), Flag("--score-margin")] = 0.0
    """Scored completions: least score difference for a pair."""


class PreferenceRecipe(TrainRecipe):
    """What the preference methods (`align dpo`, `orpo`, `simpo`) share: pairs, and a policy that starts from the
    SFT adapter or as a fresh LoRA on the base."""

    data: PreferenceDataSpec = PreferenceDataSpec()
    lora: DPOLoraSpec = DPOLoraSpec()
    adapter: Annotated[str | None, Flag("--adapter", "-a", unset="none (fresh LoRA)")] = None
    """SFT adapter dir: the policy starts as a copy of it."""


class ReferenceRecipe(PreferenceRecipe):
    """What the methods with a reference (`align dpo`, `align kto`) add: which reference, and where to cut prompts and
    completions before TRL's own max_length."""

    adapter: Annotated[str | None, Flag("--adapter", "-a", unset="none (fresh LoRA)")] = None
    """SFT adapter dir: the policy starts as a copy of it, and (with ref adapter) it is the reference."""
    ref: Annotated[str | None, Flag("--ref", unset="auto",
                                    metavar="auto|adapter|base|precompute|model:PATH")] = None
    """Reference: auto (precompute where the data allows, else the SFT adapter, or the base without one), the frozen
    SFT adapter, the base (adapters off), log-probs precomputed once, or a separate model."""

    @field_validator("ref")
    @classmethod
    def _known_reference(cls, value: str | None) -> str | None:
        if value is not None:
            parse_reference(value)
        return value


class DPORecipe(ReferenceRecipe):
    """`align dpo`. beta, loss_type, label_smoothing and every other DPOConfig field go through `train`."""

    train_settings: ClassVar[type[TrainSettings]] = DPOTrainSettings

    max_prompt_length: Annotated[int | None, Field(gt=0), Flag("--max-prompt-length", unset="none")] = None
    """Keep the last N prompt tokens (the ones nearest the answer). TRL 1.16's DPOConfig has only max_length."""
    max_completion_length: Annotated[int | None, Field(gt=0), Flag("--max-completion-length", unset="none")] = None
    """Keep the first N tokens of each completion."""


class KTOTrainSettings(TrainSettings):
    learning_rate: LearningRate = 5e-5
    """Peak learning rate (LoRA, as for DPO)."""
    beta: Annotated[float, Field(gt=0), Flag("--beta")] = 0.1
    """KTO's beta: how far the policy may move from the reference."""
    desirable_weight: Annotated[float | None, Field(gt=0), Flag("--desirable-weight", unset="balanced")] = None
    """Weight of each desirable example's loss. Unset with --undesirable-weight: chosen so that desirable weight x
    desirable examples equals undesirable weight x undesirable examples, the KTO paper's recommended balance."""
    undesirable_weight: Annotated[float | None, Field(gt=0), Flag("--undesirable-weight", unset="balanced")] = None
    """Weight of each undesirable example's loss (see --desirable-weight)."""
    loss_type: Annotated[str, Flag("--loss", trl_choices="trl:KTOConfig")] = "kto"
    """KTO's loss (kto), or the installed KTOConfig's other losses."""


class UnpairedDataSpec(PreferenceDataSpec):
    """Labelled completions (a prompt, an answer, and whether it is desirable), or preference pairs to split."""

    path: Annotated[str, Flag("--data", "-d")] = "builtin:pig-latin-prefs"
    """Labelled completions (TRL's prompt/completion/label, any SFT layout with a `label` or LLaMA-Factory's
    `kto_tag`), or preference pairs: jsonl/json/csv/parquet file, hub dataset, or builtin:NAME."""
    from_pairs: Annotated[bool | None, Flag("--from-pairs", negatable=True, unset="auto")] = None
    """Split each preference pair into its chosen answer (desirable) and its rejected one (undesirable). Unset: when
    the data holds pairs."""


class KTORecipe(ReferenceRecipe):
    """`align kto`: Kahneman-Tversky optimization over TRL's KTOTrainer, on unpaired labelled completions (thumbs up
    and down) or on pairs split in two. `train` takes KTOConfig fields."""

    train_settings: ClassVar[type[TrainSettings]] = KTOTrainSettings

    data: UnpairedDataSpec = UnpairedDataSpec()


class GRPOTrainSettings(TrainSettings):
    learning_rate: LearningRate = 1e-5
    """Peak learning rate (LoRA; TRL's 1e-6 is for full fine-tuning). Not tuned here."""
    beta: Annotated[float, Field(ge=0), Flag("--beta")] = 0.04
    """Weight of the per-token KL to the reference (the GRPO paper's 0.04). 0 drops the reference: no KL term and no
    reference forward (TRL's default, as DAPO and Dr. GRPO train)."""
    num_generations: Annotated[int, Field(ge=2), Flag("--num-generations")] = 4
    """Completions sampled per prompt (the group whose rewards are compared). TRL's batch counts completions, so
    --batch-size x --grad-accum x processes must be a multiple of it: the default batch of 8 holds 2 prompts."""
    max_completion_length: Annotated[int | None, Field(gt=0), Flag("--max-completion-length")] = 64
    """Most tokens generated per completion (the demo task's answers take fewer; TRL's default is 256)."""
    reward_weights: Annotated[list[float] | None, Flag("--reward-weights", comma_list=True, unset="1 each")] = None
    """One weight per --reward, comma-separated, in the order the rewards are given."""
    disable_dropout: bool = True
    """Dropout off, LoRA's included (TRL's GRPOConfig defaults to on): the reference forward runs on the same model in
    training mode, so dropout would make the KL to the reference noise; DPO and KTO turn it off for the same reason.
    A continued SFT adapter keeps its own lora.dropout (0.05 from align sft), which this zeroes."""
    loss_type: Annotated[str, Flag("--loss")] = "dapo"
    """GRPOConfig's loss_type: how per-token losses are aggregated (TRL's default dapo; grpo, dr_grpo, bnpo, ...)."""
    max_length: Annotated[int | None, Field(exclude=True)] = None
    """Not a GRPOConfig field: prompts are kept whole and completions stop at max_completion_length."""


class PromptDataSpec(DataSpec):
    """Prompts to sample completions for: SFT conversations (the prompt is every turn before the last assistant
    message, which is the reference answer), or rows with a `prompt` column and an optional reference answer."""

    path: Annotated[str, Flag("--data", "-d")] = "builtin:pig-latin"
    """Prompts: SFT conversations, or rows with a `prompt` (text or messages); jsonl/json/csv/parquet file, hub
    dataset, or builtin:NAME."""
    loss_on: Literal["assistant", "last", "all"] = "assistant"
    """Not used by GRPO (its loss is on the sampled completions)."""
    answer_column: Annotated[str | None, Flag("--answer-column", unset="auto")] = None
    """The reference-answer column of `prompt` rows, for rewards that compare with it (exact). auto: `answer`,
    `reference`, `solution` or `completion`, the first present."""


class GRPORecipe(ReferenceRecipe):
    """`align grpo`: group-relative policy optimization over TRL's GRPOTrainer: completions sampled online for each
    prompt, scored by reward functions, and the policy moved toward the better ones of each group, with a KL to the
    reference. `train` takes GRPOConfig fields."""

    train_settings: ClassVar[type[TrainSettings]] = GRPOTrainSettings

    data: PromptDataSpec = PromptDataSpec()
    ref: Annotated[str | None, Flag("--ref", unset="auto", metavar="auto|adapter|base")] = None
    """Reference of the KL term (beta > 0): auto (the frozen SFT adapter, or the base without one), adapter, base.
    precompute and model:PATH do not apply (completions are sampled online; TRL's GRPOTrainer takes no separate
    reference with a LoRA policy)."""
    rewards: Annotated[list[str], Field(min_length=1), Flag("--reward", multiple=True, metavar="NAME[:ARG]")] = [
        "pig-latin"]
    """A reward function, repeatable: pig-latin (word accuracy by the house rule), exact (equals the reference
    answer), regex:PATTERN (1 when the whole completion matches), length[:N] (minus the share of
    max_completion_length spent beyond N tokens), FILE.py:FUNCTION (TRL's reward-function signature), or rm:DIR
    (the score of a reward model `align rm` trained, on the policy's tokenizer)."""
    vllm: Annotated[Literal["colocate"] | None, Flag("--vllm", unset="none")] = None
    """Sample the completions with vLLM in the training process (TRL's use_vllm with vllm_mode colocate) instead of
    transformers' generate. Needs a CUDA GPU and the vllm extra (pip install -e '.[vllm]' in the alignmerge
    checkout); TRL's other vllm_* fields (vllm_gpu_memory_utilization, vllm_enable_sleep_mode, ...) go in `train`.
    Not run on this project's machines beyond its refusals and the GRPOConfig it sets."""

    @model_validator(mode="after")
    def _vllm_set_once(self) -> "GRPORecipe":
        given = [key for key in ("use_vllm", "vllm_mode") if key in self.train]
        if self.vllm and given:
            raise ValueError(f"vllm {self.vllm} sets train.use_vllm and train.vllm_mode: drop train."
                             f"{' and train.'.join(given)}, or drop vllm and give both in train")
        return self

    def train_arguments(self) -> dict[str, Any]:
        """`vllm` as the GRPOConfig fields it stands for."""
        arguments = super().train_arguments()
        if self.vllm:
            arguments.update(use_vllm=True, vllm_mode=self.vllm)
        return arguments


class ORPOTrainSettings(TrainSettings):
    learning_rate: LearningRate = 5e-5
    """Peak learning rate (LoRA; the ORPO paper's full fine-tuning used 5e-6 to 8e-6)."""
    beta: Annotated[float, Field(gt=0), Flag("--beta")] = 0.1
    """ORPO's lambda: the weight of the odds-ratio term beside the SFT loss on the chosen answer."""


class ORPORecipe(PreferenceRecipe):
    """`align orpo`: SFT on the chosen answer plus an odds-ratio penalty on the rejected one, in one stage and with no
    reference model (TRL's experimental ORPOTrainer). `train` takes ORPOConfig fields."""

    train_settings: ClassVar[type[TrainSettings]] = ORPOTrainSettings


class SimPOTrainSettings(TrainSettings):
    learning_rate: LearningRate = 5e-5
    """Peak learning rate (LoRA; the SimPO paper's full fine-tuning used 3e-7 to 1e-6)."""
    beta: Annotated[float, Field(gt=0), Flag("--beta")] = 2.0
    """Scale of the length-normalized reward (the paper: 2.0 to 2.5)."""
    simpo_gamma: Annotated[float, Field(ge=0), Flag("--gamma")] = 1.0
    """Target reward margin gamma (the paper: 0.5 to 1.6; gamma/beta about 0.5)."""
    cpo_alpha: Annotated[float, Field(ge=0)] = 0.0
    """Weight of CPO's SFT term on the chosen answer: 0 is SimPO as published."""


class SimPORecipe(PreferenceRecipe):
    """`align simpo`: the length-normalized log-likelihood margin with a target gap, no reference model (TRL's
    experimental CPOTrainer with loss_type simpo). `train` takes CPOConfig fields."""

    train_settings: ClassVar[type[TrainSettings]] = SimPOTrainSettings


class RMDataSpec(PreferenceDataSpec):
    eval_size: Annotated[int | float, Field(ge=0), Flag("--eval-size")] = 0
    """Pairs held out (a count, or a share below 1) to report pair accuracy on, with its 95% interval; or give
    --eval-data. With neither, run.json has no accuracy."""


class RMRecipe(TrainRecipe):
    """`align rm`: a LoRA reward model (the base with a one-output score head) over TRL's RewardTrainer, trained on
    the pairs `align dpo` reads so that the chosen answer scores above the rejected one. From a base model only (an
    SFT adapter is a causal-LM adapter: merge it into its base first). `train` takes RewardConfig fields."""

    data: RMDataSpec = RMDataSpec()
    lora: DPOLoraSpec = DPOLoraSpec()


# ---- loading and overriding --------------------------------------------------------------------------------------


class RecipeLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; every recipe writes learning rates that way,
    so floats are resolved as YAML 1.2 does."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path, what: str = "recipe", expected: str = "a recipe must be a mapping of sections"
              ) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every problem is one line naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise AlignError(f"{what} not found: {path}")
    try:
        data = yaml_load(path.read_bytes().decode("utf-8-sig")) or {}
    except UnicodeDecodeError as exc:
        raise AlignError(f"{path}: not UTF-8 text (byte at offset {exc.start}; save the file as UTF-8)") from None
    except OSError as exc:
        raise AlignError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    except RecursionError:
        raise AlignError(f"{path}: nested too deeply to read") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise AlignError(f"{where}: invalid YAML ({_first_line(getattr(exc, 'problem', None) or exc)})") from None
    if not isinstance(data, dict):
        raise AlignError(f"{path}: {expected}")
    return data


def _first_line(problem: Any) -> str:
    """PyYAML's reader errors run over several lines; the first says what was wrong."""
    return (str(problem).strip().splitlines() or [type(problem).__name__])[0]


def parse_set(items: tuple[str, ...] | list[str]) -> list[tuple[str, Any]]:
    """`--set train.learning_rate=1e-4` pairs; values are parsed as YAML scalars (numbers, bools, lists)."""
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise AlignError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def build_recipe(
    cls: type[TrainRecipe],
    recipe_path: str | Path | None,
    flags: dict[str, Any],
    sets: tuple[str, ...] | list[str] = (),
    trl_config: type | None = None,
) -> TrainRecipe:
    """Merge YAML < flags < --set, then validate. `flags` maps dotted keys to values (None = not given).
    The YAML may also be a TRL / alignment-handbook flat config (align.core.flat_config)."""
    data = load_yaml(recipe_path) if recipe_path else {}
    if trl_config is not None and is_flat_config(data, set(cls.model_fields), trl_config):
        data = flat_to_recipe(data, set(cls.model_fields), trl_config, str(recipe_path))
    for key, value in flags.items():
        if value is not None:
            set_path(data, key, value)
    for key, value in parse_set(sets):
        set_path(data, key, value)
    if trl_config is not None and isinstance(data.get("train"), dict):
        data["train"] = installed_field_names(data["train"], trl_config, str(recipe_path or "train"))
    recipe = validate(cls, data, str(recipe_path or "recipe"))
    if trl_config is not None:
        check_trl_keys(recipe.train, trl_config, str(recipe_path or "train"))
        recipe.train = check_trl_values(recipe, trl_config, str(recipe_path) if recipe_path else None)
    return recipe


def validate(cls: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """Validate with pydantic; the first error becomes one line (`one_line_error`)."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise one_line_error(exc, where, cls) from None


def one_line_error(exc: ValidationError, where: str, cls: type[BaseModel] | None = None) -> AlignError:
    """A pydantic ValidationError as one line: where, the field's dotted path, pydantic's message and the value
    given (when short), with a did-you-mean for an unknown key of `cls`. Recipes, suites and mergekit
    configurations all report through it."""
    error = exc.errors()[0]
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden" and cls is not None:
        section = _section_model(cls, error["loc"][:-1])
        hint = did_you_mean(str(error["loc"][-1]), list(section.model_fields)) if section else ""
        return AlignError(f"{where}: unknown key {loc!r}{hint}")
    got = repr(error.get("input"))
    got = f" (got {got}{_flag_of(cls, error['loc']) if cls is not None else ''})" if len(got) <= 80 else ""
    return AlignError(f"{where}: {loc or 'top level'}: {error['msg']}{got}")


def _flag_of(cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """`, flag --lr` for an error in a field that has a flag, so the message names what the user typed too."""
    section = _section_model(cls, loc[:-1])
    if section is None and tuple(loc[:-1]) == ("train",) and issubclass(cls, TrainRecipe):
        section = cls.train_settings
    field = section.model_fields.get(str(loc[-1])) if section is not None and loc else None
    flag = next((m for m in field.metadata if isinstance(m, Flag)), None) if field is not None else None
    return f", flag {flag.names[0]}" if flag else ""


def _section_model(cls: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = cls
    for part in path:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def check_trl_keys(train: dict[str, Any], config_cls: type, where: str) -> None:
    names = {f.name for f in dataclasses.fields(config_cls)}
    for key in train:
        if key not in names:
            raise AlignError(
                f"{where}: unknown key {'train.' + str(key)!r}{did_you_mean(key, sorted(names))} "
                f"(train keys are {config_cls.__name__} fields)"
            )


def recipe_dict(recipe: BaseModel) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
