"""`align grpo`: a 2-step run through the CLI (adapter, run.json with each reward's mean and spread per step), the
built-in rewards on hand-made completions, a user's reward loaded by path with each way it can be wrong, the step-0
check from an SFT adapter (and a wrong reference failing it), and the inputs refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import reference_adapter_dropped, write_jsonl

from align.cli import main
from align.core.config import GRPORecipe
from align.core.errors import AlignError
from align.core.models import cpu_runs_bf16_fast
from align.train.grpo import check_rewards_apply, plan_grpo_reference, prepare_prompt_data, read_prompts, run_grpo
from align.train.rewards import parse_reward, parse_rewards

SENTENCES = ["the cat", "eat it", "a dog", "string queen"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: torch's worker threads only wait for each other (measured: the
    step-0 check took 35 s with the default threads under load, 0.3 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pig_latin_prompts(path: Path) -> Path:
    return write_jsonl(path, [{"prompt": f"Translate to Pig Latin: {s}"} for s in SENTENCES])


@pytest.fixture(scope="module")
def random_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """An SFT-like adapter whose B matrices are random (not zero), so it changes every log-prob: the reference it
    makes differs from the base by whole nats, and a check that confused the two would fail."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "sft")


def make_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter with random B (so it changes the model) saved with its base's tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      init_lora_weights=False))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


def grpo_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["grpo", "--model", str(model), "--dtype", "float32", "--data", str(data), "--max-steps", "2",
            "--batch-size", "4", "--num-generations", "2", "--max-completion-length", "6", "--report-to", "none",
            "-o", str(out), *extra]


# ---- end to end ----------------------------------------------------------------------------------------------------


def test_two_steps_from_an_sft_adapter_write_an_adapter_and_reward_stats(tiny_model_dir, random_adapter, tmp_path):
    """beta > 0 against the frozen SFT adapter: the step-0 check runs (KL 0, ratio 1), then two steps, and run.json
    holds each reward's mean and spread for each step, under the names and weights given."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, grpo_args(
        tiny_model_dir, pig_latin_prompts(tmp_path / "p.jsonl"), out, "--adapter", str(random_adapter),
        "--ref", "adapter", "--beta", "0.1", "--reward", "pig-latin", "--reward", "length:2",
        "--reward-weights", "1,0.5"))
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file() and not (tmp_path / "out.partial").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "grpo" and record["beta"] == 0.1 and record["reference"]["mode"] == "adapter"
    assert record["rewards"] == [{"name": "pig_latin", "reward": "pig-latin", "weight": 1.0},
                                 {"name": "length", "reward": "length:2", "weight": 0.5}]
    check = record["step0_check"]
    assert check["passed"] and check["kl"] == 0.0 and check["max_logp_difference"] == 0.0
    assert check["clip_ratio/region_mean"] == 0.0 and check["completions"] == 4
    for name in ("pig_latin", "length"):
        assert [p["step"] for p in record["reward_stats"][name]] == [1, 2]
        assert all(p["mean"] is not None and p["std"] >= 0 for p in record["reward_stats"][name])
    # length:2 with 6 tokens at most: where every completion has the same length L (TRL logs min and max), the
    # reward is -(L - 2)/6 for each, so its mean is that and its spread 0
    steps = {h["step"]: h for h in record["log_history"] if "completions/min_length" in h}
    for point in record["reward_stats"]["length"]:
        logged = steps[point["step"]]
        if logged["completions/min_length"] == logged["completions/max_length"]:
            expected = -max(0.0, logged["completions/max_length"] - 2) / 6
            assert point["mean"] == pytest.approx(expected, abs=1e-6) and point["std"] == pytest.approx(0, abs=1e-6)
        assert -4 / 6 - 1e-6 <= point["mean"] <= 0
    assert record["generation"]["seconds"] > 0 and 0 < record["generation"]["share_of_train"] < 1
    assert record["generation"]["backend"] == "transformers" and "vllm" not in record["generation"]
    assert record["num_generations"] == 2 and record["data"]["prompts"] == 4


def test_a_wrong_reference_fails_step0(tiny_model_dir, random_adapter, tmp_path, monkeypatch):
    """TRL's frozen "ref" copy removed: its reference forward then runs the base, which the check must catch."""
    reference_adapter_dropped(monkeypatch)
    recipe = GRPORecipe.model_validate({
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"path": str(pig_latin_prompts(tmp_path / "p.jsonl"))}, "adapter": str(random_adapter),
        "ref": "adapter", "train": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 2,
                                    "max_completion_length": 4, "beta": 0.1},
        "report_to": "none", "output": str(tmp_path / "out")})
    with pytest.raises(AlignError, match=r"step-0 check failed for --ref adapter: .*kl [0-9.]+"):
        run_grpo(recipe, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


class RowCounter:
    """Stands in for the model handed to TRL's log-prob forward: counts the rows of each call, runs the model."""

    def __init__(self, model: object, rows: list[int]) -> None:
        self.model, self.rows = model, rows

    def __call__(self, **inputs: object) -> object:
        self.rows.append(int(inputs["input_ids"].shape[0]))
        return self.model(**inputs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)


def test_every_log_prob_forward_runs_on_the_per_device_batch(tiny_model_dir, random_adapter, tmp_path, monkeypatch):
    """bf16 kernels round differently for a different number of rows, so the step-0 check is exact only when its
    forwards (policy, sampling policy, TRL's reference) take the slices training takes: the per-device batch, not the
    generation batch (4 rows here) or TRL's eval batch (8)."""
    from trl import GRPOTrainer

    rows: list[int] = []
    scored = GRPOTrainer._get_per_token_logps_and_entropies
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies",
                        lambda self, model, *args, **kwargs: scored(self, RowCounter(model, rows), *args, **kwargs))
    result = CliRunner().invoke(main, grpo_args(
        tiny_model_dir, pig_latin_prompts(tmp_path / "p.jsonl"), tmp_path / "out", "--adapter", str(random_adapter),
        "--ref", "adapter", "--beta", "0.1", "--reward", "pig-latin", "--max-steps", "1", "--batch-size", "2",
        "--grad-accum", "2"))
    assert result.exit_code == 0, result.output
    # the check: sampling policy, reference, two loss slices; then the step: reference, two loss slices
    assert len(rows) >= 7 and set(rows) == {2}, rows


