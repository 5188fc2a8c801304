"""The machine plan's choices: micro-batch before recompute when a run does not fit, padding-free packing where the
attention path keeps sequences apart and pays, Liger's kernels on CUDA when they import."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from align.core.config import ModelSpec, SFTRecipe
from align.train.estimate import (
    GiB, TrainSetup, choose_layout, plan_from_recipe, plan_memory, predicted_relative_time,
)
from align.train.training import liger_choice, packing_choice, plan_machine, trainer_arguments


# ---- micro-batch before recompute ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issue14_llama(tmp_path_factory) -> Path:
    """Issue 14's GPU model as a config alone: 1.07B Llama, 16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads,
    vocabulary 49152, bf16."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("llama1b")
    LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                dtype="bfloat16").save_pretrained(path)
    return path


@pytest.mark.parametrize("budget_gib, expected", [
    # planned with the CUDA terms calibrated on issue 12's H100 peaks: bs16 72 GiB, bs8 37, bs4 20, bs2 11,
    # bs16 with checkpointing 11
    (60, (8, 2, False)),   # bs16 does not fit, bs8 does, and is predicted faster than bs4
    (30, (4, 4, False)),   # bs8 does not fit, bs4 does: micro-batch 4 x 4, no recompute
    (15, (16, 1, True)),   # checkpointing at bs16 predicted 6% faster than micro-batch 2 x 8 (both fit)
])
def test_issue14_gpu_case_prefers_a_smaller_micro_batch_to_recompute(issue14_llama, budget_gib, expected):
    recipe = SFTRecipe(model=ModelSpec(name=str(issue14_llama), dtype="bfloat16"),  # what auto picks on an H100
                       train={"per_device_train_batch_size": 16, "max_length": 2048})
    plan = plan_from_recipe(recipe, "sft", budget=budget_gib * GiB, device="cuda")
    setup = plan.setup
    assert (setup.batch_size, setup.grad_accum, setup.gradient_checkpointing) == expected
    assert setup.batch_size * setup.grad_accum == 16  # the same optimisation step
    assert plan.peak_bytes <= budget_gib * GiB and "does not fit" in plan.layout


def test_layout_falls_back_to_the_smallest_plan_when_nothing_fits(issue14_llama):
    from align.train.estimate import load_shape

    shape = load_shape(str(issue14_llama))
    asked = TrainSetup(device="cuda", weights_dtype="bfloat16", batch_size=16, max_length=2048)
    chosen, reason = choose_layout(shape, asked, 1 * GiB)
    assert (chosen.batch_size, chosen.gradient_checkpointing) == (1, True) and "nothing fits" in reason


def test_cost_model_ranks_checkpointing_after_a_fitting_micro_batch():
    big = TrainSetup(device="cuda", batch_size=16, max_length=2048, gradient_checkpointing=True)
    small = TrainSetup(device="cuda", batch_size=4, max_length=2048, grad_accum=4)
    assert predicted_relative_time(small) < predicted_relative_time(big)
    assert predicted_relative_time(replace(small, batch_size=8)) < predicted_relative_time(small)


def test_planner_decision_reaches_the_trainer_arguments(tiny_model_dir, monkeypatch, tmp_path):
    """On CPU, with the device's memory faked to sit between what micro-batch 4 and 8 need."""
    import align.train.estimate as estimate

    train = {"per_device_train_batch_size": 8, "max_length": 256}
    recipe = SFTRecipe(model=ModelSpec(name=str(tiny_model_dir), dtype="float32"), train=train)
    full = plan_from_recipe(recipe, "sft", budget=10**15, device="cpu")
    half = plan_memory(full.shape, replace(full.setup, batch_size=4, grad_accum=2))
    limit = (half.peak_bytes + full.peak_bytes) // 2
    monkeypatch.setattr(estimate, "available_memory", lambda device: limit)

    plan = plan_machine(recipe.model, train, recipe, "sft")
    assert plan.micro_batch == (4, 2) and plan.gradient_checkpointing is False
    assert "micro-batch 4 x accumulation 2 without checkpointing" in plan.reasons["gradient_checkpointing"]
    assert plan.describe()["micro_batch"] == (4, 2)
    args = trainer_arguments(recipe, plan, tmp_path)
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (4, 2)

    monkeypatch.setattr(estimate, "available_memory", lambda device: 10**15)
    roomy = plan_machine(recipe.model, train, recipe, "sft")
    assert roomy.micro_batch is None and trainer_arguments(recipe, roomy, tmp_path)["per_device_train_batch_size"] == 8


def test_explicit_checkpointing_leaves_the_batch_alone(tiny_model_dir, monkeypatch):
    import align.train.estimate as estimate

    monkeypatch.setattr(estimate, "available_memory", lambda device: 1)
    recipe = SFTRecipe(model=ModelSpec(name=str(tiny_model_dir), dtype="float32", gradient_checkpointing=False),
                       train={"per_device_train_batch_size": 8})
    plan = plan_machine(recipe.model, recipe.train, recipe, "sft")
    assert plan.micro_batch is None and plan.gradient_checkpointing is False


