"""The memory planner: each term against hand-computed small cases, then the plan, the suggestions and the CLI.

The small model: a Llama with hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 100, untied.
Per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64 = 36,864 linear weights, 2 norms of 64.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from click.testing import CliRunner

from align.train.estimate import (
    HEAD_FP32_TEMPORARIES_CPU,
    GiB,
    MiB,
    TrainSetup,
    activation_term,
    autocast_weight_copy_bytes,
    head_bytes,
    layer_activation_bytes,
    load_shape,
    lora_params,
    optimizer_bytes_per_param,
    parse_size,
    plan_from_recipe,
    plan_memory,
    plan_with_budget,
    shape_from_config,
    weight_bytes,
)
from align.estimate_cli import estimate_command

LAYER_LINEAR = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # 36,864
TOTAL = 2 * 100 * 64 + 2 * (LAYER_LINEAR + 2 * 64) + 64  # embeddings + head + layers + final norm


@pytest.fixture(scope="module")
def shape():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return shape_from_config(config)


def fp32(**kw) -> TrainSetup:
    """Plain fp32, no autocast, full fine-tuning unless told otherwise: the simplest case to count by hand."""
    return TrainSetup(**{"weights_dtype": "float32", "autocast": False, "lora_r": None, "max_length": 10, **kw})


def test_shape_counts_every_parameter_per_module(shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    assert shape.total_params == TOTAL
    assert shape.total_params == sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).parameters())
    assert shape.layer_linear_params == 2 * LAYER_LINEAR
    assert (shape.embedding_params, shape.lm_head_params, shape.other_params) == (6400, 6400, 2 * 128 + 64)
    assert {g.name: (g.in_features, g.out_features, g.count) for g in shape.layer_linears}["mlp.down_proj"] == (128, 64, 2)


def test_lora_params_are_r_times_in_plus_out(shape):
    per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert lora_params(shape, 8) == 2 * per_layer
    assert lora_params(shape, 8, ("q_proj", "v_proj")) == 2 * 8 * ((64 + 64) + (64 + 32))


def test_weight_bytes_by_dtype_and_quantization(shape):
    assert weight_bytes(shape, fp32())[0] == 4 * TOTAL
    assert weight_bytes(shape, fp32(weights_dtype="bfloat16"))[0] == 2 * TOTAL
    others = TOTAL - 2 * LAYER_LINEAR
    nf4_dq = math.ceil(2 * LAYER_LINEAR * (0.5 + 1 / 64 + 4 / (64 * 256)))
    assert weight_bytes(shape, fp32(lora_r=8, quantize="4bit"))[0] == nf4_dq + 4 * others
    nf4 = math.ceil(2 * LAYER_LINEAR * (0.5 + 4 / 64))
    assert weight_bytes(shape, fp32(lora_r=8, quantize="4bit", double_quant=False))[0] == nf4 + 4 * others
    rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert weight_bytes(shape, fp32(lora_r=8, quantize="8bit"))[0] == 2 * LAYER_LINEAR + 4 * rows + 4 * others


def test_optimizer_state_bytes():
    assert optimizer_bytes_per_param("adamw_torch", 4) == 8
    assert optimizer_bytes_per_param("adamw_torch", 2) == 4
    assert optimizer_bytes_per_param("adamw_8bit", 4) == optimizer_bytes_per_param("paged_adamw_8bit", 4) == 2 * (1 + 4 / 256)
    assert optimizer_bytes_per_param("sgd", 4) == 0
    assert optimizer_bytes_per_param("lion_nonsense", 4) is None


def test_full_finetuning_with_adam_is_16_bytes_per_param(shape):
    plan = plan_memory(shape, fp32())
    state = {t.name.strip() + "@" + t.phase: t.bytes for t in plan.terms}
    assert state["weights@persistent"] + state["step gradients@optimizer_step"] + state["optimizer states@persistent"] == 16 * TOTAL


def test_gradients_only_add_beyond_the_activations_the_backward_frees(shape):
    def fb_terms(setup):
        plan = plan_memory(shape, setup)
        return {t.name: t.bytes for t in plan.terms if t.phase == "forward_backward"}

    small = fb_terms(fp32())  # 10 tokens: gradients (4 B x 86,848) dwarf the saved activations
    saved = small["activations"] + small["compute-dtype weight copies"] + small["loss head"]
    assert small["gradients"] == 4 * TOTAL - saved
    large = fb_terms(fp32(max_length=4096, attn="eager"))
    assert large["gradients"] == 100 * 64 * 4  # only the output head's, produced before anything is freed
    assert large["backward working set"] == layer_activation_bytes(shape, fp32(max_length=4096, attn="eager"))


def test_layer_activations_counted_by_hand(shape):
    # fp32, full FT, sdpa, 1 x 10 tokens: norms 2*8h, q 3*4*64, k 3*4*32, v 4*32, attention out 2*4*64,
    # MLP 4*4*128, logsumexp 4 heads x 4 B
    per_token = 2 * 8 * 64 + 3 * 4 * 64 + 3 * 4 * 32 + 4 * 32 + 2 * 4 * 64 + 4 * 4 * 128 + 4 * 4
    assert layer_activation_bytes(shape, fp32()) == 10 * per_token
    eager = 10 * (per_token + 2 * 4 * 64) + 4 * 10 * 10 * (4 + 4)
    assert layer_activation_bytes(shape, fp32(attn="eager")) == eager
    assert layer_activation_bytes(shape, fp32(batch_size=3)) == 3 * layer_activation_bytes(shape, fp32())


def test_eager_attention_grows_quadratically_and_sdpa_linearly(shape):
    sdpa = [layer_activation_bytes(shape, fp32(max_length=n)) for n in (100, 200)]
    eager = [layer_activation_bytes(shape, fp32(max_length=n, attn="eager")) for n in (100, 200)]
    assert sdpa[1] == 2 * sdpa[0]
    assert eager[1] - 2 * eager[0] == 4 * 100 * 100 * 8 * 2  # the s^2 term quadruples, the linear one doubles


def test_lora_and_autocast_add_their_saved_inputs(shape):
    base = layer_activation_bytes(shape, fp32())
    lora = layer_activation_bytes(shape, fp32(lora_r=8, lora_dropout=0.1))
    inputs = 64 * 6 + 128  # in_features of q, k, v, o, gate, up, down
    assert lora - base == 10 * (inputs * (1 + 4) + 7 * 2 * 4 * 8)  # mask + lora_A input, r-dim intermediates
    autocast = fp32(autocast=True)
    assert autocast.compute_bytes == 2 and autocast.residual_bytes == 4


def test_checkpointing_keeps_layer_inputs_and_one_layer(shape):
    setup = fp32(gradient_checkpointing=True)
    assert activation_term(shape, setup)[0] == 2 * 10 * 4 * 64 + layer_activation_bytes(shape, setup)
    assert activation_term(shape, fp32())[0] == 2 * layer_activation_bytes(shape, fp32())


def test_autocast_weight_copies(shape):
    assert autocast_weight_copy_bytes(shape, fp32(), layers=2) == 0
    assert autocast_weight_copy_bytes(shape, fp32(autocast=True), layers=2) == 2 * 2 * LAYER_LINEAR
    assert autocast_weight_copy_bytes(shape, fp32(autocast=True), layers=1) == 2 * LAYER_LINEAR


def test_loss_head_chunked_and_full(shape):
    full = head_bytes(shape, fp32(chunked_loss=False), tokens=10)[0]
    assert full == 10 * 100 * (4 + 8)
    chunked_cpu = head_bytes(shape, fp32(), tokens=10)[0]
    temporaries = HEAD_FP32_TEMPORARIES_CPU  # fp32 tile copies in the torch fallback
    assert chunked_cpu == 10 * 100 * (4 + 4 * temporaries) + 10 * (4 * 64 + 32) + 100 * 64 * (4 + 4)
    chunked_gpu = head_bytes(shape, fp32(device="cuda"), tokens=10)[0]
    # the Triton kernel reads the head's weight as it is: no fp32 copy of a vocabulary slice (issue 12's H100 peaks)
    assert chunked_gpu == 10 * 100 * 4 + 10 * (4 * 64 + 32)


def test_dpo_doubles_the_batch_and_the_reference_choice(shape):
    lora = fp32(lora_r=8)
    # DPOConfig's disable_dropout switches LoRA's dropout off, so DPO at batch 1 is SFT at batch 2 without dropout
    sft2 = plan_memory(shape, fp32(lora_r=8, batch_size=2, lora_dropout=0.0))
    dpo = plan_memory(shape, fp32(lora_r=8, stage="dpo", lora_dropout=0.1))
    assert _term(dpo, "activations") == _term(sft2, "activations")
    assert _term(dpo, "activations") < _term(plan_memory(shape, fp32(lora_r=8, batch_size=2, lora_dropout=0.1)), "activations")
    model_ref = plan_memory(shape, fp32(lora_r=8, stage="dpo", ref="model"))
    assert model_ref.peak_bytes - dpo.peak_bytes == _term(dpo, "weights")
    assert plan_memory(shape, fp32(lora_r=8, stage="dpo", ref="precompute")).peak_bytes == dpo.peak_bytes
    assert plan_memory(shape, lora).peak_bytes < dpo.peak_bytes


def test_zero_shards_states_gradients_and_weights(shape):
    one = plan_memory(shape, fp32())
    zero2 = plan_memory(shape, fp32(num_processes=4, zero=2))
    zero3 = plan_memory(shape, fp32(num_processes=4, zero=3))
    assert _term(zero2, "optimizer states") == math.ceil(_term(one, "optimizer states") / 4)
    assert _term(zero2, "step gradients") == math.ceil(_term(one, "step gradients") / 4)
    assert _term(zero2, "weights") == _term(one, "weights")
    assert _term(zero3, "weights") == math.ceil(_term(one, "weights") / 4)


def test_peak_is_the_largest_phase(shape):
    plan = plan_memory(shape, fp32())
    totals = {p: plan.phase_total(p) for p in ("load", "forward_backward", "optimizer_step")}
    assert plan.peak_bytes == max(totals.values())
    assert plan.peak_phase == max(totals, key=totals.get)


def test_budget_suggestions_fit_and_a_fitting_plan_has_none(shape):
    setup = fp32(autocast=True, lora_r=8, batch_size=8, max_length=512, attn="eager")
    plan = plan_memory(shape, setup)
    tight = plan_with_budget(shape, setup, budget=int(plan.peak_bytes * 0.8))
    assert tight.fits is False and tight.suggestions
    assert all(s["peak_bytes"] <= tight.budget for s in tight.suggestions if s["fits"])
    assert any(s["fits"] for s in tight.suggestions)
    assert plan_with_budget(shape, setup, budget=plan.peak_bytes).suggestions == []


def test_parse_size():
    assert parse_size("24GiB") == 24 * GiB
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("512MiB") == 512 * MiB
    assert parse_size("1.5G") == int(1.5 * GiB)
    assert parse_size("1000") == 1000


def test_70b_config_plans_without_weights(tmp_path):
    h, i, layers, vocab, kv = 8192, 28672, 80, 128256, 8 * 128
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": layers, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": vocab,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5}))
    shape = load_shape(str(tmp_path))
    assert shape.total_params == 2 * vocab * h + layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    full = plan_memory(shape, TrainSetup(device="cuda", weights_dtype="bfloat16", lora_r=None, optim="adamw_torch"))
    assert full.peak_bytes > 8 * shape.total_params  # bf16 weights + grads + Adam states in bf16
    qlora = plan_memory(shape, TrainSetup(device="cuda", weights_dtype="bfloat16", quantize="4bit",
                                          gradient_checkpointing=True, max_length=512))
    assert qlora.peak_bytes < full.peak_bytes / 5


def test_plan_from_recipe_uses_the_recipe_settings(tiny_model_dir):
    from align.core.config import LoraSpec, ModelSpec, SFTRecipe

    recipe = SFTRecipe(model=ModelSpec(name=str(tiny_model_dir), dtype="float32", attn="eager"),
                       lora=LoraSpec(r=4, target_modules=["q_proj"]),
                       train={"per_device_train_batch_size": 3, "max_length": 32, "optim": "adamw_8bit"})
    plan = plan_from_recipe(recipe, "dpo")
    s = plan.setup
    assert (s.batch_size, s.max_length, s.attn, s.optim, s.lora_r, s.stage) == (3, 32, "eager", "adamw_8bit", 4, "dpo")
    assert s.weights_dtype == "float32" and not s.autocast
    assert plan.trainable_params == lora_params(plan.shape, 4, ("q_proj",))


def test_cli_prints_the_plan_and_json(tiny_model_dir):
    runner = CliRunner()
    result = runner.invoke(estimate_command, ["--model", str(tiny_model_dir), "--max-length", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "activations" in result.output and "<- peak" in result.output
    result = runner.invoke(estimate_command, ["--model", str(tiny_model_dir), "--json", "--full", "--device", "cpu",
                                              "--budget", "1MiB"])
    data = json.loads(result.output)
    assert data["fits"] is False and data["suggestions"] and data["trainable_params"] == data["shape"]["total_params"]


@pytest.mark.parametrize("args, words", [
    (["--model", "/no/such/dir"], "model not found"),
    (["--budget", "lots"], "--budget"),
    (["--batch-size", "0"], "--batch-size"),
    (["--quantize", "4bit", "--full"], "--quantize needs LoRA"),
    (["--optim", "adamm"], "unknown --optim"),
    (["--ref", "model"], "has no reference model"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_model_dir, args, words):
    if args[0] != "--model":
        args = ["--model", str(tiny_model_dir), *args]
    result = CliRunner().invoke(estimate_command, args)
    assert result.exit_code == 2
    assert words in result.output and "Traceback" not in result.output


def _term(plan, name: str) -> int:
    return next(t.bytes for t in plan.terms if t.name == name)


def test_recipe_checkpointing_auto_changes_the_layout_only_when_the_plan_does_not_fit(tiny_model_dir):
    """Tight, a smaller micro-batch (same effective batch) is predicted faster than recompute; at micro-batch 1
    only checkpointing is left (tests/test_planner_choices.py covers the choice itself)."""
    from align.core.config import ModelSpec, SFTRecipe

    recipe = SFTRecipe(model=ModelSpec(name=str(tiny_model_dir), dtype="float32"),
                       train={"per_device_train_batch_size": 4, "max_length": 256})
    roomy = plan_from_recipe(recipe, "sft", budget=64 * GiB, device="cpu")
    assert roomy.setup.gradient_checkpointing is False and roomy.setup.batch_size == 4 and not roomy.layout
    tight = plan_from_recipe(recipe, "sft", budget=roomy.peak_bytes - 1, device="cpu")
    assert (tight.setup.batch_size, tight.setup.grad_accum, tight.setup.gradient_checkpointing) == (2, 2, False)
    assert tight.peak_bytes < roomy.peak_bytes and tight.layout
    single = recipe.model_copy(update={"train": {"per_device_train_batch_size": 1, "max_length": 256}})
    one = plan_from_recipe(single, "sft", budget=64 * GiB, device="cpu")
    squeezed = plan_from_recipe(single, "sft", budget=one.peak_bytes - 1, device="cpu")
    assert squeezed.setup.gradient_checkpointing is True and squeezed.peak_bytes < one.peak_bytes


def test_optimizer_step_temporaries_by_device(shape):
    from align.train.estimate import optimizer_step_temporaries

    cuda = fp32(device="cuda")
    assert optimizer_step_temporaries(cuda, shape, TOTAL, 4) == 4 * TOTAL  # foreach: every parameter at once
    # CPU: per-tensor loop, twice the largest tensor (a 64 x 128 MLP matrix beats the 100 x 64 embedding)
    assert optimizer_step_temporaries(fp32(), shape, TOTAL, 4) == 2 * 64 * 128 * 4
    assert optimizer_step_temporaries(fp32(optim="adamw_8bit"), shape, TOTAL, 4) == 0
    assert optimizer_step_temporaries(fp32(lora_r=8), shape, 1, 4) == 2 * 8 * (64 + 128) * 4


def test_quantized_cpu_load_keeps_the_mapped_checkpoint_pages(shape):
    cpu = plan_memory(shape, fp32(lora_r=8, quantize="4bit"))
    assert _term(cpu, "mapped checkpoint pages") == TOTAL * 4  # the config declares no dtype: fp32 file
    gpu = plan_memory(shape, fp32(lora_r=8, quantize="4bit", device="cuda"))
    assert all(t.name != "mapped checkpoint pages" for t in gpu.terms)
    assert all(t.name != "mapped checkpoint pages" for t in plan_memory(shape, fp32(lora_r=8)).terms)


def test_full_finetuning_holds_the_head_gradient_beside_the_activations(shape):
    big = fp32(max_length=4096)  # activations dwarf the gradients, but the head's gradient still coexists
    assert _term(plan_memory(shape, big), "gradients") == 100 * 64 * 4
    assert _term(plan_memory(shape, replace(big, lora_r=8)), "gradients") == 0


def test_when_no_single_change_fits_the_suggestion_combines_them(shape):
    setup = fp32(autocast=True, batch_size=8, max_length=512, attn="eager")  # full FT
    smallest = plan_memory(shape, fp32(autocast=True, lora_r=16, quantize="4bit", optim="adamw_8bit",
                                       gradient_checkpointing=True, max_length=512)).peak_bytes
    plan = plan_with_budget(shape, setup, budget=smallest)
    assert len(plan.suggestions) == 1 and plan.suggestions[0]["fits"]
    assert "--gradient-checkpointing" in plan.suggestions[0]["change"] and "--attn sdpa" in plan.suggestions[0]["change"]
    hopeless = plan_with_budget(shape, setup, budget=1)
    assert hopeless.suggestions[0]["fits"] is False
