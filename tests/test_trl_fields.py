"""The `train:` passthrough: values coerced as TRL's HfArgumentParser reads them, or refused with the key, the value
and the expected type; ranges and combinations checked before anything loads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from trl import DPOConfig, SFTConfig

from align.core.config import DPORecipe, SFTRecipe
from align.core.errors import AlignError
from align.core.trl_fields import check_trl_values


def checked(train: dict, cls=SFTRecipe, config=SFTConfig, **fields) -> dict:
    """The check on its own: a stand-in recipe, so the typed fields of `cls.train_settings` (which refuse some of
    these values first when a recipe is validated) do not hide what this layer does for every other TRL field."""
    recipe = cls.model_validate({"output": "o", **fields})
    stand_in = SimpleNamespace(train=dict(train), model=recipe.model,
                               max_prompt_length=getattr(recipe, "max_prompt_length", None))
    return check_trl_values(stand_in, config)


def test_values_are_coerced_as_the_command_line_parser_would():
    train = checked({"weight_decay": "0.01", "max_steps": 1e3, "packing": "yes", "bf16": 0, "seed": "7",
                     "lr_scheduler_type": "linear", "report_to": "none", "include_for_metrics": "loss"})
    assert train == {"weight_decay": 0.01, "max_steps": 1000, "packing": True, "bf16": False, "seed": 7,
                     "lr_scheduler_type": "linear", "report_to": "none", "include_for_metrics": ["loss"]}
    assert checked({"loss_type": "ipo", "beta": "0.2"}, DPORecipe, DPOConfig) == {"loss_type": ["ipo"], "beta": 0.2}
    assert SFTConfig(output_dir="x", **train).max_steps == 1000  # what passed is what TRL takes


@pytest.mark.parametrize("train,message", [
    ({"learning_rate": "fast"}, "train.learning_rate: expected a number, got 'fast'"),
    ({"max_steps": 2.5}, "train.max_steps: expected an integer, got 2.5"),
    ({"packing": "maybe"}, "train.packing: expected true or false, got 'maybe'"),
    ({"optim": "adamw_9bit"}, "train.optim: expected one of adamw_torch"),
    ({"num_train_epochs": float("nan")}, "train.num_train_epochs: expected a finite number"),
    ({"lr_scheduler_kwargs": [1]}, "train.lr_scheduler_kwargs: expected a mapping or a string"),
    ({"warmup_steps": 2.5}, "train.warmup_steps: must be a share of the steps below 1, or a whole number"),
    ({"adam_beta1": 1}, "train.adam_beta1: must be >= 0 and < 1"),
    ({"max_steps": 0}, "train.max_steps: must be a positive number of steps (or -1: use epochs)"),
    ({"bf16": True, "fp16": True}, "both true"),
])
def test_bad_values_name_the_key_the_value_and_what_was_expected(train, message):
    with pytest.raises(AlignError) as caught:
        checked(train)
    assert message in str(caught.value)


@pytest.mark.parametrize("train,message", [
    ({"learning_rate": 0}, "train.learning_rate: Input should be greater than 0 (got 0, flag --lr)"),
    ({"per_device_train_batch_size": 0}, "train.per_device_train_batch_size: Input should be greater than 0"),
])
def test_declared_fields_are_range_checked_by_the_recipe(train, message):
    from align.core.config import validate

    with pytest.raises(AlignError) as caught:
        validate(SFTRecipe, {"train": train}, "recipe")
    assert message in str(caught.value)


def test_combinations_are_refused():
    with pytest.raises(AlignError, match="max_prompt_length 512 >= train.max_length 256"):
        checked({"max_length": 256}, DPORecipe, DPOConfig, max_prompt_length=512)
    with pytest.raises(AlignError, match="train.packing with model.attn 'paged_attention'"):
        checked({"packing": True}, model={"attn": "paged_attention"})
    with pytest.raises(AlignError, match="train.padding_free with model.attn"):
        checked({"padding_free": True}, model={"attn": "paged_attention"})
    assert checked({"packing": True, "packing_strategy": "wrapped"}, model={"attn": "paged_attention"})
    assert checked({"packing": True}, model={"attn": "sdpa"}) == {"packing": True}


def test_each_range_is_written_once():
    """A field the recipe's TrainSettings declare is range-checked there; trl_fields.FIELD_RANGES holds only the TRL
    fields none of them declares."""
    from align.core.trl_fields import FIELD_RANGES
    from align.train.methods import METHODS

    declared = {name for method in METHODS.values() for name in method.recipe.train_settings.model_fields}
    assert not declared & set(FIELD_RANGES), declared & set(FIELD_RANGES)
