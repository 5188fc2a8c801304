"""Flat configs as TRL's CLI (`trl sft --config`) and the alignment-handbook write them, mapped onto a recipe.

A flat config is one mapping of ModelConfig, ScriptArguments, dataset-mixture and SFTConfig/DPOConfig fields
(`model_name_or_path`, `dataset_name`, `use_peft`, `lora_r`, `load_in_4bit`, `learning_rate`, ...). Each key
lands in the recipe section that owns it; trainer fields go to `train` as they are. What alignmerge cannot honour
(full fine-tuning, remote code, a model revision, ...) is accepted at TRL's default only and refused otherwise, so
a config never trains something other than what it says.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from align.core.dotted import set_path
from align.core.errors import AlignError, did_you_mean
from align.core.trl_fields import RENAMED_FIELDS, eval_strategy

# ModelConfig / ScriptArguments / handbook keys that map one to one onto a recipe key.
RENAMED: dict[str, str] = {
    "model_name_or_path": "model.name",
    "attn_implementation": "model.attn",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_modules_to_save": "lora.modules_to_save",
    "use_rslora": "lora.rslora",
    "use_dora": "lora.dora",
    "dataset_name": "data.path",
    "dataset_train_split": "data.split",
    "dataset_config": "data.config",
    "chat_template": "model.chat_template",
    "output_dir": "output",
    "overwrite_output_dir": "overwrite",
}

# Keys alignmerge cannot honour, accepted only at the value TRL (or the handbook) defaults to, and why.
DEFAULT_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "model_revision": ((None, "main"), "models are loaded at their default revision"),
    "trust_remote_code": ((False, None), "remote model code is not run"),
    "bnb_4bit_quant_type": (("nf4", None), "4-bit loading is NF4"),
    "use_bnb_nested_quant": ((False, None), "4-bit loading uses bitsandbytes' defaults"),
    "bnb_4bit_quant_storage": ((None,), "4-bit loading uses bitsandbytes' defaults"),
    "lora_target_parameters": ((None, []), "LoRA targets modules (lora_target_modules)"),
    "lora_task_type": (("CAUSAL_LM",), "adapters are for causal language models"),
    "dataset_streaming": ((False,), "datasets are read whole"),
    "use_peft": ((True,), "alignmerge trains LoRA adapters only (use_peft: true)"),
}

# Keys with no effect on what is trained (process counts, TRL script switches), accepted and dropped; the eval
# splits are read by `_eval_split`.
IGNORED = ("preprocessing_num_workers", "ignore_bias_buffers", "dataset_test_split", "dataset_splits",
           "gradient_checkpointing_use_reentrant")

SPECIAL = ("report_to", "dtype", "torch_dtype", "load_in_4bit", "load_in_8bit", "use_flash_attention_2", "dataset_mixture",
           "dataset_mixer", "resume_from_checkpoint")


def flat_keys(trl_config: type) -> set[str]:
    """Every key a flat config may hold besides recipe fields."""
    trainer = {f.name for f in dataclasses.fields(trl_config)}
    return trainer | set(RENAMED_FIELDS) | set(RENAMED) | set(DEFAULT_ONLY) | set(IGNORED) | set(SPECIAL)


def is_flat_config(data: dict[str, Any], recipe_fields: set[str], trl_config: type | None) -> bool:
    """Flat when some top-level key is a TRL/handbook key rather than a recipe section or field."""
    if trl_config is None:
        return False
    known = flat_keys(trl_config)
    return any(key not in recipe_fields and key in known for key in data)


def flat_to_recipe(data: dict[str, Any], recipe_fields: set[str], trl_config: type, where: str | Path
                   ) -> dict[str, Any]:
    """The recipe (nested sections) a flat config means; recipe fields in it pass through unchanged."""
    trainer = {f.name for f in dataclasses.fields(trl_config)}
    passed = {key for key in data if key in recipe_fields and key not in SPECIAL}  # report_to: TRL's or ours
    recipe: dict[str, Any] = {key: value for key, value in data.items() if key in passed}
    flat = {key: value for key, value in data.items() if key not in passed}
    for key, value in flat.items():
        if key in RENAMED:
            set_path(recipe, RENAMED[key], value)
        elif key in DEFAULT_ONLY:
            accepted, why = DEFAULT_ONLY[key]
            if value not in accepted:
                raise AlignError(f"{where}: {key}: {value!r} is not supported ({why})")
        elif key in SPECIAL:
            _special(recipe, key, value, flat, where)
        elif key in IGNORED:
            continue
        elif key in trainer or key in RENAMED_FIELDS:  # a renamed field gets its installed name in build_recipe
            set_path(recipe, f"train.{key}", value)
        else:
            hint = did_you_mean(key, sorted(flat_keys(trl_config) | recipe_fields))
            raise AlignError(f"{where}: unknown key '{key}'{hint} (a flat config takes {trl_config.__name__}, "
                             "ModelConfig and ScriptArguments fields)")
    _eval_split(recipe, flat, where)
    return recipe


def _special(recipe: dict[str, Any], key: str, value: Any, flat: dict[str, Any], where: str | Path) -> None:
    if key == "report_to":
        # one tracker is the recipe's report_to (resolved and checked there); several go to TRL as a list
        single = value[0] if isinstance(value, list) and len(value) == 1 else value
        set_path(recipe, "report_to" if isinstance(single, str) else "train.report_to", single)
    elif key in ("dtype", "torch_dtype"):
        set_path(recipe, "model.dtype", "auto" if value in (None, "auto") else str(value))
    elif key in ("load_in_4bit", "load_in_8bit") and value:
        bits = key.removeprefix("load_in_")
        if recipe.get("model", {}).get("quantize") not in (None, bits):
            raise AlignError(f"{where}: load_in_4bit and load_in_8bit are both true (choose one)")
        set_path(recipe, "model.quantize", bits)
    elif key == "use_flash_attention_2" and value:
        set_path(recipe, "model.attn", "flash_attention_2")
    elif key == "resume_from_checkpoint" and value:
        if value is not True:
            raise AlignError(f"{where}: resume_from_checkpoint: give true (alignmerge resumes from the output dir's "
                             "last complete checkpoint)")
        recipe["resume"] = True
    elif key == "dataset_mixture":
        mixture_from_dataset_mixture(recipe, value, where)
    elif key == "dataset_mixer":
        if not isinstance(value, dict):
            raise AlignError(f"{where}: dataset_mixer: expected a mapping of dataset to weight")
        split = _split_named(flat, "train")
        set_path(recipe, "data.mixture", [_source(path, split, weight=weight) for path, weight in value.items()])


def _split_named(flat: dict[str, Any], kind: str) -> str | None:
    """The handbook's older `dataset_splits` list names a train and a test split (`train_prefs`, `test_prefs`)."""
    return next((str(s) for s in flat.get("dataset_splits") or [] if kind in str(s)), None)


