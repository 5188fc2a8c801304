"""A trained reward model (`align rm`'s output dir) as a function: `score(model_dir, prompts, completions)` gives one
float per completion, the score head's output on the prompt and completion rendered the way training rendered its
pairs (TRL's RewardTrainer: the chat template over the whole conversation). For `judge: rm:DIR` and a GRPO reward.

Also what a later judge needs to check that it reads the same tokens a policy writes: `tokenizer_record`, the
tokenizer's identity as run.json records it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from align.core.errors import AlignError

Messages = list[dict[str, str]]


def conversation(prompt: str | Messages, completion: str | Messages) -> Messages:
    """A prompt (text: one user turn) followed by a completion (text: one assistant turn), as the pairs `align dpo`
    reads become conversations."""
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    tail = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return head + tail


def conversation_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids as TRL's RewardTrainer makes them from a conversational pair (`trl.data_utils._tokenize`)."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


@torch.no_grad()
def score_ids(model: Any, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16) -> list[float]:
    """The score head's output for each token sequence, in order. Right-padded batches: a sequence classifier reads
    the last non-pad token, so padding never changes a score."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = [list(s) for s in sequences[start:start + batch_size]]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):
            ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, :len(sequence)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        scores += logits[:, 0].float().tolist()
    model.train(was_training)
    return scores


def check_reward_model_dir(model_dir: str | Path) -> Path:
    """The dir of a reward model as `align rm` writes it (a PEFT SEQ_CLS adapter), or one line saying what it is not.
    Reads one small file, so a judge or a GRPO reward refuses a wrong dir before any model loads."""
    path = Path(model_dir)
    if not path.is_dir():
        raise AlignError(f"reward model {model_dir}: no such dir (an `align rm` output dir, or a pipeline rm stage)")
    config = path / "adapter_config.json"
    if not config.is_file():
        raise AlignError(f"{model_dir}: not a reward model dir (no adapter_config.json; `align rm` writes one)")
    task = json.loads(config.read_text()).get("task_type")
    if task != "SEQ_CLS":
        raise AlignError(f"{model_dir}: not a reward model (an adapter of task_type {task}; `align rm` writes "
                         "SEQ_CLS)")
    return path


def load_reward_model(model_dir: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) of an `align rm` output dir: its base as a one-output sequence classifier with the adapter
    and score head on top, and the tokenizer saved beside them."""
    resolved, tokenizer = reward_model_tokenizer(model_dir)
    return reward_model_weights(resolved, tokenizer, dtype), tokenizer


def reward_model_weights(resolved: Any, tokenizer: Any, dtype: str = "float32") -> Any:
    """The sequence classifier of a resolved reward model dir (its tokenizer already read)."""
    from align.core.models import LoadOptions, load_model

    return load_model(resolved, LoadOptions(dtype), tokenizer, adapter="load", num_labels=1)


def reward_model_tokenizer(model_dir: str | Path) -> tuple[Any, Any]:
    """(resolved model, tokenizer) of a reward model dir, without loading its weights."""
    from align.core.models import load_tokenizer, resolve_model

    resolved = resolve_model(str(check_reward_model_dir(model_dir)))
    return resolved, load_tokenizer(resolved)


def check_same_tokenizer(model_dir: str | Path, reward_tokenizer: Any, policy_tokenizer: Any, policy: str) -> None:
    """A reward model judges text a policy wrote in its own tokens and template: the two tokenizers must be the same
    (`tokenizer_record`'s fingerprint), or the run stops with one line naming what differs."""
    mine, theirs = tokenizer_record(reward_tokenizer, str(model_dir)), tokenizer_record(policy_tokenizer, policy)
    if mine["fingerprint"] == theirs["fingerprint"]:
        return
    parts = {"vocab_size": "vocabulary size", "pad_token": "pad token", "eos_token": "EOS token",
             "chat_template_sha256": "chat template"}
    differs = [f"{label} {mine[key]!r} vs {theirs[key]!r}" if key != "chat_template_sha256" else label
               for key, label in parts.items() if mine[key] != theirs[key]] or ["vocabulary or special tokens"]
    raise AlignError(f"reward model {model_dir}: its tokenizer differs from the policy's ({policy}): "
                     f"{', '.join(differs)} (train the reward model on the policy's base and tokenizer)")


class RewardModel:
    """A reward model dir as a scorer that loads its weights once, on first use: `rm(prompts, completions)` gives
    one score per completion. The dir and its tokenizer are read when it is made, so a wrong dir fails first."""

    def __init__(self, model_dir: str | Path, batch_size: int = 16) -> None:
        self.model_dir = str(model_dir)
        self.batch_size = batch_size
        self.resolved, self.tokenizer = reward_model_tokenizer(model_dir)
        self.model: Any = None

    def check_tokenizer(self, policy_tokenizer: Any, policy: str) -> None:
        check_same_tokenizer(self.model_dir, self.tokenizer, policy_tokenizer, policy)

    def __call__(self, prompts: Sequence[str | Messages], completions: Sequence[str | Messages]) -> list[float]:
        if len(prompts) != len(completions):
            raise AlignError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        if self.model is None:  # the tokenizer was read when the dir was checked
            self.model = reward_model_weights(self.resolved, self.tokenizer)
        ids = [conversation_ids(self.tokenizer, conversation(p, c)) for p, c in zip(prompts, completions)]
        return score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)


def score(model_dir: str | Path, prompts: Sequence[str | Messages], completions: Sequence[str | Messages],
          batch_size: int = 16, policy_tokenizer: Any = None, policy: str = "the policy") -> list[float]:
    """One score per (prompt, completion): higher is preferred. Prompts and completions are text (one user turn,
    one assistant turn) or message lists. With `policy_tokenizer`, a reward model whose tokenizer differs from it is
    refused before its weights load."""
    judge = RewardModel(model_dir, batch_size)
    if policy_tokenizer is not None:
        judge.check_tokenizer(policy_tokenizer, policy)
    return judge(prompts, completions)


def tokenizer_record(tokenizer: Any, source: str) -> dict[str, Any]:
    """The tokenizer's identity: the same fingerprint means the same ids for the same text (vocabulary, special
    tokens and chat template all hashed), so a judge can refuse a policy whose tokenizer differs."""
    identity = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
                "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
                "chat_template": tokenizer.chat_template}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {"source": source, "fingerprint": digest, "vocab_size": len(tokenizer),
            "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token,
            "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()}
