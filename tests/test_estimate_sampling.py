"""The planner's sampling moment (grpo): the KV cache of a generation batch, sampling's transients, and reward models.

The small model is tests/test_estimate.py's: a Llama with hidden 64, intermediate 128, 2 layers, 4 heads of 16,
2 KV heads, vocab 100, untied. One position's K and V over both layers: 2 layers x 2 x 2 heads x 16 x 4 B = 512 B.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from align.estimate_cli import estimate_command
from align.train.estimate import RewardModelShape, TrainSetup, plan_memory, reward_model_shape, shape_from_config

TOTAL = 2 * 100 * 64 + 2 * (36_864 + 2 * 64) + 64  # embeddings + head + layers + final norm
KV_PER_POSITION = 512


@pytest.fixture(scope="module")
def shape():
    from transformers import LlamaConfig

    return shape_from_config(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def grpo(**kw) -> TrainSetup:
    """fp32 LoRA GRPO, a generation batch of 4 x 2 = 8 completions of an 8-token prompt and 32 sampled tokens."""
    return TrainSetup(**{"stage": "grpo", "weights_dtype": "float32", "autocast": False, "lora_r": 8,
                         "batch_size": 4, "grad_accum": 2, "max_length": 40, "max_completion_length": 32, **kw})


def term(plan, name: str) -> int:
    return next(t.bytes for t in plan.terms if t.name == name)


def persistent(plan) -> int:
    return sum(t.bytes for t in plan.terms if t.phase == "persistent")


def test_kv_cache_counted_by_hand(shape):
    assert term(plan_memory(shape, grpo()), "KV cache") == 8 * 40 * KV_PER_POSITION
    # generate runs outside the trainer's autocast: fp32 weights keep an fp32 cache; bf16 weights halve it
    assert term(plan_memory(shape, grpo(autocast=True)), "KV cache") == 8 * 40 * KV_PER_POSITION
    assert term(plan_memory(shape, grpo(weights_dtype="bfloat16")), "KV cache") == 8 * 40 * KV_PER_POSITION // 2


def test_kv_cache_grows_linearly_with_the_completion_and_the_generation_batch(shape):
    def kv(completion: int, **kw) -> int:
        return term(plan_memory(shape, grpo(max_length=8 + completion, max_completion_length=completion, **kw)),
                    "KV cache")

    assert kv(64) - kv(32) == kv(96) - kv(64) == 8 * 32 * KV_PER_POSITION
    # the generation batch is batch x steps_per_generation (grad_accum unless set), whatever the micro-batch
    assert kv(32, steps_per_generation=4) == 2 * kv(32)
    assert kv(32, batch_size=2, grad_accum=4) == kv(32)


def test_sampling_working_set_is_the_prefill_or_the_last_step(shape):
    # 8 completions; 100-vocab logits x (4 + 3 x 4) B
    logits = 8 * 100 * 16
    # a 36-token prompt: prefill over 288 tokens through one layer (3 x 128 + 3 x 64 = 576 values each) and K/V
    # repeated to 64 query channels
    prefill = 288 * 576 * 4 + 2 * 288 * 64 * 4
    assert term(plan_memory(shape, grpo(max_completion_length=4)), "sampling working set") == prefill + logits
    # an 8-token prompt: the last step's copy of one layer's cache (32 channels) and its repeat (64), K and V
    decode = 2 * 8 * 40 * (32 + 64) * 4
    assert term(plan_memory(shape, grpo()), "sampling working set") == decode + logits


def test_sampling_is_the_peak_for_long_completions_of_a_large_generation_batch(shape):
    short = plan_memory(shape, grpo(batch_size=1, grad_accum=1))
    assert short.peak_phase == "forward_backward"
    long = plan_memory(shape, grpo(batch_size=1, grad_accum=1, steps_per_generation=64, max_length=8 + 1024,
                                   max_completion_length=1024))
    assert long.peak_phase == "sampling"
    assert long.peak_bytes - persistent(long) > 64 * 1032 * KV_PER_POSITION  # the cache and more


def test_methods_that_do_not_sample_have_no_sampling_moment(shape):
    plan = plan_memory(shape, grpo(stage="sft"))
    assert plan.moments == ("load", "forward_backward", "optimizer_step")
    assert not [t for t in plan.terms if t.phase in ("sampling", "scoring")]


def test_a_reward_model_adds_its_weights_and_its_forward(shape):
    rm = RewardModelShape("rm", shape, adapter_params=1000)
    without, with_rm = plan_memory(shape, grpo()), plan_memory(shape, grpo(reward_models=(rm,)))
    # the classifier drops the 100 x 64 LM head, adds a 64 x 1 score head; fp32
    weights = 4 * (TOTAL - 100 * 64 + 64 + 1000)
    assert term(with_rm, "reward model weights") == weights
    for moment in ("forward_backward", "optimizer_step", "sampling"):
        assert with_rm.phase_total(moment) - without.phase_total(moment) == weights
    # scoring: 8 completions of 40 tokens through one fp32 layer (576 values per token)
    assert term(with_rm, "reward model forward") == 8 * 40 * 576 * 4
    assert with_rm.phase_total("scoring") == persistent(with_rm) + 8 * 40 * 576 * 4
    assert "scoring" in with_rm.moments and "scoring" not in without.moments


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """An `align rm`-shaped dir: a PEFT SEQ_CLS LoRA over the tiny model, with its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    target = tmp_path_factory.mktemp("rm") / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    peft.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    counts = {"total": sum(p.numel() for p in peft.parameters()),
              "trainable": sum(p.numel() for p in peft.parameters() if p.requires_grad)}
    (target / "counts.json").write_text(json.dumps(counts))
    return target


