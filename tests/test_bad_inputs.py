"""A corpus of bad inputs across every command: each ends with exit 2, one line on stderr, no traceback, and no
output dir or `.partial` left behind. Each fails before any training, so the corpus runs in seconds.

The README section "Bad input" lists the classes of input covered here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from align.cli import main as align_main
from conftest import write_jsonl
from merge.cli import main as merge_main

SFT_ROWS = [{"prompt": "flip ab", "completion": "ba"}] * 4
PREF_ROWS = [{"prompt": "flip ab", "chosen": "ba", "rejected": "ab"}] * 4


def files(tmp: Path) -> dict[str, Path]:
    """Every bad (and one good) input file the corpus points at."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    made = {
        "good": write_jsonl(tmp / "good.jsonl", SFT_ROWS),
        "prefs": write_jsonl(tmp / "prefs.jsonl", PREF_ROWS),
        "binary": tmp / "binary.jsonl",
        "latin1": tmp / "latin1.csv",
        "scalar": tmp / "scalar.json",
        "list_row": tmp / "list_row.jsonl",
        "empty": tmp / "empty.jsonl",
        "txt": tmp / "data.txt",
        "unknown_format": write_jsonl(tmp / "unknown.jsonl", [{"question": "q", "answer": "a"}]),
        "truncated": tmp / "truncated.parquet",
        "bad_role": write_jsonl(tmp / "bad_role.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}]),
        "yaml_binary": tmp / "binary.yaml",
        "yaml_invalid": tmp / "invalid.yaml",
        "yaml_list": tmp / "list.yaml",
        "yaml_unknown": tmp / "unknown.yaml",
        "yaml_lr_fast": tmp / "lr_fast.yaml",
        "yaml_bad_stage": tmp / "bad_stage.yaml",
        "yaml_stage_train": tmp / "stage_train.yaml",
        "suite_bad_kind": tmp / "suite.yaml",
        "not_a_dir": tmp / "a_file",
    }
    made["binary"].write_bytes(bytes(range(255, -1, -1)) * 4)
    made["latin1"].write_bytes("text\ncaf\u00e9\n".encode("latin-1"))
    made["scalar"].write_text("42")
    made["list_row"].write_text('[1, 2]\n')
    made["empty"].write_text("")
    made["txt"].write_text("hello")
    table = tmp / "whole.parquet"
    pq.write_table(pa.Table.from_pylist(SFT_ROWS), table)
    made["truncated"].write_bytes(table.read_bytes()[:40])
    made["yaml_binary"].write_bytes(b"\xff\xfe\x00garbage\x81")
    made["yaml_invalid"].write_text("train: {learning_rate: [\n")
    made["yaml_list"].write_text("- a\n- b\n")
    made["yaml_unknown"].write_text("trian: {max_steps: 1}\n")
    made["yaml_lr_fast"].write_text("train: {learning_rate: fast}\n")
    made["yaml_bad_stage"].write_text("model: {name: x}\nstages:\n  - {name: s, kind: bake}\n")
    made["yaml_stage_train"].write_text("stages:\n  - {name: s, kind: sft, train: {adam_beta2: fast}}\n")
    made["suite_bad_kind"].write_text("name: s\ntasks:\n  - {name: t, kind: guess, data: builtin:pig-latin}\n")
    made["not_a_dir"].write_text("x")
    return made


# (id, program, args builder, substrings of which at least one must be in the message)
Case = tuple[str, str, Callable[[dict[str, Path], str, Path], list[str]], tuple[str, ...]]


def sft(*extra: str, data: str = "good") -> Callable[[dict[str, Path], str, Path], list[str]]:
    return lambda f, model, out: ["sft", "--model", model, "--data", str(f[data]), "-o", str(out), *extra]


def sft_recipe(recipe: str, *extra: str) -> Callable[[dict[str, Path], str, Path], list[str]]:
    return lambda f, model, out: ["sft", str(f[recipe]), "--model", model, "--data", str(f["good"]), "-o", str(out),
                                  *extra]