def _source(path: str, split: Any, weight: Any = None, config: Any = None) -> dict[str, Any]:
    source: dict[str, Any] = {"path": str(path)}
    if split:
        source["split"] = str(split)
    if config is not None:
        source["config"] = str(config)
    if weight is not None and float(weight) != 1.0:
        source["weight"] = float(weight)
    return source


def mixture_from_dataset_mixture(recipe: dict[str, Any], value: Any, where: str | Path) -> None:
    """TRL's DatasetMixtureConfig (`path`, `name`, `data_files`, `split`, `fraction`) and the handbook's (`id`,
    `config`, `split`, `weight`, plus `seed`) as data.mixture; `test_split_size` (a share or a row count, as the
    handbook writes it) becomes data.eval_size."""
    if not isinstance(value, dict) or not isinstance(value.get("datasets"), list):
        raise AlignError(f"{where}: dataset_mixture: expected a mapping with a 'datasets' list")
    sources = []
    for index, entry in enumerate(value["datasets"]):
        here = f"{where}: dataset_mixture.datasets[{index}]"
        if not isinstance(entry, dict):
            raise AlignError(f"{here}: expected a mapping")
        if entry.get("data_dir") is not None:
            raise AlignError(f"{here}: data_dir is not supported (give a file, a dataset dir or a dataset id)")
        path = _dataset_path(entry, here)
        sources.append(_source(path, entry.get("split"), entry.get("weight", entry.get("fraction")),
                               entry.get("config", entry.get("name"))))
    set_path(recipe, "data.mixture", sources)
    if value.get("test_split_size") is not None:
        set_path(recipe, "data.eval_size", value["test_split_size"])
    if value.get("seed") is not None:
        recipe.setdefault("train", {}).setdefault("seed", value["seed"])
    if value.get("streaming"):
        raise AlignError(f"{where}: dataset_mixture.streaming is not supported (datasets are read whole)")


def _dataset_path(entry: dict[str, Any], where: str) -> str:
    """`id` or `path`; a loader name (`json`, `csv`, `parquet`) with one local `data_files` entry is that file."""
    path = entry.get("id", entry.get("path"))
    files = entry.get("data_files")
    if path in ("json", "csv", "parquet", None) and files is not None:
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or len(files) != 1:
            raise AlignError(f"{where}: data_files: give one file per dataset entry")
        return str(files[0])
    if not path:
        raise AlignError(f"{where}: no path or id")
    return str(path)


def _eval_split(recipe: dict[str, Any], flat: dict[str, Any], where: str | Path) -> None:
    """The eval set TRL's and the handbook's scripts evaluate on when an eval strategy is set: dataset_name's
    `dataset_test_split` (TRL's default `test`), or the test split in the older `dataset_splits` list, of a hub
    dataset or a local dataset dir. A single file has no splits: a test split named for one is refused."""
    train = recipe.get("train", {})
    data = recipe.setdefault("data", {})
    if eval_strategy(train) == "no" or "eval_path" in data or data.get("eval_size"):
        return
    if flat.get("dataset_name"):
        name, split, key = str(flat["dataset_name"]), flat.get("dataset_test_split"), "dataset_test_split"
    elif isinstance(flat.get("dataset_mixer"), dict) and _split_named(flat, "test"):
        names, split, key = list(flat["dataset_mixer"]), _split_named(flat, "test"), "dataset_splits"
        if len(names) != 1:
            raise AlignError(f"{where}: {key}: an eval split of {len(names)} mixed datasets is not supported (give "
                             "the eval dataset as data.eval_path, or hold rows out with data.eval_size)")
        name = str(names[0])
    else:
        return
    if Path(name).is_file():
        if split is not None:
            raise AlignError(f"{where}: {key}: {name} is a single file, which has no '{split}' split (point "
                             "dataset_name at a dataset dir, or hold rows out with data.eval_size)")
        return
    data["eval_path"], data["eval_split"] = name, str(split or "test")
