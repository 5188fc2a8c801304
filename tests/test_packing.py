"""Padding-free packing is exact where the attention path keeps sequences apart, and the test can tell when it does
not.

Per-sequence summed losses and the gradient of their sum, packed (TRL's bfd packing and padding-free collator, as
`align sft` runs them) against each sequence run alone, must agree to 1e-4 in fp32. The same comparison on a path
that lets attention leak across the packed sequences must fail it.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama

TOLERANCE = 1e-4
LENGTHS = (7, 13, 5, 11, 9, 4)


def sequences(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(4, vocab, (n,), generator=generator).tolist() for n in LENGTHS]


def per_token_losses(model, input_ids, labels, **kwargs) -> torch.Tensor:
    """Cross-entropy of each position's next-token prediction (0 where the label is -100), shape of labels[:, 1:]."""
    kwargs.setdefault("use_cache", False)  # what SFTTrainer.compute_loss passes
    logits = model(input_ids=input_ids, **kwargs).logits.float()
    shifted = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, ignore_index=-100,
                                               reduction="none")
    return losses


def unpacked(model, seqs: list[list[int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    losses = []
    for ids in seqs:
        tensor = torch.tensor([ids])
        losses.append(per_token_losses(model, tensor, tensor.clone()).sum())
    torch.stack(losses).sum().backward()
    return torch.stack(losses).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def packed(model, seqs: list[list[int]], keep_position_ids: bool = True, use_cache: bool = False
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Through TRL's own packing and collator: bfd into rows of 32 tokens, two rows per batch, flattened into one."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = pack_dataset(Dataset.from_list([{"input_ids": s, "labels": s} for s in seqs]), 32, "bfd")
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(list(rows))
    position_ids = batch["position_ids"]
    model.zero_grad()
    kwargs = {"position_ids": position_ids, "use_cache": use_cache} if keep_position_ids else {}
    token_losses = per_token_losses(model, batch["input_ids"], batch["labels"], **kwargs)[0]
    token_losses.sum().backward()
    # which packed sequence each predicted label belongs to, and that sequence's identity by its token ids
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    by_ids = {}
    for begin, end in zip(starts, starts[1:]):
        ids = batch["input_ids"][0, begin:end].tolist()
        by_ids[tuple(ids)] = token_losses[begin:end - 1].sum()  # labels begin+1..end-1, predicted from begin..end-2
    losses = torch.stack([by_ids[tuple(s)] for s in seqs]).detach()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def max_differences(model, keep_position_ids: bool = True, use_cache: bool = False) -> tuple[float, float]:
    seqs = sequences(model.config.vocab_size)
    loss_a, grads_a = unpacked(model, seqs)
    loss_b, grads_b = packed(model, seqs, keep_position_ids, use_cache)
    loss_diff = float((loss_a - loss_b).abs().max())
    grad_diff = max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a)
    return loss_diff, grad_diff


def tiny_model(attn: str):
    model = make_tiny_llama(40, seed=3)
    model.config._attn_implementation = attn
    return model.float()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_each_sequence_alone(attn):
    loss_diff, grad_diff = max_differences(tiny_model(attn))
    assert loss_diff < TOLERANCE, f"{attn}: per-sequence loss differs by {loss_diff}"
    assert grad_diff < TOLERANCE, f"{attn}: gradient differs by {grad_diff}"


def test_the_comparison_fails_when_attention_leaks_across_sequences():
    """Without position ids the packed row is one causal sequence: later sequences attend to earlier ones (and
    their positions run on), which the same comparison must catch."""
    loss_diff, grad_diff = max_differences(tiny_model("sdpa"), keep_position_ids=False)
    assert loss_diff > 100 * TOLERANCE and grad_diff > 100 * TOLERANCE


def test_a_position_only_leak_is_caught_too(monkeypatch):
    """Positions restart per sequence but the mask is plain causal (a path that reads position ids for RoPE and
    ignores them for the mask): still a leak, still caught."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    loss_diff, _ = max_differences(tiny_model("sdpa"))
    assert loss_diff > 100 * TOLERANCE


def test_a_forward_with_a_cache_leaks_and_is_caught():
    """transformers builds the block-diagonal mask only without a cache; a forward that makes one (use_cache left
    on) gets the plain causal mask over the packed row. SFTTrainer passes use_cache=False, which is why packing on
    sdpa/eager is exact in `align sft`; this shows the comparison would catch it if that changed."""
    loss_diff, _ = max_differences(tiny_model("sdpa"), use_cache=True)
    assert loss_diff > 100 * TOLERANCE


def test_align_sft_trains_packed_and_records_why(tiny_model_dir, tmp_path):
    """Packing asked for on sdpa runs through TRL's bfd packing with our pre-tokenized rows; run.json says so."""
    import json

    from align.core.config import SFTRecipe
    from align.train.sft import run_sft

    out = run_sft(SFTRecipe.model_validate({
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"path": "builtin:pig-latin", "limit": 24},
        "lora": {"r": 4},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 128, "packing": True,
                  "save_steps": 100},
        "output": str(tmp_path / "out"),
    }), progress=False)
    record = json.loads((out / "run.json").read_text())
    assert record["machine_plan"]["packing"] is True and record["machine_plan"]["reasons"]["packing"] == "requested"
    assert record["trainer_args"]["packing"] is True
    losses = [h["loss"] for h in record["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # finite, not NaN
    # two packed rows of up to 128 tokens per step hold far more than two ~50-token rows
    assert record["log_history"][-1].get("num_input_tokens_seen", 0) > 2 * 2 * 60
