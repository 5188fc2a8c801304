"""Files as users bring them from other projects (issue 25): LLaMA-Factory's demo sets, OpenAI's content parts,
axolotl's one-conversation fixture and the alignment-handbook's recipes, copied into tests/fixtures/ with their exact
layout (tests/fixtures/README.md), read through the same readers and commands a user runs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from trl import DPOConfig, SFTConfig

from align.cli import main
from align.core.config import DPORecipe, SFTRecipe, build_recipe
from align.core.data import DataError, load_sft_data, read_rows
from align.core.errors import AlignError
from align.core.preferences import load_preference_data
from conftest import write_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
LLAMAFACTORY = FIXTURES / "llamafactory"
HANDBOOK = FIXTURES / "handbook"


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def inspect(path: Path, model: Path, *flags: str):
    return CliRunner().invoke(main, ["data", "inspect", str(path), "--model", str(model), *flags])


def reported(output: str, label: str) -> str:
    """The value after `label:` on its line of `align data inspect`'s report."""
    found = re.search(rf"^{label}:\s+(.*)$", output, re.M)
    assert found, (label, output)
    return found.group(1)


# ---- `align data inspect` on preference and labelled data ------------------------------------------------------------


HH = [  # the char tokenizer gives one token per character and per ChatML marker, so lengths count by hand
    {"chosen": "\n\nHuman: ab\n\nAssistant: cd", "rejected": "\n\nHuman: ab\n\nAssistant: e"},
    {"chosen": "\n\nHuman: abcdef\n\nAssistant: x", "rejected": "\n\nHuman: abcdef\n\nAssistant: yz"},
]


def test_inspect_reads_hh_pairs_with_token_lengths_and_what_max_length_cuts(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "hh.jsonl", HH)
    # prompt "<s>user\nab<e>\n<s>assistant\n": 1+4+1+2+1+1 + 1+9+1 = 21 tokens (25 with "abcdef");
    # completions "cd<e>\n" 4, "e<e>\n" 3, "x<e>\n" 3, "yz<e>\n" 4: pairs of 25/24 and 28/29 tokens
    result = inspect(data, tiny_model_dir, "--max-length", "25")
    assert result.exit_code == 0, result.output
    assert reported(result.output, "format") == "hh (preference)"
    assert reported(result.output, "rows").startswith("2 -> 2 pairs; 0 invalid")
    assert reported(result.output, "prompt tokens") == "p50 21  p95 25  max 25  mean 23.0"
    assert reported(result.output, "chosen tokens") == "p50 3  p95 4  max 4  mean 3.5"
    assert reported(result.output, "rejected tokens") == "p50 3  p95 4  max 4  mean 3.5"
    # 29 > 25 cuts the second pair, whose 25-token prompt leaves no completion token (TRL drops it); 25 fits
    assert reported(result.output, "max length").startswith("25: truncates 1, leaves 1 with nothing to learn")


def test_inspect_names_the_first_bad_row_and_exits_2(tiny_model_dir, tmp_path):
    rows = [HH[0], {"chosen": "\n\nHuman: q\n\nAssistant: ok", "rejected": "\n\nHuman: q\n\nAssistant: "}, HH[1]]
    result = inspect(write_jsonl(tmp_path / "hh.jsonl", rows), tiny_model_dir)
    assert result.exit_code == 2
    assert reported(result.output, "rows").startswith("3 -> 2 pairs; 1 invalid")
    assert "line 2: field 'rejected[1].content': empty completion" in reported(result.output, "first invalid row")
    assert result.stderr.strip().splitlines() == [
        f"error: 1 of 3 rows invalid; the first: {tmp_path / 'hh.jsonl'}: line 2: field 'rejected[1].content': "
        "empty completion"]