@pytest.mark.slow
@pytest.mark.skipif(not cpu_runs_bf16_fast() and not torch.cuda.is_available(),
                    reason="bf16 matmuls are emulated on this CPU (no AVX512-BF16/AMX)")
def test_the_step0_check_passes_exactly_under_bf16_autocast_on_the_embedded_model(tmp_path):
    """The false refusal this reproduces: on the embedded model under bf16 autocast, the check once scored the policy on
    the whole generation batch (16 rows) and TRL the reference in slices of its eval batch (8), and measured 0.1 nats
    between a model and itself; training itself scores both in slices of the per-device batch (4)."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "grpo", "--dtype", "bf16-autocast", "--data", "builtin:pig-latin", "--limit", "8", "--reward", "pig-latin",
        "--ref", "base", "--beta", "0.04", "--max-steps", "1", "--batch-size", "4", "--grad-accum", "4",
        "--num-generations", "4", "--max-completion-length", "16", "--report-to", "none", "-o", str(out)])
    assert result.exit_code == 0, result.output
    check = json.loads((out / "run.json").read_text())["step0_check"]
    assert check["passed"] and check["kl"] == 0.0 and check["max_logp_difference"] == 0.0, check


def test_a_user_reward_that_raises_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def broken(prompts, completions, **kwargs):\n    raise KeyError('score')\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, grpo_args(tiny_model_dir, pig_latin_prompts(tmp_path / "p.jsonl"), out,
                                                "--ref", "base", "--reward", f"{rewards}:broken"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"error: reward {rewards}:broken raised KeyError: 'score'"
    assert not out.exists() and not (tmp_path / "out.partial").exists()


# ---- refused before any model loads --------------------------------------------------------------------------------


def test_num_generations_that_does_not_divide_the_batch_is_refused_first(tmp_path):
    """The model does not even exist: the batch is checked before anything loads."""
    result = CliRunner().invoke(main, grpo_args(tmp_path / "no-model", tmp_path / "no-data.jsonl", tmp_path / "out",
                                                "--num-generations", "3"))
    assert result.exit_code == 2
    assert "--num-generations 3 does not divide the batch of 4 completions" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ref, message", [
    ("precompute", "--ref precompute: GRPO samples its completions during training"),
    ("model:/elsewhere", "--ref model:/elsewhere: TRL's GRPOTrainer takes no separate reference model"),
])
def test_references_that_cannot_apply_are_one_line(tiny_model_dir, tmp_path, ref, message):
    result = CliRunner().invoke(main, grpo_args(tiny_model_dir, pig_latin_prompts(tmp_path / "p.jsonl"),
                                                tmp_path / "out", "--ref", ref))
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "out").exists()


def test_beta_zero_has_no_reference_and_refuses_one(tiny_model_dir, random_adapter):
    recipe = GRPORecipe.model_validate({"model": {"name": str(tiny_model_dir)}, "adapter": str(random_adapter)})
    policy, reference = plan_grpo_reference(recipe, beta=0.0)
    assert reference is None and policy.adapter == random_adapter
    with pytest.raises(AlignError, match="--ref adapter with beta 0: there is no KL term"):
        plan_grpo_reference(recipe.model_copy(update={"ref": "adapter"}), beta=0.0)
    _, reference = plan_grpo_reference(recipe, beta=0.1)
    assert reference is not None and reference.mode == "adapter"
    assert "precompute does not apply to online samples" in reference.reason
    with pytest.raises(AlignError, match="--ref base with an SFT adapter: the reference would be the base model"):
        plan_grpo_reference(recipe.model_copy(update={"ref": "base"}), beta=0.1)


def test_reward_weights_must_match_the_rewards():
    with pytest.raises(AlignError, match="--reward-weights: 1 weights for 2 rewards"):
        parse_rewards(["pig-latin", "exact"], [1.0], 8)
    assert [r.__name__ for r in parse_rewards(["regex:a", "regex:b", "exact"], None, 8)] == ["regex", "regex_2",
                                                                                           "exact"]


# ---- the built-in rewards, by hand -----------------------------------------------------------------------------------


def test_pig_latin_reward_is_word_accuracy_by_the_house_rule():
    """the string eat -> ethay ingstray eatway (align/core/demo.py's rule)."""
    reward = parse_reward("pig-latin", 8)
    prompt = [{"role": "user", "content": "Translate to Pig Latin: the string eat"}]
    completions = ["ethay ingstray eatway", "ethay ingstray eatay", " ethay  ingstray eatway extra", "",
                   [{"role": "assistant", "content": "ethay ingstrya"}], "ingstray ethay eatway"]
    assert reward([prompt] * len(completions), completions) == pytest.approx([1, 2 / 3, 3 / 4, 0, 1 / 3, 1 / 3])
    assert reward(["Say hello"], ["hello"]) == [None]


def test_exact_regex_and_length_rewards():
    exact = parse_reward("exact", 8)
    assert exact(["p"] * 3, ["  eatway\n", "eatwa", "x"], answer=["eatway", "eatway", None]) == [1.0, 0.0, None]
    regex = parse_reward("regex:<a>.*</a>", 8)
    assert regex(["p"] * 3, ["<a>x\ny</a>", "so <a>x</a>", " <a></a> "]) == [1.0, 0.0, 1.0]
    length = parse_reward("length:4", 8)
    ids = [[1] * n for n in (2, 4, 6, 8)]
    assert length(["p"] * 4, ["c"] * 4, completion_ids=ids) == [0.0, 0.0, -0.25, -0.5]
    assert parse_reward("length", 8)(["p"], ["c"], completion_ids=[[1] * 8]) == [-1.0]


@pytest.mark.parametrize("spec, message", [
    ("regex:(", "--reward regex:(: not a regular expression"),
    ("length:x", "--reward length:x: length:N takes a whole number"),
    ("exakt", "--reward exakt: unknown reward (did you mean 'exact'?)"),
])
def test_bad_builtin_rewards_are_one_line(spec, message):
    with pytest.raises(AlignError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_reward(spec, 8)


def test_builtin_rewards_that_cannot_score_a_row_are_refused_before_training(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Translate to Pig Latin: eat", "answer": "eatway"},
                                              {"prompt": "Say hi"}])
    splits = prepare_prompt_data(GRPORecipe.model_validate({"data": {"path": str(data)}}))
    assert splits.train[0]["answer"] == "eatway" and splits.train[1]["answer"] is None
    with pytest.raises(AlignError, match=r"d.jsonl: line 2: --reward exact needs a reference answer"):
        check_rewards_apply(parse_rewards(["exact"], None, 8), splits)
    with pytest.raises(AlignError, match=r"d.jsonl: line 2: --reward pig-latin needs the demo task's prompts"):
        check_rewards_apply(parse_rewards(["pig-latin"], None, 8), splits)


def test_sft_conversations_give_prompt_and_reference_answer(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Translate to Pig Latin: eat"},
        {"role": "assistant", "content": "eatway"}]}])
    splits = prepare_prompt_data(GRPORecipe.model_validate({"data": {"path": str(data)}}))
    assert splits.train == [{"prompt": [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "Translate to Pig Latin: eat"}],
                             "answer": "eatway"}]
    assert splits.record["format"] == "messages" and splits.record["with_answer"] == 1


