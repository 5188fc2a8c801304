"""QLoRA preparation: a 4-bit base keeps its non-quantized tensors in the compute dtype (issue 12: PEFT's
prepare_model_for_kbit_training upcast them all to fp32 and made 4-bit cost more memory than bf16 LoRA)."""

from __future__ import annotations

import pytest
import torch

from align.core.config import LoraSpec
from align.core.models import LoadOptions, load_model, resolve_model
from align.train.training import QLORA_FP32_EXCEPTIONS, attach_lora, is_qlora_fp32_exception, prepare_quantized

pytest.importorskip("bitsandbytes")


def fp32_tensors(model) -> list[str]:
    """Floating parameters and buffers held in fp32 that are not among the named exceptions."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in named if t.dtype == torch.float32 and not is_qlora_fp32_exception(name)]


def load_4bit(model_dir, dtype: str = "bfloat16"):
    return load_model(resolve_model(str(model_dir)), LoadOptions(dtype=dtype, quantize="4bit"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prepared_4bit_model_holds_nothing_in_fp32_beyond_the_named_exceptions(tiny_model_dir, checkpointing):
    model = attach_lora(load_4bit(tiny_model_dir), LoraSpec(r=8, target_modules="all-linear"),
                        gradient_checkpointing=checkpointing, seed=0)
    assert getattr(model, "is_loaded_in_4bit", False)
    assert fp32_tensors(model) == []
    # the exceptions are really there (the check is not vacuous) and they are the only trainable tensors
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_qlora_fp32_exception(n) for n in trainable)
    assert {n.split(".")[-3] for n in trainable} <= set(QLORA_FP32_EXCEPTIONS)
    # embeddings, the head and the norms are in the compute dtype
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.bfloat16 for p in norms)


def test_peft_kbit_preparation_would_fail_the_same_check(tiny_model_dir):
    """The check above can fail: PEFT's prepare_model_for_kbit_training leaves embeddings, head and norms in fp32."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(load_4bit(tiny_model_dir), use_gradient_checkpointing=False)
    upcast = fp32_tensors(model)
    assert any("embed_tokens" in n for n in upcast) and any("norm" in n for n in upcast)


def test_checkpointing_enables_input_grads_so_lora_gets_gradients(tiny_model_dir):
    """The frozen embeddings' output must require grad, or checkpointed layers (non-reentrant: no graph without an
    input that requires grad) pass no gradient to the LoRA weights inside them."""
    ids = torch.tensor([[5, 6, 7, 8]])
    for checkpointing in (True, False):
        model = load_4bit(tiny_model_dir).requires_grad_(False)  # as get_peft_model leaves the base
        model = prepare_quantized(model, gradient_checkpointing=checkpointing)
        assert model.get_input_embeddings()(ids).requires_grad is checkpointing


def test_a_prepared_4bit_model_trains_its_adapter(tiny_model_dir):
    """One backward through the checkpointed 4-bit model reaches every LoRA weight."""
    model = attach_lora(load_4bit(tiny_model_dir), LoraSpec(r=8, target_modules="all-linear"),
                        gradient_checkpointing=True, seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(4, 60, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # B starts at zero, so at init only B gets a non-zero gradient; every layer's B must (checkpointed or not)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