def test_inspect_detects_llamafactory_ranking_and_kto_layouts(tiny_model_dir):
    ranking = inspect(LLAMAFACTORY / "dpo_en_demo.json", tiny_model_dir)
    assert ranking.exit_code == 0, ranking.output
    assert reported(ranking.output, "format") == "sharegpt_ranking (preference)"
    assert reported(ranking.output, "rows").startswith("3 -> 3 pairs")
    kto = inspect(LLAMAFACTORY / "kto_en_demo.json", tiny_model_dir)
    assert kto.exit_code == 0, kto.output
    assert reported(kto.output, "format") == "kto (unpaired)"
    assert reported(kto.output, "rows").startswith("3 -> 3 labelled completions (2 desirable, 1 undesirable)")
    tagged = inspect(LLAMAFACTORY / "kto_alpaca_demo.json", tiny_model_dir)
    assert reported(tagged.output, "rows").startswith("2 -> 2 labelled completions (1 desirable, 1 undesirable)")
    forced = inspect(LLAMAFACTORY / "alpaca_preference_demo.json", tiny_model_dir, "--format", "alpaca_ranking")
    assert reported(forced.output, "format") == "alpaca_ranking (preference)"
    unknown = inspect(LLAMAFACTORY / "dpo_en_demo.json", tiny_model_dir, "--format", "sharegpt_rank")
    assert unknown.exit_code == 2 and "did you mean 'sharegpt_ranking'" in unknown.stderr


def test_the_kto_reader_splits_off_the_labelled_last_turn():
    from align.core.preferences import load_unpaired_data

    data = load_unpaired_data(str(LLAMAFACTORY / "kto_en_demo.json"))
    assert data.format == "kto" and [row["label"] for row in data.rows] == [True, True, False]
    assert data.rows[1] == {
        "prompt": [user("Compare the hippocampus and the prefrontal cortex."),
                   bot("The hippocampus forms memories; the prefrontal cortex plans and decides."),
                   user("How does the prefrontal cortex modulate the hippocampus?")],
        "completion": [bot("Through top-down control during encoding and retrieval.")], "label": True}
    tagged = load_unpaired_data(str(LLAMAFACTORY / "kto_alpaca_demo.json"))
    assert tagged.rows[1] == {"prompt": [user("What is 3 + 3?")], "completion": [bot("7")], "label": False}


# ---- LLaMA-Factory, OpenAI and axolotl layouts through the training readers ----------------------------------------


def test_llamafactory_sharegpt_ranking_is_read_as_align_dpo_reads_it():
    from align.train.preference import prepare_preference_data

    path = str(LLAMAFACTORY / "dpo_en_demo.json")
    pairs = load_preference_data(path).pairs
    assert pairs[1] == {"prompt": [{"role": "system", "content": "You are a teacher. Explain the task in simple steps."},
                                   user("Q: Give the part-of-speech tag of the word in curly braces: Phil said "
                                        "{{ . }}\nA:")],
                        "chosen": [bot("The word '.' is a punctuation symbol, so its tag is '.'")],
                        "rejected": [bot('The word is "it", a pronoun, so the tag is PRON.')]}
    assert pairs[2]["prompt"] == [user('Who wrote "Pride and Prejudice"?'), bot("Jane Austen"),
                                  user("Elaborate on the societal norms it depicts.")]
    record = prepare_preference_data(DPORecipe.model_validate({"data": {"path": path}})).record
    assert (record["format"], record["pairs"]) == ("sharegpt_ranking", 3)


def test_llamafactory_alpaca_preference_layout():
    data = load_preference_data(str(LLAMAFACTORY / "alpaca_preference_demo.json"))
    assert data.format == "alpaca_ranking"
    assert data.pairs[1] == {"prompt": [user("Translate to French.\n\nGood morning")], "chosen": [bot("Bonjour")],
                             "rejected": [bot("Bonsoir")]}


def test_content_as_a_list_of_text_parts_is_joined():
    rows, fmt, _ = load_sft_data(str(LLAMAFACTORY / "v1_sft_demo.jsonl"))
    assert fmt == "messages" and rows[2]["messages"] == [
        user("Transform the following sentence using a synonym: The car sped quickly."),
        bot("The car accelerated rapidly.")]
    openai, _, raw = load_sft_data(str(FIXTURES / "openai" / "chat_content_parts.jsonl"), skip_invalid=True)
    assert openai[0]["messages"][1] == user("I fell off my bike today.")
    assert raw.problems == [f"{FIXTURES / 'openai' / 'chat_content_parts.jsonl'}: line 2: field "
                            "'messages[0].content[1]': a 'image_url' part: only text content is supported"]


def test_a_sharegpt_conversation_stored_as_one_json_object_is_one_row():
    rows, fmt, _ = load_sft_data(str(FIXTURES / "axolotl" / "conversation.json"))
    assert fmt == "sharegpt" and len(rows) == 1
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant", "user", "assistant"]


def test_a_bare_json_list_of_turns_is_one_conversation(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "one.json").write_text(json.dumps(turns))
    rows, fmt, _ = load_sft_data(str(tmp_path / "one.json"))
    assert (fmt, rows) == ("messages", [{"messages": turns}])


