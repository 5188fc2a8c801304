"""`prepare_reference` compares the frozen "ref" adapter with the SFT adapter's saved weights, in whatever format
PEFT saved them, and refuses to pass when there is nothing to compare with."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from align.core.errors import AlignError
from align.train.reference import ReferencePlan, prepare_reference


def saved_adapter(model_dir: Path, out: Path, safe: bool = True) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(out), safe_serialization=safe)
    return out


def trainer_with_reference(model_dir: Path, adapter: Path) -> SimpleNamespace:
    """What TRL builds for adapter-as-reference: the adapter as "default" (trainable) and as "ref"."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter),
                                      is_trainable=True)
    model.load_adapter(str(adapter), adapter_name="ref")
    return SimpleNamespace(model=model)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_the_reference_is_compared_with_the_saved_weights_in_either_format(tiny_model_dir, tmp_path, safe):
    adapter = saved_adapter(tiny_model_dir, tmp_path / "sft", safe)
    trainer = trainer_with_reference(tiny_model_dir, adapter)
    plan = ReferencePlan(mode="adapter", adapter=adapter)
    prepare_reference(trainer, plan)
    ref = next(p for n, p in trainer.model.named_parameters() if ".ref." in n and "lora_B" in n)
    with torch.no_grad():
        ref.add_(1.0)
    with pytest.raises(AlignError, match="does not hold the weights saved in"):
        prepare_reference(trainer, plan)


def test_no_saved_weights_is_an_error_not_a_silent_pass(tiny_model_dir, tmp_path):
    adapter = saved_adapter(tiny_model_dir, tmp_path / "sft")
    trainer = trainer_with_reference(tiny_model_dir, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AlignError, match=r"--ref adapter: .*sft has no adapter_model.safetensors"):
        prepare_reference(trainer, ReferencePlan(mode="adapter", adapter=adapter))
