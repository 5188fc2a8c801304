"""`align eval` on tiny local models: each task kind against numbers the test computes itself, batched
generation against one-at-a-time generation, adapters and references, the report, failures, the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from align.core.errors import AlignError
from align.core.models import resolve_model
from conftest import write_jsonl
from eval.cli import eval_command
from eval.generate import context_continuation_ids, generate_texts, load_for_eval
from eval.reference import find_reward_reference
from eval.run import EvalRequest, parse_model_args, run_eval
from eval.scoring import MetricLoader
from eval.suites import GenerationSpec, SuiteSpec, TaskSpec, load_suite
from eval.tasks import (EvalSettings, PreferenceExample, PreferenceSpans, load_examples, parse_choice,
                        preference_outcome, run_choice, run_perplexity, score_preferences)

PROMPTS = ["hi", "Translate to Pig Latin: the cat", "a much longer prompt than the others, to force left padding"]


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_for_eval("tiny", resolve_model(str(tiny_model_dir)), dtype="float32")


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) B, so the adapted model differs from its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(path)
    return path


def suite_of(*tasks: TaskSpec) -> SuiteSpec:
    return SuiteSpec(name="test", tasks=list(tasks))


# ---- suites --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pig-latin", "retention", "prefs"])
def test_builtin_suites_load_and_their_data_parses(name):
    suite = load_suite(name)
    for task in suite.tasks:
        assert load_examples(task, limit=3)


def retention_items(suite: str | Path) -> dict[str, list]:
    """Task name -> examples, for the retention tasks a suite has (facts, arithmetic, instructions)."""
    return {t.name: load_examples(t) for t in load_suite(suite).tasks
            if t.name in ("facts", "arithmetic", "instructions")}


def item_key(example) -> str:
    """The question as its words (case, spacing and punctuation dropped); an arithmetic item as its numbers and
    answer, so `7 + 5` and `5 plus 7` are the same item."""
    text = example.prompt[-1]["content"]
    numbers = sorted(re.findall(r"\d+", text))
    if numbers and re.fullmatch(r"[\d,]+(\|.*)?", getattr(example, "reference", "")):
        return f"{numbers} -> {example.reference.split('|')[0]}"
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def test_retention_tasks_have_30_items_each_none_repeated_and_none_in_the_dev_suite():
    # 30+ items so a task's bootstrap CI means something; the merge is picked on the dev items, so sharing one
    # with the reported suite would score the pick on its own selection data
    reported = retention_items("retention")
    dev = retention_items(Path(__file__).resolve().parents[1] / "recipes/suites/pig-latin-and-retention.yaml")
    assert set(reported) == set(dev) == {"facts", "arithmetic", "instructions"}
    sizes = {name: len(items) for name, items in reported.items()}
    assert min(sizes.values()) >= 30, sizes
    keys = [item_key(e) for items in reported.values() for e in items]
    assert len(set(keys)) == len(keys), sorted(k for k in keys if keys.count(k) > 1)
    shared = set(keys) & {item_key(e) for items in dev.values() for e in items}
    assert not shared, shared


def test_suite_errors_are_one_line_and_located(tmp_path):
    with pytest.raises(AlignError, match="did you mean 'pig-latin'"):
        load_suite("pig-latn")
    bad_metric = tmp_path / "s.yaml"
    bad_metric.write_text("tasks:\n  - {name: t, kind: generate, data: x.jsonl, metrics: [chrff]}\n")
    with pytest.raises(AlignError, match=r"tasks\.0: .*unknown metric 'chrff'.*did you mean 'chrf'"):
        load_suite(bad_metric)
    unknown_key = tmp_path / "k.yaml"
    unknown_key.write_text("tasks:\n  - {name: t, kind: choice, data: x.jsonl, shots: 5}\n")
    with pytest.raises(AlignError, match=r"tasks\.0\.shots"):
        load_suite(unknown_key)


def test_suites_read_numbers_as_recipes_do(tmp_path):
    # YAML 1.2, as recipes: `1e2` is a number (PyYAML's YAML 1.1 reads it as the string "1e2", not an integer)
    path = tmp_path / "s.yaml"
    path.write_text("tasks:\n  - {name: t, kind: generate, data: x.jsonl, generation: {max_new_tokens: 1e2}}\n")
    assert load_suite(path).tasks[0].generation.max_new_tokens == 100
    path.write_text("tasks:\n  - {name: t, kind: generate, data: x.jsonl\n")
    with pytest.raises(AlignError, match=r"s\.yaml:\d+: invalid YAML"):
        load_suite(path)


def test_relative_data_paths_are_relative_to_the_suite_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "d.jsonl", [{"text": "hello"}])
    (tmp_path / "sub" / "s.yaml").write_text("tasks:\n  - {name: t, kind: perplexity, data: d.jsonl}\n")
    suite = load_suite(tmp_path / "sub" / "s.yaml")
    assert suite.name == "s"
    assert Path(suite.tasks[0].data) == tmp_path / "sub" / "d.jsonl"


def test_bad_rows_name_their_location(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(AlignError, match=r"c\.jsonl: line 1: field 'answer'"):
        load_examples(TaskSpec(name="t", kind="choice", data=str(path)))
    assert parse_choice({"question": "q", "choices": ["a", "b"], "answer": "b"}, "here", None).answer == 1


def test_model_names(tmp_path):
    assert parse_model_args(["sft=runs/sft", "smollm2-135m", "runs/dpo/", "runs/dpo"]) == [
        ("sft", "runs/sft"), ("smollm2-135m", "smollm2-135m"), ("dpo", "runs/dpo/"), ("dpo-2", "runs/dpo")]


# ---- generation ----------------------------------------------------------------------------------------------


def test_batched_greedy_generation_equals_one_at_a_time(tiny_lm):
    settings = GenerationSpec(max_new_tokens=12)
    prompts = PROMPTS + [p.upper() for p in PROMPTS]
    batched = generate_texts(tiny_lm, prompts, settings, batch_size=len(prompts))
    single = [generate_texts(tiny_lm, [p], settings, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len(set(single)) > 1  # a model that always says the same thing would prove nothing


def test_generation_matches_hand_rolled_greedy_decoding(tiny_lm):
    tokenizer, model = tiny_lm.tokenizer, tiny_lm.model
    ids = tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    expected = []
    with torch.inference_mode():
        for _ in range(6):
            token = int(model(input_ids=torch.tensor([ids + expected])).logits[0, -1].argmax())
            if token in tiny_lm.stop_token_ids():
                break
            expected.append(token)
    output = generate_texts(tiny_lm, [PROMPTS[1]], GenerationSpec(max_new_tokens=6))[0]
    assert output == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_sampling_is_seeded(tiny_lm):
    settings = GenerationSpec(max_new_tokens=10, do_sample=True, temperature=1.5)
    first = generate_texts(tiny_lm, PROMPTS, settings, seed=1)
    assert first == generate_texts(tiny_lm, PROMPTS, settings, seed=1)
    assert first != generate_texts(tiny_lm, PROMPTS, settings, seed=2)


# ---- task kinds against independently computed log-probabilities --------------------------------------------


def sequence_logprob(lm, context: str, continuation: str) -> float:
    ids, start = context_continuation_ids(lm.tokenizer, context, continuation)
    with torch.inference_mode():
        logprobs = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_choice_picks_the_option_the_test_scores_highest(tiny_lm, tmp_path):
    rows = [{"question": "Pick one", "choices": ["a", "bb", "ccc"], "answer": 0},
            {"question": "Which?", "choices": ["x", "yy"], "answer": 1},
            {"question": "Another", "choices": ["hello", "h", "world!"], "answer": 2}]
    task = TaskSpec(name="c", kind="choice", data=str(write_jsonl(tmp_path / "c.jsonl", rows)))
    outcome = run_choice(tiny_lm, task, load_examples(task), EvalSettings(batch_size=2), MetricLoader())
    raw_hits, norm_hits = [], []
    for row, sample in zip(rows, outcome.samples):
        mine = [sequence_logprob(tiny_lm, sample["prompt"], c) for c in row["choices"]]
        assert sample["logprobs"] == pytest.approx(mine, abs=1e-4)
        raw_hits.append(float(max(range(len(mine)), key=mine.__getitem__) == row["answer"]))
        norm = [lp / len(c) for lp, c in zip(mine, row["choices"])]
        norm_hits.append(float(max(range(len(norm)), key=norm.__getitem__) == row["answer"]))
    assert outcome.metrics["accuracy"].value == pytest.approx(sum(raw_hits) / 3)
    assert outcome.metrics["accuracy_norm"].value == pytest.approx(sum(norm_hits) / 3)


def test_perplexity_equals_exp_of_the_models_own_loss(tiny_lm, tmp_path):
    texts = ["The cat sat on the mat.", "Pig Latin is a word game."]
    task = TaskSpec(name="p", kind="perplexity", data=str(write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])))
    outcome = run_perplexity(tiny_lm, task, load_examples(task), EvalSettings(batch_size=2), MetricLoader())
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tiny_lm.tokenizer(text)["input_ids"]])
            loss = float(tiny_lm.model(input_ids=ids, labels=ids).loss)  # mean over the len-1 predicted tokens
            total_nll += loss * (ids.shape[1] - 1)
            total_tokens += ids.shape[1] - 1
    assert outcome.metrics["perplexity"].value == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)


def test_preference_margins_and_dpo_rewards_by_hand():
    policy = PreferenceSpans(chosen=[-1.0, -5.0, -2.0], rejected=[-3.0, -4.0, -2.0])
    reference = PreferenceSpans(chosen=[-2.0, -5.0, -3.0], rejected=[-2.0, -2.0, -1.0])
    examples = [PreferenceExample([{"role": "user", "content": "p"}], [{"role": "assistant", "content": "c"}],
                                  [{"role": "assistant", "content": "r"}])] * 3
    outcome = preference_outcome(examples, policy, reference, beta=0.5, seed=0)
    # margins 2, -1, 0 (a tie is not a win); rewards 0.5*((pc-rc)-(pr-rr)) = 0.5*(1+1), 0.5*(0-(-2)), 0.5*(1-(-1))
    assert outcome.metrics["preference_accuracy"].value == pytest.approx(1 / 3)
    assert outcome.metrics["logprob_margin"].value == pytest.approx(1 / 3)
    assert outcome.metrics["reward_accuracy"].value == pytest.approx(1.0)
    assert outcome.metrics["reward_margin"].value == pytest.approx((1.0 + 1.0 + 1.0) / 3)
    assert outcome.samples[1]["scores"]["reward_margin"] == pytest.approx(1.0)


def prefs_rows() -> list[dict]:
    return [{"prompt": "Translate to Pig Latin: the cat", "chosen": "ethay atcay", "rejected": "theay catay"},
            {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": "hi", "rejected": "bye"}]


def test_preference_scores_are_completion_log_probs(tiny_lm, tmp_path):
    task = TaskSpec(name="p", kind="preference", data=str(write_jsonl(tmp_path / "p.jsonl", prefs_rows())))
    examples = load_examples(task)
    spans = score_preferences(tiny_lm, examples, batch_size=3)
    tok = tiny_lm.tokenizer
    for example, chosen in zip(examples, spans.chosen):
        context = tok.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(example.prompt + example.chosen, tokenize=False)
        assert full[len(context):].startswith(example.chosen[-1]["content"] + "<|im_end|>")
        assert chosen == pytest.approx(sequence_logprob(tiny_lm, context, full[len(context):]), abs=1e-4)


def test_reference_from_run_json_disables_the_adapter(tiny_model_dir, adapter_dir, tmp_path):
    import shutil

    policy_dir = tmp_path / "dpo"
    shutil.copytree(adapter_dir, policy_dir)
    (policy_dir / "run.json").write_text(json.dumps({"reference": {"mode": "base", "adapter": None, "model": None},
                                                     "beta": 0.25}))
    data = write_jsonl(tmp_path / "p.jsonl", prefs_rows())
    suite = suite_of(TaskSpec(name="prefs", kind="preference", data=str(data)))
    out = run_eval(EvalRequest(suite=suite, models=[("base", str(tiny_model_dir)), ("dpo", str(policy_dir))],
                               output=tmp_path / "out", dtype="float32"))
    report = json.loads((out / "report.json").read_text())
    base_result, dpo_result = report["results"]["base"]["prefs"], report["results"]["dpo"]["prefs"]
    assert "reward_margin" not in base_result["metrics"]  # a plain model has no reference
    assert dpo_result["reference"]["mode"] == "base" and dpo_result["reference"]["beta"] == 0.25
    base_samples = [json.loads(l) for l in (out / "samples/base/prefs.jsonl").read_text().splitlines()]
    dpo_samples = [json.loads(l) for l in (out / "samples/dpo/prefs.jsonl").read_text().splitlines()]
    for b, d in zip(base_samples, dpo_samples):
        assert d["ref_logprob_chosen"] == pytest.approx(b["logprob_chosen"], abs=1e-4)
        assert d["logprob_chosen"] != pytest.approx(b["logprob_chosen"], abs=1e-4)  # the adapter does change things
        expected = 0.25 * ((d["logprob_chosen"] - b["logprob_chosen"]) - (d["logprob_rejected"] - b["logprob_rejected"]))
        assert d["scores"]["reward_margin"] == pytest.approx(expected, abs=1e-4)
    assert report["deltas"]["dpo"]["prefs"]["logprob_margin"] == pytest.approx(
        dpo_result["metrics"]["logprob_margin"]["value"] - base_result["metrics"]["logprob_margin"]["value"])


def test_reference_adapter_is_switched_in_on_the_same_weights(tiny_model_dir, adapter_dir, tmp_path):
    """Policy = base weights under a second adapter; reference = `adapter_dir` switched in on the same model.
    Its reference log-probs must equal `adapter_dir`'s own log-probs as a policy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    other.save_pretrained(tmp_path / "other")
    plan = find_reward_reference(resolve_model(str(tmp_path / "other")), str(adapter_dir), None)
    assert plan.mode == "adapter" and plan.beta == 0.1
    data = write_jsonl(tmp_path / "p.jsonl", prefs_rows())
    suite = suite_of(TaskSpec(name="prefs", kind="preference", data=str(data)))
    out = run_eval(EvalRequest(suite=suite, models=[("ref", str(adapter_dir)), ("other", str(tmp_path / "other"))],
                               output=tmp_path / "out", reference=str(adapter_dir), dtype="float32"))
    ref = [json.loads(l) for l in (out / "samples/ref/prefs.jsonl").read_text().splitlines()]
    other_samples = [json.loads(l) for l in (out / "samples/other/prefs.jsonl").read_text().splitlines()]
    for r, o in zip(ref, other_samples):
        assert o["ref_logprob_chosen"] == pytest.approx(r["logprob_chosen"], abs=1e-4)
        assert o["ref_logprob_rejected"] == pytest.approx(r["logprob_rejected"], abs=1e-4)
        assert r["scores"]["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # a model against itself


def test_reference_that_is_another_model_is_loaded_separately(tiny_model_dir, tiny_model_dir_b, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", prefs_rows())
    suite = suite_of(TaskSpec(name="prefs", kind="preference", data=str(data)))
    out = run_eval(EvalRequest(suite=suite, models=[("b", str(tiny_model_dir_b)), ("a", str(tiny_model_dir))],
                               output=tmp_path / "out", reference=str(tiny_model_dir_b), dtype="float32"))
    b = [json.loads(l) for l in (out / "samples/b/prefs.jsonl").read_text().splitlines()]
    a = [json.loads(l) for l in (out / "samples/a/prefs.jsonl").read_text().splitlines()]
    for sb, sa in zip(b, a):
        assert sa["ref_logprob_chosen"] == pytest.approx(sb["logprob_chosen"], abs=1e-4)


# ---- the report, failures and the CLI -------------------------------------------------------------------------


def test_run_eval_writes_the_report_and_keeps_going_after_failures(tiny_model_dir, tiny_model_dir_b, tmp_path):
    broken_model = tmp_path / "broken"
    broken_model.mkdir()
    (broken_model / "config.json").write_text("{}")
    bad_rows = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])  # no reference
    suite = suite_of(
        TaskSpec(name="gen", kind="generate", data="builtin:pig-latin", split="seen",
                 metrics=["exact_match", "word_accuracy", "chrf"], generation=GenerationSpec(max_new_tokens=6)),
        TaskSpec(name="bad", kind="generate", data=str(bad_rows)),
        TaskSpec(name="text", kind="perplexity", data=str(write_jsonl(tmp_path / "t.jsonl", [{"text": "abc def"}]))),
    )
    out = run_eval(EvalRequest(suite=suite, models=[("a", str(tiny_model_dir)), ("b", str(tiny_model_dir_b)),
                                                     ("broken", str(broken_model))],
                               output=tmp_path / "out", limit=3, batch_size=2, dtype="float32"))
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"report.json", "report.md", "report.png", "samples/a/gen.jsonl", "samples/a/text.jsonl",
                     "samples/b/gen.jsonl", "samples/b/text.jsonl"}
    assert not (tmp_path / "out.partial").exists()
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["a", "b", "broken"]
    gen = report["results"]["a"]["gen"]
    assert gen["status"] == "ok" and gen["examples"] == 3
    assert set(gen["metrics"]) == {"exact_match", "word_accuracy", "chrf", "corpus_chrf"}
    low, high = gen["metrics"]["chrf"]["ci95"]
    assert low <= gen["metrics"]["chrf"]["value"] <= high
    assert "bad.jsonl: line 1" in report["results"]["a"]["bad"]["error"]
    assert all(o["status"] == "failed" and "did not load" in o["error"] for o in report["results"]["broken"].values())
    assert set(report["deltas"]) == {"b"}
    assert report["deltas"]["b"]["text"]["perplexity"] == pytest.approx(
        report["results"]["b"]["text"]["metrics"]["perplexity"]["value"]
        - report["results"]["a"]["text"]["metrics"]["perplexity"]["value"])
    samples = [json.loads(l) for l in (out / "samples/a/gen.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and set(samples[0]) == {"prompt", "output", "reference", "scores"}
    table = (out / "report.md").read_text()
    assert "| gen | chrf |" in table and "failed" in table


def test_cli_runs_a_suite_file_and_rejects_bad_input(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}] * 2)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: mine\ntasks:\n  - {{name: c, kind: choice, data: {data}}}\n")
    runner = CliRunner()
    result = runner.invoke(eval_command, ["--suite", str(suite), "--model", f"tiny={tiny_model_dir}",
                                          "-o", str(tmp_path / "out"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["models"][0]["name"] == "tiny"

    result = runner.invoke(eval_command, ["--suite", "retentoin", "--model", str(tiny_model_dir), "-o",
                                          str(tmp_path / "out2")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "did you mean 'retention'" in result.output
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()

    result = runner.invoke(eval_command, ["--suite", str(suite), "--model", str(tmp_path / "nope"),
                                          "-o", str(tmp_path / "out3")])
    assert result.exit_code == 2 and "model not found" in result.output
    assert not (tmp_path / "out3.partial").exists()

    result = runner.invoke(eval_command, ["--suite", str(suite), "--model", str(tiny_model_dir),
                                          "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not empty" in result.output


def test_lm_eval_tasks_need_lm_eval(tiny_model_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed; the absent-package path cannot be shown")
    with pytest.raises(AlignError, match="lm-eval"):
        run_eval(EvalRequest(suite="retention", models=[("t", str(tiny_model_dir))], output=tmp_path / "o",
                             lm_eval_tasks=["arc_easy"]))


def test_lm_eval_runs_on_the_loaded_model(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    suite = suite_of(TaskSpec(name="text", kind="perplexity",
                              data=str(write_jsonl(tmp_path / "t.jsonl", [{"text": "abc def"}]))))
    out = run_eval(EvalRequest(suite=suite, models=[("t", str(tiny_model_dir))], output=tmp_path / "o", limit=2,
                               lm_eval_tasks=["arc_easy"], dtype="float32"))
    report = json.loads((out / "report.json").read_text())
    assert "lm-eval:arc_easy" in report["results"]["t"]


@pytest.mark.slow
def test_embedded_model_on_pig_latin_and_prefs(tmp_path):
    """The real model, two examples per task: every metric present and in range."""
    out = run_eval(EvalRequest(suite="pig-latin", models=[("smol", "smollm2-135m")], output=tmp_path / "pl",
                               limit=2, generation={"max_new_tokens": 12}))
    report = json.loads((out / "report.json").read_text())
    for task in ("seen", "unseen"):
        metrics = report["results"]["smol"][task]["metrics"]
        assert (metrics["exact_match"]["value"] * 2).is_integer() and metrics["chrf"]["value"] <= 100
        assert {"exact_match", "word_accuracy", "chrf"} <= set(metrics)
    out = run_eval(EvalRequest(suite="prefs", models=[("smol", "smollm2-135m")], output=tmp_path / "pr", limit=2))
    prefs = json.loads((out / "report.json").read_text())["results"]["smol"]["prefs-seen"]
    assert prefs["status"] == "ok" and prefs["examples"] == 2


def test_a_missing_reference_is_rejected_before_any_output(tiny_model_dir, tmp_path):
    with pytest.raises(AlignError, match="model not found"):
        run_eval(EvalRequest(suite="prefs", models=[("t", str(tiny_model_dir))], output=tmp_path / "o",
                             reference=str(tmp_path / "no-such-adapter")))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_span_scores_from_the_scored_positions_only_equal_full_logits(tiny_model_dir):
    """score_spans runs the LM head only where a batch scores (logits_to_keep); the sums must equal those from
    every position's logits, including a batch whose rows score different, non-overlapping spans."""
    from eval.generate import logits_at, score_spans

    lm = load_for_eval("tiny", resolve_model(str(tiny_model_dir)), dtype="float32")
    ids = lm.tokenizer("the quick brown fox jumps", add_special_tokens=False)["input_ids"]
    sequences = [(ids, 3), (ids[:12], 9), (ids[:20], 1), (ids, len(ids))]  # the last scores nothing
    spans = score_spans(lm, sequences, batch_size=4)
    with torch.no_grad():
        for (seq, start), span in zip(sequences, spans):
            full = torch.log_softmax(lm.model(input_ids=torch.tensor([seq])).logits[0, :-1].float(), dim=-1)
            expected = sum(full[t - 1, seq[t]].item() for t in range(max(start, 1), len(seq)))
            assert span.tokens == len(seq) - max(start, 1)
            assert span.logprob == pytest.approx(expected, abs=1e-4)
        batch = torch.tensor([ids])
        picked = torch.tensor([0, 5, 7])
        assert torch.allclose(logits_at(lm.model, batch, torch.ones_like(batch), picked),
                              lm.model(input_ids=batch).logits[:, picked], atol=1e-5)
