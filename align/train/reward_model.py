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


def load_reward_model(model_dir: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) of an `align rm` output dir: its base as a one-output sequence classifier with the adapter
    and score head on top, and the tokenizer saved beside them."""
    from align.core.models import LoadOptions, load_model, load_tokenizer, resolve_model

    path = Path(model_dir)
    config = path / "adapter_config.json"
    if not config.is_file():
        raise AlignError(f"{model_dir}: not a reward model dir (no adapter_config.json; `align rm` writes one)")
    task = json.loads(config.read_text()).get("task_type")
    if task != "SEQ_CLS":
        raise AlignError(f"{model_dir}: a {task} adapter, not a reward model (SEQ_CLS, as `align rm` writes)")
    resolved = resolve_model(str(path))
    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved, LoadOptions(dtype), tokenizer, adapter="load", num_labels=1)
    return model, tokenizer


def score(model_dir: str | Path, prompts: Sequence[str | Messages], completions: Sequence[str | Messages],
          batch_size: int = 16) -> list[float]:
    """One score per (prompt, completion): higher is preferred. Prompts and completions are text (one user turn,
    one assistant turn) or message lists."""
    if len(prompts) != len(completions):
        raise AlignError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    model, tokenizer = load_reward_model(model_dir)
    ids = [conversation_ids(tokenizer, conversation(p, c)) for p, c in zip(prompts, completions)]
    return score_ids(model, ids, tokenizer.pad_token_id, batch_size)


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
