"""The model-facing half of evaluation: batched greedy/sampled generation and log-probabilities of token spans.

Both batch examples of similar length together (sorted by length, results put back in input order), so padding
wastes little compute. Generation pads on the left, so every row's last prompt token sits at the same position
and the KV cache grows in lock-step; scoring pads on the right and masks the padding out of the sums.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from align.core.models import LoadOptions, ResolvedModel, load_model, load_tokenizer, pick_precision
from align.core.template import stop_token_ids
from eval.suites import GenerationSpec

Progress = Callable[[int], None]


@dataclass
class LoadedModel:
    """A model ready for inference, with how it computes (bf16 autocast on CPUs with fast bf16 matmuls)."""

    name: str
    resolved: ResolvedModel
    model: Any
    tokenizer: Any
    bf16_autocast: bool = False

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        device = self.device.type
        autocast = torch.autocast(device, dtype=torch.bfloat16) if self.bf16_autocast else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            yield

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)


def load_for_eval(name: str, resolved: ResolvedModel, dtype: str = "auto") -> LoadedModel:
    """Tokenizer, weights and adapter (active, not merged) in eval mode."""
    precision = pick_precision(dtype)
    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved, LoadOptions(dtype=dtype), tokenizer=tokenizer, adapter="load")
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model = model.to("cuda")
    model.eval()
    return LoadedModel(name, resolved, model, tokenizer, precision.bf16_autocast)


def free(loaded: LoadedModel | None) -> None:
    """Drop a model's weights before the next one loads (callers must not keep other references)."""
    if loaded is None:
        return
    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


def generate_texts(
    lm: LoadedModel,
    prompts: Sequence[str],
    settings: GenerationSpec,
    batch_size: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[str]:
    """Continue each (already chat-templated) prompt; returns only the new text, special tokens dropped.

    Longest prompts go first, so an out-of-memory error shows up on the first batch rather than the last.
    """
    tokenizer = lm.tokenizer
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id
    options: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
                               "num_beams": 1, "use_cache": True, "pad_token_id": pad,
                               "eos_token_id": lm.stop_token_ids()}
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:  # shipped generation configs often set sampling knobs; greedy must not see them
        options.update(temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    outputs: list[str] = [""] * len(prompts)
    for batch in _batches(order, batch_size):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        with lm.computing():
            generated = lm.model.generate(input_ids=input_ids.to(lm.device), attention_mask=attention.to(lm.device),
                                          **options)
        new_tokens = generated[:, width:].cpu()
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
        if progress:
            progress(len(batch))
    return outputs


@dataclass(frozen=True)
class ScoredSpan:
    """Sum of log-probabilities of the scored tokens, and how many there were."""

    logprob: float
    tokens: int


def score_spans(
    lm: LoadedModel,
    sequences: Sequence[tuple[list[int], int]],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[ScoredSpan]:
    """For each (token ids, start): sum of log p(ids[t] | ids[:t]) over t >= start (start >= 1)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    pad = lm.tokenizer.pad_token_id
    results: list[ScoredSpan] = [ScoredSpan(0.0, 0)] * len(sequences)
    for batch in _batches(order, batch_size):
        width = max(len(sequences[i][0]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)  # position t predicts token t+1
        for row, i in enumerate(batch):
            ids, start = sequences[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            scored[row, max(start, 1) - 1 : len(ids) - 1] = True
        positions = scored.any(dim=0).nonzero().squeeze(-1)  # positions any row of the batch scores
        if positions.numel():
            with lm.computing():
                logits = logits_at(lm.model, input_ids.to(lm.device), attention.to(lm.device), positions.to(lm.device))
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                targets = input_ids[:, positions + 1].to(lm.device).unsqueeze(-1)
                token_logprobs = logprobs.gather(-1, targets).squeeze(-1).cpu()
        for row, i in enumerate(batch):
            mask = scored[row, positions]
            results[i] = ScoredSpan(float(token_logprobs[row][mask].sum()) if mask.any() else 0.0, int(mask.sum()))
        if progress:
            progress(len(batch))
    return results


def logits_at(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """(batch, len(positions), vocab) logits at the given sequence positions only.

    A choice or preference item scores a few tokens after a long context, and the head over a large vocabulary is
    about a fifth of a small model's FLOPs (SmolLM2-135M: 28M of 135M parameters), so the head runs only where it is
    read. Decoders whose forward takes `logits_to_keep` (transformers' own, also through PEFT) skip the rest; any
    other model computes every position and is sliced."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, positions]


def context_continuation_ids(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context + continuation and where the continuation starts.

    Encoded separately and concatenated (as lm-evaluation-harness does), so the scored tokens are exactly the
    continuation's own tokens, whatever the tokenizer would merge across the boundary.
    """
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return context_ids + continuation_ids, len(context_ids)


def progress_bar(total: int, description: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="ex", file=sys.stderr, dynamic_ncols=True, leave=True)
