"""Recipes: YAML < flags < --set, typed validation, unknown keys with did-you-mean."""

from __future__ import annotations

import pytest
from trl import SFTConfig

from align.core.config import SFTRecipe, build_recipe, parse_set
from align.core.errors import AlignError


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_flags_override_yaml_and_set_overrides_flags(tmp_path):
    path = write(tmp_path, "model: {name: m1}\nlora: {r: 4}\ntrain: {learning_rate: 0.1, max_steps: 7}\n")
    recipe = build_recipe(SFTRecipe, path, {"lora.r": 8, "train.learning_rate": None},
                          ["train.learning_rate=0.5", "data.limit=3"], trl_config=SFTConfig)
    assert recipe.model.name == "m1"
    assert recipe.lora.r == 8 and recipe.lora.lora_alpha == 16
    assert recipe.train == {"learning_rate": 0.5, "max_steps": 7}
    assert recipe.data.limit == 3


def test_unknown_section_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "lora: {rank: 4}\n")
    with pytest.raises(AlignError, match=r"unknown key 'lora.rank'"):
        build_recipe(SFTRecipe, path, {})
    path = write(tmp_path, "lora: {alpah: 4}\n")
    with pytest.raises(AlignError, match=r"unknown key 'lora.alpah' \(did you mean 'alpha'\?\)"):
        build_recipe(SFTRecipe, path, {})


def test_unknown_train_key_checked_against_trl_config(tmp_path):
    path = write(tmp_path, "train: {learning_rat: 0.1}\n")
    with pytest.raises(AlignError, match=r"unknown key 'train.learning_rat' \(did you mean 'learning_rate'\?\)"):
        build_recipe(SFTRecipe, path, {}, trl_config=SFTConfig)


def test_wrong_type_is_one_line(tmp_path):
    path = write(tmp_path, "lora: {r: many}\n")
    with pytest.raises(AlignError, match=r"lora.r: .*integer") as info:
        build_recipe(SFTRecipe, path, {})
    assert "\n" not in str(info.value)


def test_bad_yaml_and_missing_recipe(tmp_path):
    with pytest.raises(AlignError, match=r"r.yaml:\d+: invalid YAML"):
        build_recipe(SFTRecipe, write(tmp_path, "model:\n  name: [unclosed\n"), {})
    with pytest.raises(AlignError, match="recipe not found"):
        build_recipe(SFTRecipe, tmp_path / "none.yaml", {})


def test_parse_set_reads_yaml_scalars():
    assert parse_set(["a.b=1e-4", "c=true", "d=[1, 2]", "e=text"]) == [("a.b", 1e-4), ("c", True), ("d", [1, 2]),
                                                                        ("e", "text")]
    with pytest.raises(AlignError, match="expected section.key=value"):
        parse_set(["novalue"])