# ---- packing ------------------------------------------------------------------------------------------------------

SHORT_UNIFORM = [60] * 200          # like builtin:pig-latin: padding is rare, the packed row is long
LONG_TAILED = [30] * 150 + [900] * 10  # chat data: most rows padded to a long neighbour


def test_varlen_attention_packs_by_default(tiny_model_dir):
    on, reason = packing_choice(ModelSpec(name=str(tiny_model_dir), attn="flash_attention_2"), {}, SHORT_UNIFORM)
    assert on and reason.startswith("on: ") and "varlen" in reason


def test_masked_attention_packs_only_where_predicted_faster(issue14_llama):
    spec = ModelSpec(name=str(issue14_llama), attn="sdpa")
    off, why_off = packing_choice(spec, {"per_device_train_batch_size": 8}, SHORT_UNIFORM)
    assert not off and why_off.startswith("off: ") and "predicted" in why_off
    on, why_on = packing_choice(spec, {"per_device_train_batch_size": 8, "max_length": 1024}, LONG_TAILED)
    assert on and why_on.startswith("on: ")


def test_packing_stays_off_where_sequences_cannot_be_kept_apart(tiny_model_dir, monkeypatch):
    import align.train.training as training

    off, reason = packing_choice(ModelSpec(name=str(tiny_model_dir), attn="flex_attention"), {}, LONG_TAILED)
    assert not off and "not known to keep packed sequences apart" in reason
    monkeypatch.setattr(training, "builds_packed_mask", lambda model_type: False)
    off, reason = packing_choice(ModelSpec(name=str(tiny_model_dir), attn="flash_attention_2"), {}, LONG_TAILED)
    assert not off and "attend to each other" in reason


def test_llama_builds_its_mask_from_position_ids_and_an_unknown_type_does_not():
    from align.train.training import builds_packed_mask

    assert builds_packed_mask("llama") and not builds_packed_mask("no_such_model")


def test_packing_requested_in_the_recipe_wins(tiny_model_dir):
    spec = ModelSpec(name=str(tiny_model_dir), attn="flash_attention_2")
    assert packing_choice(spec, {"packing": False}, LONG_TAILED) == (False, "requested")
    assert packing_choice(ModelSpec(name=str(tiny_model_dir)), {"packing": True}, SHORT_UNIFORM) == (True, "requested")


def test_packing_reaches_the_plan_and_the_trainer_arguments(tiny_model_dir, tmp_path):
    recipe = SFTRecipe(model=ModelSpec(name=str(tiny_model_dir), attn="flash_attention_2", dtype="float32",
                                       gradient_checkpointing=False))
    plan = plan_machine(recipe.model, recipe.train, recipe, "sft", lengths=SHORT_UNIFORM)
    assert plan.packing is True and plan.describe()["reasons"]["packing"].startswith("on: ")
    assert trainer_arguments(recipe, plan, tmp_path)["packing"] is True
    dpo = plan_machine(recipe.model, recipe.train, recipe, "dpo", "adapter")
    assert dpo.packing is None and "packing" not in dpo.trainer_overrides()


# ---- Liger kernels --------------------------------------------------------------------------------------------------


def fake_liger(monkeypatch) -> None:
    package = types.ModuleType("liger_kernel")
    package.transformers = types.ModuleType("liger_kernel.transformers")
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", package.transformers)


def test_liger_on_with_cuda_and_the_package(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_liger(monkeypatch)
    on, reason = liger_choice({}, None)
    assert on and reason.startswith("on: ")
    assert liger_choice({"use_liger_kernel": False}, None) == (False, "requested")
    off, reason = liger_choice({}, "model")
    assert not off and "reference model" in reason


def test_liger_off_without_the_package(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    off, reason = liger_choice({}, None)
    assert not off and "does not import" in reason


def test_liger_off_on_cpu_with_a_reason(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_liger(monkeypatch)
    off, reason = liger_choice({}, None)
    assert not off and "no CUDA" in reason
    assert liger_choice({"use_liger_kernel": True}, None) == (True, "requested")


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="Liger's kernels need a CUDA GPU")
def test_liger_loss_matches_the_unfused_loss_on_gpu():
    import importlib.util

    import torch

    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel not installed (pip install 'alignmerge[gpu]')")
    from conftest import make_tiny_llama
    from transformers.integrations.liger import apply_liger_kernel

    torch.manual_seed(0)
    ids = torch.randint(4, 100, (2, 48), device="cuda")
    plain = make_tiny_llama(100, seed=1).cuda().float()
    fused = make_tiny_llama(100, seed=1).cuda().float()
    apply_liger_kernel(fused, {"fused_linear_cross_entropy": False})
    loss_plain = plain(input_ids=ids, labels=ids, use_cache=False).loss
    loss_fused = fused(input_ids=ids, labels=ids, use_cache=False).loss
    loss_plain.backward()
    loss_fused.backward()
    assert torch.allclose(loss_plain, loss_fused, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-3, rtol=1e-3), name