def test_reward_model_shape_counts_what_peft_loads(reward_model_dir):
    counts = json.loads((reward_model_dir / "counts.json").read_text())
    rm = reward_model_shape(str(reward_model_dir))
    assert rm.adapter_params == counts["trainable"]  # LoRA plus PEFT's copy of the score head
    assert rm.params == counts["total"]


def test_cli_plans_sampling_and_a_reward_model(tiny_model_dir, reward_model_dir):
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--stage", "grpo", "--max-length", "64",
            "--max-completion-length", "32"]
    result = CliRunner().invoke(estimate_command, [*args, "--reward", f"rm:{reward_model_dir}", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    names = {t["name"] for t in data["terms"]}
    assert {"KV cache", "sampling working set", "reward model weights", "reward model forward"} <= names
    assert set(data["phases"]) == {"load", "forward_backward", "optimizer_step", "sampling", "scoring"}
    assert data["setup"]["reward_models"] == [str(reward_model_dir)]
    text = CliRunner().invoke(estimate_command, args).output
    assert "KV cache" in text and "total at sampling" in text and "total at scoring" not in text


@pytest.mark.parametrize("args, words", [
    (["--reward", "rm:x"], "samples nothing"),
    (["--stage", "grpo", "--max-length", "32", "--max-completion-length", "32"], "leaves no prompt"),
    (["--stage", "grpo", "--reward", "rm:/no/such/dir"], "no such dir"),
])
def test_cli_bad_sampling_input_is_one_line_exit_2(tiny_model_dir, args, words):
    result = CliRunner().invoke(estimate_command, ["--model", str(tiny_model_dir), "--device", "cpu", *args])
    assert result.exit_code == 2
    assert words in result.output and "Traceback" not in result.output


def test_plan_from_a_grpo_recipe_samples_its_generation_batch(tiny_model_dir, reward_model_dir):
    from align.core.config import GRPORecipe, ModelSpec
    from align.train.estimate import TYPICAL_PROMPT_TOKENS, plan_from_recipe

    recipe = GRPORecipe(model=ModelSpec(name=str(tiny_model_dir), dtype="float32"),
                        train={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                               "max_completion_length": 32},
                        rewards=["pig-latin", f"rm:{reward_model_dir}"])
    plan = plan_from_recipe(recipe, "grpo", "adapter", device="cpu")
    s = plan.setup
    assert (s.max_length, s.max_completion_length, s.generation_batch) == (TYPICAL_PROMPT_TOKENS + 32, 32, 8)
    assert [rm.name for rm in s.reward_models] == [str(reward_model_dir)]
    assert term(plan, "KV cache") == 8 * (TYPICAL_PROMPT_TOKENS + 32) * KV_PER_POSITION