def test_an_unused_tools_column_is_named_once(caplog):
    with caplog.at_level(logging.WARNING, logger="align"):
        rows, _, _ = load_sft_data(str(LLAMAFACTORY / "glaive_toolcall_en_demo.json"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "column 'tools' (in 1 of 2 rows) is not used" in warnings[0]
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant", "tool", "assistant"]


# ---- datasets: configurations, dataset dirs, --limit -----------------------------------------------------------------


def test_a_dataset_config_is_honoured_where_the_source_has_configs_and_noted_for_a_file(tmp_path, caplog):
    root = tmp_path / "two_configs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        write_jsonl(root / name / "train.jsonl", [{"text": f"from {name}"}])
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {n}\n  data_files:\n  - split: train\n    path: {n}/train.jsonl\n" for n in ("a", "b")) + "---\n")
    assert read_rows(str(root), "train", config="b").rows == [{"text": "from b"}]
    with caplog.at_level(logging.WARNING, logger="align"):
        assert read_rows(str(root / "a" / "train.jsonl"), config="all").rows == [{"text": "from a"}]
    assert "dataset configuration 'all' ignored (a single file has no configurations)" in caplog.text


def test_limit_cuts_a_mixture_before_its_rows_are_checked_as_it_cuts_one_file(tmp_path, char_tokenizer):
    from align.train.sft import prepare_sft_data

    good = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    data = write_jsonl(tmp_path / "d.jsonl", good + [{"prompt": "q", "completion": ""}])  # row 4 is bad
    single = SFTRecipe.model_validate({"data": {"path": str(data), "limit": 3}})
    mixed = SFTRecipe.model_validate({"data": {"mixture": [{"path": str(data)}], "limit": 3}})
    assert prepare_sft_data(mixed, char_tokenizer).record["fingerprint"] == \
        prepare_sft_data(single, char_tokenizer).record["fingerprint"]
    with pytest.raises(DataError, match="line 4: field 'completion': empty content"):
        prepare_sft_data(SFTRecipe.model_validate({"data": {"mixture": [{"path": str(data)}], "limit": 4}}),
                         char_tokenizer)


def test_eval_size_is_a_share_or_a_row_count(tmp_path, char_tokenizer):
    from align.train.sft import prepare_sft_data

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)])
    for size, held in ((0.2, 2), (3, 3)):
        record = prepare_sft_data(SFTRecipe.model_validate({"data": {"path": str(data), "eval_size": size}}),
                                  char_tokenizer).record
        assert (record["rows"], record["eval_rows"]) == (10 - held, held)
    with pytest.raises(DataError, match="eval_size 10 holds out 10 of 10 rows"):
        prepare_sft_data(SFTRecipe.model_validate({"data": {"path": str(data), "eval_size": 10}}), char_tokenizer)
    with pytest.raises(AlignError, match="data.eval_size: Value error, expected a share of the rows below 1"):
        build_recipe(SFTRecipe, None, {"data.eval_size": 2.5})


# ---- flat configs: renamed fields, eval sets ---------------------------------------------------------------------


