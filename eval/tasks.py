"""Tasks: rows -> typed examples (checked once, with row locations in errors) -> scores for one model.

Every kind returns a `TaskOutcome`: metric values for the report and one sample dict per example, which the
report writes to samples/<model>/<task>.jsonl.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from align.core.data import DataError, check_messages, read_rows, render_chat
from eval.generate import LoadedModel, Progress, context_continuation_ids, generate_texts, score_spans
from eval.scoring import MetricLoader, MetricValue, compute_text_metric, mean_value, perplexity_value
from eval.suites import GenerationSpec, TaskSpec

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class GenerateExample:
    prompt: Messages
    reference: str


@dataclass(frozen=True)
class ChoiceExample:
    prompt: Messages
    choices: list[str]
    answer: int


@dataclass(frozen=True)
class TextExample:
    text: str | None = None
    messages: Messages | None = None


@dataclass(frozen=True)
class PreferenceExample:
    prompt: Messages
    chosen: Messages
    rejected: Messages


Example = Union[GenerateExample, ChoiceExample, TextExample, PreferenceExample]


@dataclass
class TaskOutcome:
    metrics: dict[str, MetricValue]
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvalSettings:
    """What every task run shares: batch size, seed, and overrides of the suite's generation settings."""

    batch_size: int = 16
    seed: int = 0
    generation_overrides: dict[str, Any] = field(default_factory=dict)


# ---- reading examples ------------------------------------------------------------------------------------------


def load_examples(task: TaskSpec, limit: int | None = None) -> list[Example]:
    """Read and check a task's rows; `limit` (from --limit) caps the suite's own limit."""
    caps = [c for c in (task.limit, limit) if c is not None]
    rows = read_rows(task.data, task.split, min(caps) if caps else None)
    parse = PARSERS[task.kind]
    return [parse(row, where, task.system) for row, where in zip(rows.rows, rows.locations)]


def _with_system(messages: Messages, system: str | None) -> Messages:
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}] + messages
    return messages


def _prompt_messages(row: dict[str, Any], where: str, system: str | None, fieldname: str = "prompt") -> Messages:
    value = row.get(fieldname)
    if isinstance(value, str) and value.strip():
        return _with_system([{"role": "user", "content": value}], system)
    if isinstance(value, list):
        return _with_system(check_messages(value, where, fieldname, need_assistant=False), system)
    raise DataError(f"{where}: field '{fieldname}': " + ("missing" if value is None else "expected a non-empty "
                                                          f"string or a list of messages, got {type(value).__name__}"))


def _string_field(row: dict[str, Any], where: str, names: tuple[str, ...]) -> str:
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, str):
                raise DataError(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
            return value
    raise DataError(f"{where}: missing field '{names[0]}' (also accepted: {', '.join(names[1:])})")


def parse_generate(row: dict[str, Any], where: str, system: str | None) -> GenerateExample:
    """`messages` ending in the reference assistant turn, or `prompt` + `reference` (or answer/completion)."""
    if "messages" in row:
        messages = check_messages(row["messages"], where, "messages")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages': the last message must be the assistant's reference answer")
        return GenerateExample(_with_system(messages[:-1], system), messages[-1]["content"])
    return GenerateExample(_prompt_messages(row, where, system),
                           _string_field(row, where, ("reference", "answer", "completion", "output")))


def parse_choice(row: dict[str, Any], where: str, system: str | None) -> ChoiceExample:
    """`question` (or prompt), `choices` (list of strings), `answer` (index, or the right choice's text)."""
    prompt = _prompt_messages(row, where, system, "question" if "question" in row else "prompt")
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: field 'choices': expected a list of at least two non-empty strings")
    answer = row.get("answer")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: field 'answer': expected an index below {len(choices)} or one of the choices, "
                        f"got {answer!r}")
    return ChoiceExample(prompt, choices, answer)


def parse_text(row: dict[str, Any], where: str, system: str | None) -> TextExample:
    if "messages" in row:
        return TextExample(messages=_with_system(check_messages(row["messages"], where, "messages"), system))
    text = _string_field(row, where, ("text",))
    if not text.strip():
        raise DataError(f"{where}: field 'text': empty")
    return TextExample(text=text)


