"""How a model renders chats and where it stops: the chat template, EOS and PAD, and the ids generation stops at.

The one place for these rules. Loading gives a template-less tokenizer ChatML and a PAD distinct from EOS; SFT
records the contract (`template_contract`) in run.json; DPO's pipeline stage checks it; a merged model gets its
template source's tokenizer and a generation config that stops at the end of an assistant turn.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from align.core.errors import AlignError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CONTRACT_KEYS = ("chat_template", "eos_token", "pad_token")
"""What must match between stages; the generation ids follow from these and are recorded for reading only."""


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a template-less tokenizer ChatML and its special tokens. Returns True when it did (and says so)."""
    if tokenizer.chat_template:
        return False
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = "<|im_end|>"
    log.warning("the model has no chat template: using ChatML (%d special tokens added)", added)
    return True


def ensure_pad_token(tokenizer: Any) -> None:
    """Pad must differ from EOS: collators mask pad positions, and a pad equal to EOS hides EOS from the loss,
    so the model never learns to stop. Prefer an existing unused special token over growing the vocabulary."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<unk>"):
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token the chat template closes an assistant turn with (`<|im_end|>` for ChatML), else EOS.

    Generation must stop there: a merged model whose generation_config only knows the base's `<|endoftext|>`
    runs on past the end of its answer.
    """
    if tokenizer.chat_template:
        marker = "END-OF-TURN-PROBE"
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # templates may reject this shape (e.g. require a system turn); fall back to EOS
            text = ""
        if marker in text:
            tail = tokenizer.encode(text.split(marker, 1)[1], add_special_tokens=False)
            special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            for token in tail:
                if token in special:
                    return int(token)
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer: Any, configured: int | list[int] | None = None) -> list[int]:
    """Every id generation stops at: the end of an assistant turn, the tokenizer's EOS, and whatever the model's
    generation config already stopped at (a stop is never taken away)."""
    existing = configured if isinstance(configured, list) else [configured]
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id, *existing]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def set_generation_stops(generation: Any, tokenizer: Any) -> int | list[int] | None:
    """Point a GenerationConfig at the tokenizer's stops and PAD; returns the eos_token_id it now holds."""
    stops = stop_token_ids(tokenizer, generation.eos_token_id)
    generation.eos_token_id = stops[0] if len(stops) == 1 else stops or None
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    return generation.eos_token_id


def write_template(model_dir: Path, source: Path | str | None = None) -> int | list[int] | None:
    """Make a saved model render and stop like `source` (a model or adapter dir whose tokenizer it takes; None keeps
    the model's own): its tokenizer, chat template and EOS/PAD, and a generation config that stops at the end of a
    turn. Returns the eos_token_id written. Call it before the model's record is written."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(source or model_dir))
    if source is not None:
        tokenizer.save_pretrained(str(model_dir))
    try:
        generation = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(model_dir)))
    # A written model stops where its tokenizer says: the stops already there (mergekit copies the first input's
    # generation config) may belong to another template, e.g. a base model's `<|endoftext|>`.
    generation.eos_token_id = None
    eos = set_generation_stops(generation, tokenizer)
    generation.save_pretrained(str(model_dir))
    return eos


def template_contract(tokenizer: Any, model: Any = None) -> dict[str, Any]:
    """How a model renders chats and stops: recorded by SFT, checked by DPO, written into merged models."""
    generation = getattr(model, "generation_config", None)
    return {"chat_template": tokenizer.chat_template, "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "generation_eos_token_id": getattr(generation, "eos_token_id", None)}


def check_template_contract(recorded: dict[str, Any], tokenizer: Any, where: str, source: str) -> None:
    """`tokenizer` must render and stop exactly as `source` recorded; `where` names the stage that checks."""
    current = template_contract(tokenizer)
    for key in CONTRACT_KEYS:
        if recorded.get(key) != current[key]:
            raise AlignError(f"template contract broken at {where}: {key} is {current[key]!r} but {source} "
                             f"recorded {recorded.get(key)!r}")