def flat(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("model_name_or_path: m\n" + text)
    return path


def test_warmup_ratio_maps_onto_warmup_steps_as_a_share(tmp_path):
    recipe = build_recipe(DPORecipe, flat(tmp_path, "warmup_ratio: 0.1\n"), {}, trl_config=DPOConfig)
    assert recipe.train == {"warmup_steps": 0.1}
    sectioned = tmp_path / "recipe.yaml"
    sectioned.write_text("train: {warmup_ratio: 0.25, evaluation_strategy: 'no'}\n")
    assert build_recipe(SFTRecipe, sectioned, {}, trl_config=SFTConfig).train == {"warmup_steps": 0.25,
                                                                                  "eval_strategy": "no"}
    with pytest.raises(AlignError, match=r"train.warmup_ratio: must be >= 0 and < 1, got 1.0"):
        build_recipe(SFTRecipe, flat(tmp_path, "warmup_ratio: 1.0\n"), {}, trl_config=SFTConfig)
    with pytest.raises(AlignError, match=r"train.warmup_ratio \(0.1\) and train.warmup_steps \(5\) both given"):
        build_recipe(SFTRecipe, flat(tmp_path, "warmup_ratio: 0.1\nwarmup_steps: 5\n"), {}, trl_config=SFTConfig)


def test_eval_strategy_without_an_eval_set_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("align.train.preference.load_model", must_not_load)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4)
    result = CliRunner().invoke(main, ["dpo", "--model", str(tiny_model_dir), "--data", str(data), "-o",
                                       str(tmp_path / "out"), "--max-steps", "1", "--set", "train.eval_strategy=steps"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "train.eval_strategy 'steps' needs an eval set" in result.stderr
    with pytest.raises(AlignError, match="dataset_test_split: .*p.jsonl is a single file, which has no 'test' split"):
        build_recipe(SFTRecipe, flat(tmp_path, f"dataset_name: {data}\ndataset_test_split: test\n"
                                               "eval_strategy: epoch\n"), {}, trl_config=SFTConfig)
    with pytest.raises(AlignError, match="dataset_splits: an eval split of 2 mixed datasets is not supported"):
        build_recipe(SFTRecipe, flat(tmp_path, "dataset_mixer: {a: 1.0, b: 0.5}\ndataset_splits: [train, test]\n"
                                               "evaluation_strategy: epoch\n"), {}, trl_config=SFTConfig)


# ---- continuing an adapter -------------------------------------------------------------------------------------


@pytest.fixture
def small_adapter(tiny_model_dir, tmp_path) -> Path:
    """An r=4 adapter on the tiny model, as a finished SFT stage saves one (weights and tokenizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_continuing_an_adapter_records_its_shape_and_refuses_other_lora_values(small_adapter, tmp_path,
                                                                                monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)])
    args = ["sft", "--model", str(small_adapter), "--data", str(data), "--max-steps", "1", "--batch-size", "4",
            "--dtype", "float32", "--report-to", "none"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    trained = record["adapter"].pop("trained_parameters")
    assert record["adapter"] == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                                 "modules_to_save": [], "use_rslora": False, "use_dora": False}
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert trained == {"lora": sum(t.numel() for t in saved.values()), "modules_to_save": 0, "other": 0}
    assert (record["recipe"]["lora"]["r"], record["recipe"]["lora"]["alpha"]) == (4, 8)

    monkeypatch.setattr("align.train.sft.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    refused = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out2"), "--lora-r", "16"])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.startswith(f"error: lora.r=16: the adapter being continued ({small_adapter}) has r=4")
    template = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out3"), "--set",
                                         "model.chat_template={{ messages[0]['content'] }}"])
    assert template.exit_code == 2 and "model.chat_template differs from the template the adapter" in template.stderr
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_a_chat_template_that_cannot_render_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("align.train.sft.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    result = CliRunner().invoke(main, ["sft", "--model", str(tiny_model_dir), "--data", str(data), "-o",
                                       str(tmp_path / "out"), "--set", "model.chat_template={% for m in messages %}"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: model.chat_template: cannot render a conversation (TemplateSyntaxError")


# ---- the alignment-handbook's recipes, as they are ------------------------------------------------------------------


def handbook_recipe(name: str, model: Path, out: Path, tmp_path: Path) -> Path:
    """The trimmed copy of a handbook recipe with its model, datasets and output filled in."""
    text = (HANDBOOK / name).read_text()
    for placeholder, value in (("MODEL_DIR", model), ("DATASETS_DIR", HANDBOOK / "datasets"), ("OUTPUT_DIR", out)):
        text = text.replace(placeholder, str(value))
    path = tmp_path / name.replace("/", "_")
    path.write_text(text)
    return path


def recipe_key(name: str, key: str):
    return yaml.safe_load((HANDBOOK / name).read_text())[key]


def test_the_handbooks_zephyr_qlora_recipes_run_as_they_are(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    sft_name, dpo_name = "zephyr-7b-beta/sft/config_qlora.yaml", "zephyr-7b-beta/dpo/config_qlora.yaml"
    sft = handbook_recipe(sft_name, tiny_model_dir, tmp_path / "sft", tmp_path)
    result = CliRunner().invoke(main, ["sft", "--config", str(sft)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "sft" / "run.json").read_text())
    assert record["template"]["chat_template"] == recipe_key(sft_name, "chat_template")
    assert AutoTokenizer.from_pretrained(tmp_path / "sft").chat_template == recipe_key(sft_name, "chat_template")
    # both mixed splits (6 + 2 rows) trained on, test_split_size: 2 rows held out for eval_strategy: epoch
    assert (record["data"]["rows"], record["data"]["eval_rows"]) == (6, 2)
    assert any("eval_loss" in h for h in record["log_history"])
    assert record["trainer_args"]["warmup_steps"] == recipe_key(sft_name, "warmup_ratio")
    assert record["adapter"]["r"] == recipe_key(sft_name, "lora_r") and record["recipe"]["model"]["quantize"] == "4bit"

    # the DPO recipe on this SFT adapter: its lora_r 128 cannot apply to an r=16 adapter being continued
    on_adapter = handbook_recipe(dpo_name, tmp_path / "sft", tmp_path / "dpo_on_sft", tmp_path)
    refused = CliRunner().invoke(main, ["dpo", "--config", str(on_adapter)])
    assert refused.exit_code == 2 and "lora.r=128, lora.alpha=128.0: the adapter being continued" in refused.stderr
    # and as it is, a fresh r=128 adapter on the base model, evaluated on test_prefs
    dpo = handbook_recipe(dpo_name, tiny_model_dir, tmp_path / "dpo", tmp_path)
    result = CliRunner().invoke(main, ["dpo", "--config", str(dpo)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "dpo" / "run.json").read_text())
    assert (record["data"]["pairs"], record["data"]["eval_pairs"]) == (4, 2)
    assert record["adapter"]["r"] == recipe_key(dpo_name, "lora_r") == 128
    assert record["trainer_args"]["warmup_steps"] == recipe_key(dpo_name, "warmup_ratio")


def test_the_handbooks_smollm2_recipe_runs_as_it_is(tiny_model_dir, tmp_path):
    import importlib.util

    name = "smollm2/sft/config.yaml"
    recipe = handbook_recipe(name, tiny_model_dir, tmp_path / "out", tmp_path)
    if importlib.util.find_spec("wandb") is None:  # the handbook's report_to also names wandb: refused before loading
        with_wandb = tmp_path / "with_wandb.yaml"
        with_wandb.write_text(recipe.read_text().replace("- tensorboard  #", "- wandb\n- tensorboard  #"))
        refused = CliRunner().invoke(main, ["sft", "--config", str(with_wandb)])
        assert refused.exit_code == 2 and "report_to wandb: the wandb package is not installed" in refused.stderr
    result = CliRunner().invoke(main, ["sft", "--config", str(recipe)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["template"]["chat_template"] == recipe_key(name, "chat_template")
    # dataset_config `all` of the dataset dir, its train split trained on and its test split as the eval set
    assert (record["data"]["rows"], record["data"]["eval_rows"]) == (6, 2)
    assert record["recipe"]["data"]["config"] == "all" and record["recipe"]["data"]["eval_split"] == "test"
    assert any("eval_loss" in h for h in record["log_history"])


# ---- align eval ----------------------------------------------------------------------------------------------------


def test_align_eval_exits_non_zero_when_a_requested_task_failed(tiny_model_dir, tmp_path):
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello there"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])  # no reference to score against
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\ntasks:\n  - {{name: ok, kind: perplexity, data: {text}}}\n"
                     f"  - {{name: broken, kind: generate, data: {bad}}}\n")
    result = CliRunner().invoke(main, ["eval", "--suite", str(suite), "--model", f"m={tiny_model_dir}", "-o",
                                       str(tmp_path / "out"), "--dtype", "float32"])
    assert result.exit_code == 1, result.output
    assert "1 task(s) failed, first m/broken: " in result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["results"]["m"]["ok"]["status"] == "ok" and report["results"]["m"]["broken"]["status"] == "failed"


def test_align_eval_exits_non_zero_when_an_lm_eval_task_failed(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello there"}])
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\ntasks:\n  - {{name: ok, kind: perplexity, data: {text}}}\n")
    task = tmp_path / "missing_data.yaml"  # a harness task over a data file that is not there
    task.write_text(f"task: missing_data\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                    f"{tmp_path / 'nope.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
                    "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\nmetric_list:\n  - {metric: perplexity}\n")
    result = CliRunner().invoke(main, ["eval", "--suite", str(suite), "--model", f"m={tiny_model_dir}", "-o",
                                       str(tmp_path / "out"), "--dtype", "float32", "--lm-eval-tasks", str(task)])
    assert result.exit_code == 1, result.output
    results = json.loads((tmp_path / "out" / "report.json").read_text())["results"]["m"]
    assert results["ok"]["status"] == "ok"
    assert [o["status"] for name, o in results.items() if name.startswith("lm-eval:")] == ["failed"]
