"""Experiment tracking: `report_to` resolves to a local tracker, and what the tracker wrote is what run.json says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.core.config import SFTRecipe
from align.core.errors import AlignError
from align.train.training import resolve_report_to, tracking_arguments
from conftest import write_jsonl


def installed_only(*names: str):
    return lambda name: name in names


def test_auto_picks_the_first_installed_local_tracker_and_never_wandb():
    assert resolve_report_to("auto", installed_only("tensorboard", "trackio", "wandb")) == "tensorboard"
    assert resolve_report_to("auto", installed_only("trackio", "wandb")) == "trackio"
    assert resolve_report_to("auto", installed_only("wandb")) == "none"
    assert resolve_report_to("none", installed_only()) == "none"


def test_an_explicit_tracker_that_is_not_installed_is_a_one_line_error():
    with pytest.raises(AlignError, match=r"report_to trackio: the trackio package is not installed"):
        resolve_report_to("trackio", installed_only("tensorboard"))


def test_run_is_named_after_the_output_dir_unless_the_recipe_names_it(tmp_path):
    recipe = SFTRecipe.model_validate({"report_to": "none", "output": str(tmp_path / "my-run")})
    assert tracking_arguments(recipe) == {"report_to": "none", "run_name": "my-run", "project": "alignmerge"}
    named = recipe.model_copy(update={"train": {"run_name": "r1", "project": "p1"}})
    assert tracking_arguments(named) == {"report_to": "none", "run_name": "r1", "project": "p1"}


def test_trl_spelling_in_the_train_section_wins(tmp_path):
    recipe = SFTRecipe.model_validate({"report_to": "tensorboard", "train": {"report_to": "none"}})
    assert tracking_arguments(recipe)["report_to"] == "none"


def scalar_series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """Every (step, value) the TensorBoard event files under run_dir hold for `tag`, read with TensorBoard's own
    reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            series += [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return series


def test_tensorboard_event_files_hold_the_loss_series_of_run_json(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from align.train.sft import run_sft

    data = write_jsonl(tmp_path / "toy.jsonl", [{"prompt": f"flip {q}", "completion": q[::-1]}
                                                for q in ("ab", "cd", "ef", "gh")] * 2)
    recipe = SFTRecipe.model_validate({
        "model": {"name": str(tiny_model_dir), "dtype": "float32"}, "data": {"path": str(data)},
        "lora": {"r": 4, "dropout": 0.0}, "report_to": "tensorboard", "output": str(tmp_path / "out"),
        "train": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "save_steps": 4},
    })
    out = run_sft(recipe, progress=False)

    record = json.loads((out / "run.json").read_text())
    assert record["trainer_args"]["report_to"] == "tensorboard"
    expected = [(h["step"], h["loss"]) for h in record["log_history"] if "loss" in h]
    logged = scalar_series(out / "runs", "train/loss")
    assert len(expected) == 4
    assert [step for step, _ in logged] == [step for step, _ in expected]
    # TensorBoard stores float32 scalars
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_align_run_names_one_experiment_with_a_run_per_training_stage(tiny_model_dir, tmp_path):
    from test_pipeline import stage_recipes, write_recipe

    found = stage_recipes(write_recipe(tmp_path, tiny_model_dir), tmp_path / "my-run")
    assert found and {name: (tracking_arguments(r)["project"], tracking_arguments(r)["run_name"])
                      for name, r in found.items()} == {name: ("my-run", name) for name in found}