def _completion(row: dict[str, Any], where: str, fieldname: str) -> Messages:
    value = row.get(fieldname)
    if isinstance(value, str) and value.strip():
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        return check_messages(value, where, fieldname)
    raise DataError(f"{where}: field '{fieldname}': " + ("missing" if value is None else
                                                          "expected a non-empty string or a list of messages"))


def parse_preference(row: dict[str, Any], where: str, system: str | None) -> PreferenceExample:
    """`prompt`, `chosen`, `rejected`: strings (a user turn, assistant answers) or lists of messages."""
    return PreferenceExample(_prompt_messages(row, where, system), _completion(row, where, "chosen"),
                             _completion(row, where, "rejected"))


def work_units(kind: str, examples: list[Example]) -> int:
    """How many sequences a task runs through the model: the length of its progress bar."""
    if kind == "choice":
        return sum(len(e.choices) for e in examples)  # type: ignore[union-attr]
    return 2 * len(examples) if kind == "preference" else len(examples)


PARSERS: dict[str, Callable[[dict[str, Any], str, str | None], Example]] = {
    "generate": parse_generate, "choice": parse_choice, "perplexity": parse_text, "preference": parse_preference,
}


# ---- running ---------------------------------------------------------------------------------------------------


def run_generate(lm: LoadedModel, task: TaskSpec, examples: list[GenerateExample], settings: EvalSettings,
                 metrics: MetricLoader, progress: Progress | None = None) -> TaskOutcome:
    prompts = [render_chat(lm.tokenizer, e.prompt, add_generation_prompt=True) for e in examples]
    generation = GenerationSpec.model_validate({**task.generation.model_dump(), **settings.generation_overrides})
    outputs = generate_texts(lm, prompts, generation, settings.batch_size, settings.seed, progress)
    references = [e.reference for e in examples]
    values: dict[str, MetricValue] = {}
    for name in task.metric_names:
        values.update(compute_text_metric(metrics, name, outputs, references, settings.seed))
    samples = [
        {"prompt": prompt, "output": output, "reference": reference,
         "scores": {k: v.per_example[i] for k, v in values.items() if v.per_example is not None}}
        for i, (prompt, output, reference) in enumerate(zip(prompts, outputs, references))
    ]
    return TaskOutcome(values, samples)


def run_choice(lm: LoadedModel, task: TaskSpec, examples: list[ChoiceExample], settings: EvalSettings,
               metrics: MetricLoader, progress: Progress | None = None) -> TaskOutcome:
    """Pick the option with the highest log-likelihood after the prompt (accuracy), or the highest per
    character (accuracy_norm, lm-evaluation-harness's acc_norm), which stops long options being penalized."""
    contexts = [render_chat(lm.tokenizer, e.prompt, add_generation_prompt=True) for e in examples]
    sequences, owners = [], []
    for index, (context, example) in enumerate(zip(contexts, examples)):
        for choice in example.choices:
            sequences.append(context_continuation_ids(lm.tokenizer, context, choice))
            owners.append(index)
    spans = score_spans(lm, sequences, settings.batch_size, progress)
    logprobs: list[list[float]] = [[] for _ in examples]
    for owner, span in zip(owners, spans):
        logprobs[owner].append(span.logprob)
    raw = [max(range(len(lp)), key=lp.__getitem__) for lp in logprobs]
    normed = [max(range(len(lp)), key=lambda j, lp=lp, e=e: lp[j] / len(e.choices[j]))
              for lp, e in zip(logprobs, examples)]
    answers = [e.answer for e in examples]
    accuracy = metrics.load("accuracy")
    raw_scores = accuracy.compute(predictions=raw, references=answers)["per_example"]
    norm_scores = accuracy.compute(predictions=normed, references=answers)["per_example"]
    values = {"accuracy": mean_value(raw_scores, settings.seed), "accuracy_norm": mean_value(norm_scores, settings.seed)}
    samples = [
        {"prompt": context, "choices": e.choices, "logprobs": lp, "output": e.choices[r], "reference": e.choices[e.answer],
         "scores": {"accuracy": raw_scores[i], "accuracy_norm": norm_scores[i]}}
        for i, (context, e, lp, r) in enumerate(zip(contexts, examples, logprobs, raw))
    ]
    return TaskOutcome(values, samples)