@pytest.mark.parametrize("fmt,row", [
    ("hh", {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: Translate to Pig Latin: eat\n\nAssistant: eatway",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: Translate to Pig Latin: eat\n\nAssistant: eatay"}),
    ("implicit", {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "Translate to Pig Latin: eat"},
                             {"role": "assistant", "content": "eatway"}],
                  "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "Translate to Pig Latin: eat"},
                               {"role": "assistant", "content": "eatay"}]}),
    ("sharegpt_ranking", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                            {"from": "human", "value": "Translate to Pig Latin: eat"}],
                          "chosen": {"from": "gpt", "value": "eatway"}, "rejected": {"from": "gpt", "value": "eatay"}}),
])
def test_preference_rows_give_their_shared_prompt_and_the_chosen_answer(tmp_path, fmt, row):
    """Preference data (what users have) as GRPO prompts or a judged pairs stage's prompts: everything before the
    answers is the prompt, the chosen answer the reference (for `exact`)."""
    splits = read_prompts(str(write_jsonl(tmp_path / "pairs.jsonl", [row])))
    assert splits.record["format"] == fmt and splits.record["with_answer"] == 1
    assert splits.train == [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                        {"role": "user", "content": "Translate to Pig Latin: eat"}],
                             "answer": "eatway"}]


