"""The lm-eval bridge on a local task: lm-evaluation-harness and the project's `choice` task are two implementations
of log-likelihood multiple choice, so on the same items they must give the same log-likelihoods and accuracies.

The items make both score the same strings: the model's chat template renders the question verbatim (the `choice`
task always renders through the template; lm-eval, without `apply_chat_template`, uses `doc_to_text` as it is),
questions end without whitespace (lm-eval moves trailing context whitespace into the continuation), and the task
YAML's `target_delimiter` is empty with the space written into each choice (the `choice` task adds no delimiter).
README "lm-eval and the choice task" explains what differs when these do not hold."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import save_tiny_model, write_jsonl

pytest.importorskip("lm_eval")

VERBATIM = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
ITEMS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a large city"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " 4", " five"], "answer": 1},
    {"question": "The sky on a clear day is", "choices": [" blue", " green", " made of cheese"], "answer": 0},
    {"question": "Water freezes at", "choices": [" 0 C", " 100 C", " room temperature"], "answer": 0},
    {"question": "A week has", "choices": [" seven days", " 7", " ten days"], "answer": 0},
    {"question": "Cats say", "choices": [" meow", " woof", " moo"], "answer": 0},
    {"question": "The opposite of hot is", "choices": [" cold", " warm", " very very hot"], "answer": 0},
    {"question": "Pig Latin for 'pig' is", "choices": [" igpay", " pigay", " ipgay"], "answer": 0},
    {"question": "The first letter of the alphabet is", "choices": [" a", " z", " the letter b"], "answer": 0},
    {"question": "Ten minus three is", "choices": [" seven", " 7", " three"], "answer": 1},
    {"question": "Fish live in", "choices": [" water", " trees", " the desert sand"], "answer": 0},
    {"question": "Snow is", "choices": [" white", " black", " usually quite purple"], "answer": 0},
]


def write_task_files(root: Path) -> tuple[Path, Path]:
    """A suite with one `choice` task and an lm-eval task YAML, both over the same local jsonl."""
    data = write_jsonl(root / "items.jsonl", ITEMS)
    suite = root / "suite.yaml"
    suite.write_text("name: local\ntasks:\n  - name: choice\n    kind: choice\n    data: items.jsonl\n")
    task = root / "lm_eval_task" / "local_choice.yaml"
    task.parent.mkdir()
    task.write_text(
        "task: local_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return suite, task


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (the harness and datasets must stay on local files)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def verbatim_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("verbatim") / "model", seed=3, chat_template=VERBATIM)


def test_align_eval_lm_eval_task_agrees_exactly_with_the_choice_task(verbatim_model, tmp_path, no_network):
    from align.cli import main

    suite, task = write_task_files(tmp_path)
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["eval", "--suite", str(suite), "--model", f"tiny={verbatim_model}",
                                       "-o", str(out), "--dtype", "float32", "--batch-size", "4",
                                       "--lm-eval-tasks", str(task)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "report.json").read_text())["results"]["tiny"]
    assert results["lm-eval:local_choice"]["status"] == "ok", results["lm-eval:local_choice"]
    ours = {name: m["value"] for name, m in results["choice"]["metrics"].items()}
    harness = {name: m["value"] for name, m in results["lm-eval:local_choice"]["metrics"].items()}
    assert harness["acc"] == ours["accuracy"]
    assert harness["acc_norm"] == ours["accuracy_norm"]
    # a random model answers some items right and some wrong, so agreement is not two saturated scores meeting
    assert 0 < ours["accuracy"] < 1 or 0 < ours["accuracy_norm"] < 1


def test_harness_log_likelihoods_equal_the_choice_tasks_per_option(verbatim_model, tmp_path, no_network):
    """Stronger than equal accuracies: every option's log-likelihood, item by item."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.run import EvalRequest, run_eval

    suite, task = write_task_files(tmp_path)
    out = run_eval(EvalRequest(suite=str(suite), models={"tiny": str(verbatim_model)}, output=tmp_path / "r",
                               batch_size=3, dtype="float32"))
    ours = [json.loads(line)["logprobs"] for line in (out / "samples" / "tiny" / "choice.jsonl").open()]

    model = AutoModelForCausalLM.from_pretrained(verbatim_model, dtype="float32")
    wrapper = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(verbatim_model), batch_size=5)
    output = lm_eval.simple_evaluate(model=wrapper, tasks=[str(task)], log_samples=True,
                                     task_manager=TaskManager(include_defaults=False))
    samples = sorted(output["samples"]["local_choice"], key=lambda s: s["doc_id"])
    theirs = [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]
    assert len(theirs) == len(ours) == len(ITEMS)
    for mine, harness in zip(ours, theirs):
        assert mine == pytest.approx(harness, abs=1e-4)