def run_perplexity(lm: LoadedModel, task: TaskSpec, examples: list[TextExample], settings: EvalSettings,
                   metrics: MetricLoader, progress: Progress | None = None) -> TaskOutcome:
    """Token-weighted perplexity over the texts, first token unscored (it has no context).

    Computed here rather than with the hub `perplexity` module, which loads its own model by hub id and cannot
    score the adapter-carrying model object we already hold.
    """
    texts = [e.text if e.text is not None else render_chat(lm.tokenizer, e.messages or []) for e in examples]
    sequences = []
    for text in texts:
        ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"][: task.max_length]
        if len(ids) < 2:
            raise DataError(f"task '{task.name}': a text shorter than two tokens cannot be scored: {text!r}")
        sequences.append((ids, 1))
    spans = score_spans(lm, sequences, settings.batch_size, progress)
    value = perplexity_value([-s.logprob for s in spans], [s.tokens for s in spans], settings.seed)
    samples = [{"text": t, "tokens": s.tokens, "nll": -s.logprob, "scores": {"perplexity": p}}
               for t, s, p in zip(texts, spans, value.per_example or [])]
    return TaskOutcome({"perplexity": value}, samples)


@dataclass(frozen=True)
class PreferenceSpans:
    """What a model thinks of each pair: summed log-probs of the chosen and rejected completions."""

    chosen: list[float]
    rejected: list[float]


def preference_sequences(tokenizer: Any, examples: list[PreferenceExample]) -> list[tuple[list[int], int]]:
    """Chosen then rejected sequences; the completion is everything the template adds after the prompt
    (assistant content and end-of-turn), as DPO scores it."""
    sequences = []
    for example in examples:
        context = render_chat(tokenizer, example.prompt, add_generation_prompt=True)
        for completion in (example.chosen, example.rejected):
            full = render_chat(tokenizer, example.prompt + completion)
            if not full.startswith(context):
                raise DataError("the chat template does not render the prompt as a prefix of prompt + completion, "
                                "so completion log-probs cannot be located")
            sequences.append(context_continuation_ids(tokenizer, context, full[len(context):]))
    return sequences


def score_preferences(lm: LoadedModel, examples: list[PreferenceExample], batch_size: int,
                      progress: Progress | None = None) -> PreferenceSpans:
    spans = score_spans(lm, preference_sequences(lm.tokenizer, examples), batch_size, progress)
    return PreferenceSpans([s.logprob for s in spans[0::2]], [s.logprob for s in spans[1::2]])


def preference_outcome(examples: list[PreferenceExample], policy: PreferenceSpans,
                       reference: PreferenceSpans | None, beta: float, seed: int,
                       tokenizer: Any = None) -> TaskOutcome:
    """The share of pairs whose log-prob margin favours chosen; with a reference, DPO's implicit rewards:
    reward = beta * (log pi(y|x) - log ref(y|x)), accuracy = share with reward(chosen) > reward(rejected)."""
    margins = [c - r for c, r in zip(policy.chosen, policy.rejected)]
    values = {"preference_accuracy": mean_value([float(m > 0) for m in margins], seed),
              "logprob_margin": mean_value(margins, seed)}
    reward_margins: list[float] = []
    if reference is not None:
        reward_margins = [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in
                          zip(policy.chosen, policy.rejected, reference.chosen, reference.rejected)]
        values["reward_accuracy"] = mean_value([float(m > 0) for m in reward_margins], seed)
        values["reward_margin"] = mean_value(reward_margins, seed)
    samples = []
    for i, example in enumerate(examples):
        sample: dict[str, Any] = {
            "prompt": example.prompt, "chosen": example.chosen[-1]["content"],
            "rejected": example.rejected[-1]["content"], "logprob_chosen": policy.chosen[i],
            "logprob_rejected": policy.rejected[i],
            "scores": {"preference_accuracy": float(margins[i] > 0), "logprob_margin": margins[i]},
        }
        if reference is not None:
            sample.update(ref_logprob_chosen=reference.chosen[i], ref_logprob_rejected=reference.rejected[i])
            sample["scores"].update(reward_accuracy=float(reward_margins[i] > 0), reward_margin=reward_margins[i])
        samples.append(sample)
    return TaskOutcome(values, samples)
