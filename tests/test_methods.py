"""The training-method registry (align/train/methods.py): every command, stage kind, record and planner stage comes
from it, and each entry's traits agree with the TRL trainer it wraps."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from align.train.methods import METHODS


def test_every_method_is_a_command_a_stage_kind_and_a_planner_stage():
    from align.cli import main
    from align.estimate_cli import estimate_command
    from align.pipeline.stages import RECORDS, TRAINING_STAGES

    listed = CliRunner().invoke(main, ["--help"]).output
    stage_choices = next(p for p in estimate_command.params if p.name == "stage").type.choices
    for name, method in METHODS.items():
        assert f"  {name} " in listed and name in main.commands
        assert TRAINING_STAGES[name].model_fields["kind"].annotation.__args__ == (name,)
        assert RECORDS[name] == method.record and name in stage_choices
        assert callable(method.run) and issubclass(method.config_class(), object)


@pytest.mark.parametrize("name", list(METHODS))
def test_dropout_trait_is_the_trl_config_s_default(name):
    """The planner plans LoRA dropout off where the run's `disable_dropout` defaults to True: the recipe's default
    where its train settings set one (grpo), else the TRL config's."""
    fields = {f.name: f for f in dataclasses.fields(METHODS[name].config_class())}
    default = fields["disable_dropout"].default if "disable_dropout" in fields else False
    ours = METHODS[name].recipe.train_settings.model_fields.get("disable_dropout")
    assert METHODS[name].disables_dropout == (ours.default if ours is not None else default)


@pytest.mark.parametrize("name", list(METHODS))
def test_recipe_train_keys_are_the_trl_config_s_fields(name):
    """Every field a method's `train` section hands TRL (its flags and defaults, as `train_arguments` dumps them)
    exists in its TRL config; a field excluded from the dump (grpo's inherited max_length) never reaches TRL."""
    method = METHODS[name]
    fields = {f.name for f in dataclasses.fields(method.config_class())}
    assert set(method.recipe.train_settings().model_dump()) <= fields


def test_pairs_put_two_sequences_through_the_planner():
    from align.train.estimate import TrainSetup

    for name, method in METHODS.items():
        assert TrainSetup(stage=name, batch_size=3).sequences == 3 * method.sequences_per_row
    assert {n for n, m in METHODS.items() if m.data == "pairs"} <= {n for n, m in METHODS.items()
                                                                   if m.sequences_per_row == 2}


def test_only_methods_with_a_reference_plan_a_reference_copy(tiny_model_dir):
    from align.estimate_cli import estimate

    for name, method in METHODS.items():
        terms = {t.name for t in estimate(str(tiny_model_dir), stage=name, ref="model").terms}
        assert ("reference model" in terms) == method.reference, name


def test_an_unknown_method_is_one_line():
    from align.core.errors import AlignError
    from align.train.methods import method_of

    with pytest.raises(AlignError, match="unknown training method 'dop' \\(did you mean 'dpo'\\?\\)"):
        method_of("dop")


# ---- the merge registry's defects, found by the same read -------------------------------------------------------


def test_a_seeded_adapter_space_merge_leaves_the_global_rng_alone():
    from merge.methods import METHODS as MERGES, MergeParams

    deltas = [torch.randn(6, 4), torch.randn(6, 4)]
    before = torch.get_rng_state()
    first = MERGES["dare"].adapter_deltas(MergeParams(seed=3, density=[0.5]), 2, 2)
    one = [first("layers.0.q_proj", deltas), first("layers.1.q_proj", deltas)]
    assert torch.equal(torch.get_rng_state(), before)
    again = MERGES["dare"].adapter_deltas(MergeParams(seed=3, density=[0.5]), 2, 2)
    assert all(torch.equal(a, again(n, deltas)) for a, n in zip(one, ("layers.0.q_proj", "layers.1.q_proj")))
    assert not torch.equal(one[0], one[1])  # one seeded sequence across modules, not a reseed per module


def test_a_mergekit_parameter_the_table_does_not_know_still_makes_its_option(monkeypatch):
    from merge import methods

    monkeypatch.delitem(methods.PARAMETERS, "eps")
    options = {o.name: o for o in methods.METHODS["multislerp"].options()}
    assert options["eps"].flag == "--eps" and "mergekit's `eps`" in options["eps"].help


def test_merge_branches_are_method_traits():
    from merge.methods import METHODS as MERGES

    assert [n for n, m in MERGES.items() if m.from_slices] == ["stack"]
    assert [n for n, m in MERGES.items() if m.adapter_space_by_default] == ["linear"]
    assert [n for n, m in MERGES.items() if m.consensus_option] == ["dare"]


def test_a_pipeline_merge_method_is_checked_when_the_recipe_loads(tmp_path):
    """A typo in a merge stage's method used to fail only after the training stages had run."""
    from align.core.errors import AlignError
    from align.pipeline.run import load_pipeline

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {name: sft, kind: sft}\n  - {name: m, kind: merge, method: slrep, models: [base, sft]}\n")
    with pytest.raises(AlignError, match="unknown merge method 'slrep' \\(did you mean 'slerp'\\?\\)"):
        load_pipeline(recipe)