def dpo(*extra: str, data: str = "prefs") -> Callable[[dict[str, Path], str, Path], list[str]]:
    return lambda f, model, out: ["dpo", "--model", model, "--data", str(f[data]), "-o", str(out), *extra]


def fixed(*args: str) -> Callable[[dict[str, Path], str, Path], list[str]]:
    """Arguments where `{model}`, `{out}` and `{name}` (a corpus file) are filled in."""
    def build(f: dict[str, Path], model: str, out: Path) -> list[str]:
        names = {k: str(v) for k, v in f.items()}
        return [a.format(model=model, out=out, **names) for a in args]
    return build


CASES: list[Case] = [
    # ---- data files: encoding, structure, truncation ----
    ("sft-binary-jsonl", "align", sft(data="binary"), ("not UTF-8",)),
    ("sft-latin1-csv", "align", sft(data="latin1"), ("not UTF-8",)),
    ("sft-json-scalar", "align", sft(data="scalar"), ("expected a list of objects",)),
    ("sft-jsonl-list-row", "align", sft(data="list_row"), ("expected a JSON object",)),
    ("sft-empty-file", "align", sft(data="empty"), ("no rows",)),
    ("sft-unsupported-suffix", "align", sft(data="txt"), ("unsupported file type",)),
    ("sft-truncated-parquet", "align", sft(data="truncated"), ("not a readable parquet",)),
    ("sft-undetectable-format", "align", sft(data="unknown_format"), ("cannot detect the data format",)),
    ("sft-bad-role", "align", sft(data="bad_role"), ("unknown role 'bot'",)),
    ("sft-data-missing", "align", fixed("sft", "--model", "{model}", "--data", "{out}.jsonl", "-o", "{out}"),
     ("data file not found",)),
    ("sft-data-is-dir", "align", fixed("sft", "--model", "{model}", "--data", "{model}", "-o", "{out}"),
     ("is a directory", "neither a local file", "data")),
    ("sft-unknown-format-flag", "align", sft("--format", "chatml"), ("unknown --format",)),
    # ---- flags: types and ranges ----
    ("sft-max-length-0", "align", sft("--max-length", "0"), ("max_length", "--max-length")),
    ("sft-batch-size-0", "align", sft("--batch-size", "0"), ("per_device_train_batch_size", "--batch-size")),
    ("sft-lr-negative", "align", sft("--lr", "-1"), ("learning_rate", "--lr")),
    ("sft-epochs-0", "align", sft("--epochs", "0"), ("num_train_epochs", "--epochs")),
    ("sft-grad-accum-0", "align", sft("--grad-accum", "0"), ("gradient_accumulation_steps", "--grad-accum")),
    ("sft-max-steps-0", "align", sft("--max-steps", "0"), ("max_steps", "--max-steps")),
    ("sft-warmup-fraction-above-1", "align", sft("--warmup", "1.5"), ("warmup", "--warmup")),
    ("sft-lora-r-0", "align", sft("--lora-r", "0"), ("lora.r", "--lora-r")),
    ("sft-lora-dropout-1", "align", sft("--lora-dropout", "1"), ("dropout", "--lora-dropout")),
    ("sft-eval-size-above-1", "align", sft("--eval-size", "1.5"), ("eval_size", "--eval-size")),
    ("sft-limit-0", "align", sft("--limit", "0"), ("limit", "--limit")),
    ("sft-save-steps-0", "align", sft("--save-steps", "0"), ("save_steps", "--save-steps")),
    # ---- the train passthrough ----
    ("sft-recipe-lr-fast", "align", sft_recipe("yaml_lr_fast"), ("train.learning_rate",)),
    ("sft-set-scheduler-unknown", "align", sft("--set", "train.lr_scheduler_type=fastest"), ("train.lr_scheduler_type",)),
    ("sft-set-bool-maybe", "align", sft("--set", "train.bf16=maybe"), ("train.bf16",)),
    ("sft-set-weight-decay-negative", "align", sft("--set", "train.weight_decay=-0.1"), ("train.weight_decay",)),
    ("sft-set-adam-beta2-1", "align", sft("--set", "train.adam_beta2=1.0"), ("train.adam_beta2",)),
    ("sft-set-unknown-key", "align", sft("--set", "train.learnig_rate=1"), ("unknown key 'train.learnig_rate'",)),
    ("sft-set-no-equals", "align", sft("--set", "train.seed"), ("expected section.key=value",)),
    ("sft-packing-leaky-attention", "align", sft("--packing", "--set", "model.attn=paged_attention"), ("packing",)),
    ("sft-bf16-and-fp16", "align", sft("--set", "train.bf16=true", "--set", "train.fp16=true"), ("bf16",)),
    ("sft-dry-run-shows-the-same-error", "align", sft_recipe("yaml_lr_fast", "--dry-run"), ("train.learning_rate",)),
    # ---- recipes ----
    ("sft-recipe-binary", "align", sft_recipe("yaml_binary"), ("not UTF-8", "invalid YAML")),
    ("sft-recipe-invalid-yaml", "align", sft_recipe("yaml_invalid"), ("invalid YAML",)),
    ("sft-recipe-not-a-mapping", "align", sft_recipe("yaml_list"), ("mapping",)),
    ("sft-recipe-unknown-section", "align", sft_recipe("yaml_unknown"), ("unknown key 'trian'",)),
    ("sft-model-missing", "align", fixed("sft", "--model", "{out}/none", "--data", "{good}", "-o", "{out}"),
     ("model not found",)),
    ("sft-loftq-with-4bit", "align", sft("--lora-init", "loftq", "--quantize", "4bit"), ("drop --quantize",)),
    # ---- dpo ----
    ("dpo-beta-0", "align", dpo("--beta", "0"), ("beta",)),
    ("dpo-prompt-longer-than-sequence", "align", dpo("--max-prompt-length", "2000", "--max-length", "1000"),
     ("max_prompt_length",)),
    ("dpo-label-smoothing-0.7", "align", dpo("--label-smoothing", "0.7"), ("label_smoothing", "--label-smoothing")),
    ("dpo-ref-unknown", "align", dpo("--ref", "teacher"), ("ref",)),
    ("dpo-binary-data", "align", dpo(data="binary"), ("not UTF-8",)),
    ("dpo-sft-data", "align", dpo(data="good"), ("cannot detect the data format",)),
    ("dpo-adapter-not-an-adapter", "align", dpo("--adapter", "{placeholder}"), ("adapter", "not")),
    # ---- eval, estimate, data inspect, run ----
    ("eval-suite-missing", "align", fixed("eval", "--suite", "no-such-suite", "--model", "m={model}", "-o", "{out}"),
     ("neither a YAML file nor a built-in suite",)),
    ("eval-suite-binary", "align", fixed("eval", "--suite", "{yaml_binary}", "--model", "m={model}", "-o", "{out}"),
     ("not UTF-8", "invalid YAML")),
    ("eval-suite-bad-kind", "align", fixed("eval", "--suite", "{suite_bad_kind}", "--model", "m={model}", "-o", "{out}"),
     ("kind",)),
    ("estimate-batch-size-0", "align", fixed("estimate", "--model", "{model}", "--batch-size", "0"), ("--batch-size",)),
    ("estimate-budget-words", "align", fixed("estimate", "--model", "{model}", "--budget", "lots"), ("--budget",)),
    ("inspect-binary", "align", fixed("data", "inspect", "{binary}", "--model", "{model}"), ("not UTF-8",)),
    ("inspect-missing", "align", fixed("data", "inspect", "{out}.jsonl", "--model", "{model}"), ("not found",)),
    ("run-recipe-binary", "align", fixed("run", "{yaml_binary}", "-o", "{out}"), ("not UTF-8", "invalid YAML")),
    ("run-stage-train-value", "align", fixed("run", "{yaml_stage_train}", "-o", "{out}"),
     ("stage 's': train.adam_beta2: expected a number, got 'fast'",)),
    ("run-unknown-stage-kind", "align", fixed("run", "{yaml_bad_stage}", "-o", "{out}"), ("kind", "bake")),
    # ---- merge ----
    ("merge-linear-weights-words", "merge", fixed("linear", "{model}", "{model}", "--weights", "a,b", "-o", "{out}"),
     ("--weights",)),
    ("merge-slerp-t-above-1", "merge", fixed("slerp", "{model}", "{model}", "-t", "1.5", "-o", "{out}"), ("-t 1.5",)),
    ("merge-linear-missing-model", "merge", fixed("linear", "{model}", "{out}/none", "-o", "{out}"), ("not found",)),
    ("merge-stack-bad-slice", "merge", fixed("stack", "--slice", "bad", "-o", "{out}"), ("--slice",)),
    ("merge-ties-density-2", "merge", fixed("ties", "{model}", "{model}", "--base", "{model}", "--density", "2",
                                            "-o", "{out}"), ("density",)),
    ("merge-config-binary", "merge", fixed("config", "{yaml_binary}", "-o", "{out}"), ("not UTF-8", "invalid YAML")),
    ("merge-config-scalar", "merge", fixed("config", "{scalar}", "-o", "{out}"), ("mergekit configuration",)),
    ("merge-output-is-a-file", "merge", fixed("linear", "{model}", "{model}", "-o", "{not_a_dir}"),
     ("not a directory",)),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return files(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("name,program,build,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(name, program, build, expected, corpus, tiny_model_dir,
                                                         tmp_path):
    out = tmp_path / "out"
    corpus = {**corpus, "placeholder": corpus["good"].parent}  # a dir without adapter_config.json
    args = [a.replace("{placeholder}", str(corpus["placeholder"])) for a in build(corpus, str(tiny_model_dir), out)]
    result = CliRunner().invoke(align_main if program == "align" else merge_main, args)
    stderr = result.stderr
    assert result.exit_code == 2, (name, result.output, repr(result.exception))
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), (name, stderr)
    assert "Traceback" not in result.output, (name, result.output)
    assert any(e in stderr for e in expected), (name, expected, stderr)
    assert not out.exists() and not (tmp_path / "out.partial").exists(), name
    assert corpus["not_a_dir"].is_file()


def test_the_corpus_covers_every_command():
    commands = {(program, build(files_stub(), "M", Path("O"))[0]) for _, program, build, _ in CASES}
    assert {("align", c) for c in ("sft", "dpo", "eval", "estimate", "data", "run")} <= commands
    assert {("merge", c) for c in ("linear", "slerp", "stack", "ties", "config")} <= commands
    assert len(CASES) >= 40


def files_stub() -> dict[str, Path]:
    return {name: Path(name) for name in ("good", "prefs", "binary", "latin1", "scalar", "list_row", "empty", "txt",
                                           "unknown_format", "truncated", "bad_role", "yaml_binary", "yaml_invalid",
                                           "yaml_list", "yaml_unknown", "yaml_lr_fast", "yaml_bad_stage", "yaml_stage_train",
                                           "suite_bad_kind", "not_a_dir")}


def test_recipe_lr_fast_fails_before_the_model_loads(corpus, tiny_model_dir, tmp_path, monkeypatch):
    """The issue's case: refused at the edge, so neither the model nor the data is touched."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("align.train.sft.load_model", must_not_load)
    monkeypatch.setattr("align.train.sft.resolve_model", must_not_load)
    result = CliRunner().invoke(align_main, ["sft", str(corpus["yaml_lr_fast"]), "--model", str(tiny_model_dir),
                                             "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "train.learning_rate" in result.stderr and "'fast'" in result.stderr
    assert json.dumps(result.stderr.strip())  # one printable line