# ---- a user's reward function, loaded by path ------------------------------------------------------------------------


USER_REWARDS = """
import math

def good(prompts, completions, completion_ids, **kwargs):
    return [float(len(c)) for c in completions]

def raises(prompts, completions, **kwargs):
    return 1 / 0

def short(prompts, completions, **kwargs):
    return [1.0]

def nan(prompts, completions, **kwargs):
    return [math.nan for _ in completions]

def scalar(prompts, completions, **kwargs):
    return 1.0

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_a_user_reward_is_loaded_by_path_and_named_by_its_function(user_file):
    reward = parse_reward(f"{user_file}:good", 8)
    assert reward.__name__ == "good"
    assert reward(["p", "p"], ["ab", "abcd"], completion_ids=[[1], [2]]) == [2.0, 4.0]


@pytest.mark.parametrize("function, message", [
    ("raises", "reward {file}:raises raised ZeroDivisionError: division by zero"),
    ("short", "reward {file}:short returned 1 values for 2 completions"),
    ("nan", "reward {file}:nan returned nan for completion 0"),
    ("scalar", "reward {file}:scalar did not return a list"),
])
def test_a_user_reward_that_misbehaves_is_one_line_naming_file_and_function(user_file, function, message):
    reward = parse_reward(f"{user_file}:{function}", 8)
    with pytest.raises(AlignError) as caught:
        reward(["p", "p"], ["a", "b"], completion_ids=[[1], [2]])
    assert str(caught.value).startswith(message.format(file=user_file)) and "\n" not in str(caught.value)


def test_user_reward_files_that_cannot_load_are_one_line(user_file, tmp_path):
    with pytest.raises(AlignError, match=r"missing\.py:f: .*missing\.py not found"):
        parse_reward(f"{tmp_path / 'missing.py'}:f", 8)
    with pytest.raises(AlignError, match=r"my_rewards\.py:goood: .* has no function 'goood' \(did you mean 'good'\?\)"):
        parse_reward(f"{user_file}:goood", 8)
    with pytest.raises(AlignError, match=r"my_rewards\.py:NOT_A_FUNCTION: NOT_A_FUNCTION is a int, not a function"):
        parse_reward(f"{user_file}:NOT_A_FUNCTION", 8)
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    with pytest.raises(AlignError, match=r"broken\.py:f: importing .*broken\.py raised ModuleNotFoundError"):
        parse_reward(f"{broken}:f", 8)


def test_a_pipeline_grpo_stage_continues_an_sft_stage(tmp_path):
    from align.pipeline.run import load_pipeline
    from align.pipeline.stages import stage_refs

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {name: sft, kind: sft}\n"
                      "  - {name: rl, kind: grpo, adapter: sft, rewards: [pig-latin, 'regex:[a-z ]+'],\n"
                      "     train: {num_generations: 2, beta: 0.0, reward_weights: [1.0, 0.2]}}\n")
    stage = load_pipeline(recipe).stages[1]
    assert stage.kind == "grpo" and stage.rewards == ["pig-latin", "regex:[a-z ]+"] and stage_refs(stage) == ["sft"]
    recipe.write_text("stages:\n  - {name: rl, kind: grpo, train: {num_generation: 2}}\n")
    with pytest.raises(AlignError, match=r"unknown key 'train.num_generation' \(did you mean 'num_generations'\?\)"):
        load_pipeline(recipe)
