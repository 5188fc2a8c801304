"""The reward functions of `align grpo`: the built-in ones, a user's function loaded from a file, and the check every
reward's output passes through before TRL uses it.

Each reward takes TRL's reward-function arguments (`prompts`, `completions`, `completion_ids`, and the dataset's other
columns as keyword arguments, here `answer`) and returns one float per completion, or None where it does not apply
(TRL's convention). Completions arrive as text, or as a list of messages for conversational prompts.

`--reward` spellings: `pig-latin`, `exact`, `regex:PATTERN`, `length[:N]`, `path/to/file.py:function`, `rm:DIR` (a
reward model `align rm` trained: align/train/reward_model.py).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from align.core.demo import PROMPT, pig_latin_word
from align.core.errors import AlignError, did_you_mean


def completion_text(completion: Any) -> str:
    """A completion as text: a plain string, or the content of its messages (conversational prompts)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def prompt_text(prompt: Any) -> str:
    """The last user turn of a prompt (text, or a list of messages)."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    return str(users[-1]["content"]) if users else ""


# ---- the built-in rewards ----------------------------------------------------------------------------------------


PIG_LATIN_PROMPT = re.compile(re.escape(PROMPT).replace(re.escape("{sentence}"), "(?P<sentence>[a-z]+(?: [a-z]+)*)"))


def pig_latin_sentence(prompt: Any) -> str | None:
    """The sentence a demo-task prompt asks to translate (`Translate to Pig Latin: ...`), or None."""
    found = PIG_LATIN_PROMPT.fullmatch(prompt_text(prompt).strip())
    return found.group("sentence") if found else None


def pig_latin_accuracy(sentence: str, answer: str) -> float:
    """The share of words translated by the house rule (align/core/demo.py), position by position, over the longer
    of the expected and the produced word lists: a dropped word costs every later one, and words appended after a
    right answer cost too (otherwise padding a correct answer would be free)."""
    expected = [pig_latin_word(w) for w in sentence.split(" ")]
    produced = answer.split()
    right = sum(1 for i, word in enumerate(expected) if i < len(produced) and produced[i] == word)
    return right / max(len(expected), len(produced))


def pig_latin_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float | None]:
    """Word accuracy of each completion against the house rule's translation of its prompt's sentence."""
    rewards: list[float | None] = []
    for prompt, completion in zip(prompts, completions):
        sentence = pig_latin_sentence(prompt)
        rewards.append(None if sentence is None else pig_latin_accuracy(sentence, completion_text(completion)))
    return rewards


def exact_reward(completions: list[Any], answer: list[str | None] | None = None, **_: Any) -> list[float | None]:
    """1 when the completion equals the reference answer (surrounding whitespace aside), else 0; None without one."""
    answers = answer or [None] * len(completions)
    return [None if ref is None else float(completion_text(c).strip() == str(ref).strip())
            for c, ref in zip(completions, answers)]


def regex_reward(pattern: re.Pattern[str]) -> Callable[..., list[float]]:
    def reward(completions: list[Any], **_: Any) -> list[float]:
        """1 when the whole completion (surrounding whitespace aside) matches the pattern, else 0."""
        return [float(pattern.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    return reward


def length_reward(free_tokens: int, max_completion_length: int) -> Callable[..., list[float]]:
    def reward(completion_ids: list[Sequence[int]], **_: Any) -> list[float]:
        """Minus the share of max_completion_length spent beyond `free_tokens`: 0 within them, -1 at worst."""
        return [-max(0, len(ids) - free_tokens) / max_completion_length for ids in completion_ids]

    return reward


def reward_model_reward(model_dir: str) -> Callable[..., list[float]]:
    """The score of a reward model dir on each (prompt, completion), its weights loaded once on the first call. The
    function carries `check_tokenizer(policy_tokenizer, policy)`: a judge must read the policy's tokens."""
    from align.train.reward_model import RewardModel

    judge = RewardModel(model_dir)

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        """The reward model's score (higher is preferred)."""
        return judge(prompts, completions)

    reward.check_tokenizer = judge.check_tokenizer  # type: ignore[attr-defined]
    return reward


BUILTIN_REWARDS = ("pig-latin", "exact", "regex", "length", "rm")


# ---- parsing --reward ----------------------------------------------------------------------------------------------


class CheckedReward:
    """A reward function as TRL calls it, checked on every call: a function that raises, returns another number of
    rewards than completions, or a value that is not a finite number (None aside: TRL's "does not apply") stops the
    run with one line naming the reward (`file:function` for a user's)."""

    def __init__(self, name: str, function: Callable[..., Any], where: str,
                 needs: tuple[Callable[[dict[str, Any]], bool], str] | None = None) -> None:
        self.__name__ = name  # TRL's name for it: its metrics are `rewards/<name>/mean` and `/std`
        self.function = function
        self.where = where  # `--reward` as given, for messages
        self.needs = needs
        """(whether it can score a {prompt, answer} row, what it needs): a built-in that cannot score a row would
        return None for it all run long, so such a row is refused before training."""

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        try:
            values = self.function(prompts=prompts, completions=completions, **kwargs)
        except AlignError:
            raise
        except Exception as exc:  # the user's code: any failure is the user's to fix, named as theirs
            detail = str(exc).strip().splitlines()
            raise AlignError(f"reward {self.where} raised {type(exc).__name__}"
                             f"{': ' + detail[0] if detail else ''}") from None
        try:
            values = list(values) if not isinstance(values, (str, bytes, dict)) else None
        except TypeError:
            values = None
        if values is None:
            raise AlignError(f"reward {self.where} did not return a list (one number per completion)")
        if len(values) != len(completions):
            raise AlignError(f"reward {self.where} returned {len(values)} values for {len(completions)} completions "
                             "(one number per completion)")
        checked: list[float | None] = []
        for i, value in enumerate(values):
            if value is None:
                checked.append(None)
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise AlignError(f"reward {self.where} returned {value!r} for completion {i}, not a number") from None
            if not math.isfinite(number):
                raise AlignError(f"reward {self.where} returned {number} for completion {i} (use None where a "
                                 "reward does not apply)")
            checked.append(number)
        return checked


def parse_reward(spec: str, max_completion_length: int) -> CheckedReward:
    """One `--reward` as a checked reward function; a bad one is one line, before any model loads."""
    name, sep, arg = spec.partition(":")
    if name == "pig-latin" and not sep:
        return CheckedReward("pig_latin", pig_latin_reward, spec, (
            lambda row: pig_latin_sentence(row["prompt"]) is not None,
            "the demo task's prompts ('Translate to Pig Latin: <lower-case words>')"))
    if name == "exact" and not sep:
        return CheckedReward("exact", exact_reward, spec, (
            lambda row: row["answer"] is not None, "a reference answer (an answer column, or --answer-column)"))
    if name == "regex" and sep:
        try:
            pattern = re.compile(arg, re.DOTALL)
        except re.error as exc:
            raise AlignError(f"--reward {spec}: not a regular expression ({exc})") from None
        return CheckedReward("regex", regex_reward(pattern), spec)
    if name == "length":
        if sep and not arg.isdigit():
            raise AlignError(f"--reward {spec}: length:N takes a whole number of free tokens")
        return CheckedReward("length", length_reward(int(arg or 0), max_completion_length), spec)
    if name == "rm" and arg:
        try:
            return CheckedReward("rm", reward_model_reward(arg), spec)
        except AlignError as exc:
            raise AlignError(f"--reward {spec}: {exc}") from None
    path, _, function = spec.rpartition(":")
    if path.endswith(".py") and function:
        return CheckedReward(function, load_user_reward(Path(path), function), spec)
    known = ", ".join(("pig-latin", "exact", "regex:PATTERN", "length[:N]", "FILE.py:FUNCTION", "rm:DIR"))
    raise AlignError(f"--reward {spec}: unknown reward{did_you_mean(name, BUILTIN_REWARDS)} (rewards: {known})")


def load_user_reward(path: Path, function: str) -> Callable[..., Any]:
    """`function` from the Python file at `path`, imported by path (nothing is fetched from a hub)."""
    where = f"{path}:{function}"
    if not path.is_file():
        raise AlignError(f"--reward {where}: {path} not found")
    module_name = f"align_reward_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise AlignError(f"--reward {where}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: a syntax error or a failing import is theirs to fix
        detail = str(exc).strip().splitlines()
        raise AlignError(f"--reward {where}: importing {path} raised {type(exc).__name__}"
                         f"{': ' + detail[0] if detail else ''}") from None
    found = getattr(module, function, None)
    if found is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise AlignError(f"--reward {where}: {path} has no function {function!r}{did_you_mean(function, names)}")
    if not callable(found):
        raise AlignError(f"--reward {where}: {function} is a {type(found).__name__}, not a function")
    return found


def parse_rewards(specs: list[str], weights: list[float] | None, max_completion_length: int) -> list[CheckedReward]:
    """Every `--reward`, named uniquely (TRL files metrics by name: a second regex is regex_2), with as many
    `--reward-weights` as rewards."""
    rewards = [parse_reward(spec, max_completion_length) for spec in specs]
    if weights is not None and len(weights) != len(rewards):
        raise AlignError(f"--reward-weights: {len(weights)} weights for {len(rewards)} rewards "
                         f"({', '.join(specs)}); give one per --reward")
    seen: dict[str, int] = {}
    for reward in rewards:
        seen[reward.__name__] = seen.get(reward.__name__, 0) + 1
        if seen[reward.__name__] > 1:
            reward.__name__ = f"{reward.__name__}_{seen[reward.__name__]}"
    return rewards


def check_reward_tokenizers(rewards: list[CheckedReward], tokenizer: Any, policy: str) -> None:
    """Every reward model among the rewards must read the policy's tokenizer (refused in one line otherwise)."""
    for reward in rewards:
        check = getattr(reward.function, "check_tokenizer", None)
        if check is not None:
            try:
                check(tokenizer, policy)
            except AlignError as exc:
                raise AlignError(f"--reward {reward.where}: {exc}") from None
