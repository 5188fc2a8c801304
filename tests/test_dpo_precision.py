"""The step-0 reference check in every dtype (issue 12): `--ref precompute` must pass it in bf16 on long multi-turn
rows, and a wrong reference must fail it in bf16, fp16 and fp32."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import reference_adapter_dropped, write_jsonl

from align.core.config import DPORecipe, SFTRecipe
from align.core.errors import AlignError
from align.core.models import cpu_runs_bf16_fast
from align.train.dpo import run_dpo
from align.train.sft import run_sft

import test_dpo
from test_dpo import prefs, record_of, recipe

sft_adapter = test_dpo.sft_adapter  # the module-scoped fixture, shared (an assignment: test arguments may shadow it)


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."


def hh_style_pairs(path: Path, count: int = 64, seed: int = 0) -> Path:
    """Anthropic-HH-like multi-turn dialogues as full `chosen`/`rejected` conversations: three user turns and
    long assistant turns (about 300-500 tokens each pair), differing only in the last answer."""
    from align.core.demo import common_words

    rng = random.Random(seed)
    words = list(common_words(3000))
    rows = []
    for _ in range(count):
        turns = []
        for _ in range(rng.randint(2, 3)):
            turns.append({"role": "user", "content": " ".join(sentence(rng, words, 12) for _ in range(2))})
            turns.append({"role": "assistant", "content": " ".join(sentence(rng, words, 14) for _ in range(rng.randint(3, 6)))})
        turns.append({"role": "user", "content": sentence(rng, words, 15)})
        chosen = " ".join(sentence(rng, words, 16) for _ in range(rng.randint(2, 5)))
        rejected = " ".join(sentence(rng, words, 16) for _ in range(rng.randint(1, 4)))
        rows.append({"chosen": turns + [{"role": "assistant", "content": chosen}],
                     "rejected": turns + [{"role": "assistant", "content": rejected}]})
    return write_jsonl(path, rows)


def alpaca_rows(path: Path, count: int = 32, seed: int = 1) -> Path:
    from align.core.demo import common_words

    rng = random.Random(seed)
    words = list(common_words(3000))
    rows = [{"instruction": sentence(rng, words, 10), "input": "", "output": sentence(rng, words, 20)}
            for _ in range(count)]
    return write_jsonl(path, rows)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_runs_bf16_fast() and not torch.cuda.is_available(),
                    reason="bf16 matmuls are emulated on this CPU (no AVX512-BF16/AMX): the 64 long pairs ran past 12 "
                           "minutes on an AVX2 machine; the tiny-model bf16/fp16 checks in this file still run")
def test_precompute_passes_the_step0_check_in_bf16_on_long_multi_turn_rows(tmp_path):
    """Issue 12's CPU reproduction: the embedded model, an SFT adapter trained on Alpaca-style rows, 64 HH-style
    multi-turn pairs, batch 4, max length 512, --dtype bfloat16. Precomputed and training-time log-probs of the same
    rows differ by bf16 rounding when the batches differ; the check must not mistake that for a wrong reference."""
    sft = run_sft(SFTRecipe.model_validate({
        "model": {"name": "smollm2-135m", "dtype": "bfloat16", "compile": False},
        "data": {"path": str(alpaca_rows(tmp_path / "alpaca.jsonl"))},
        "train": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 128,
                  "save_steps": 1000},
        "output": str(tmp_path / "sft"),
    }), progress=False)
    out = run_dpo(DPORecipe.model_validate({
        "model": {"name": "smollm2-135m", "dtype": "bfloat16", "compile": False},
        "adapter": str(sft),
        "ref": "precompute",
        "data": {"path": str(hh_style_pairs(tmp_path / "hh.jsonl"))},
        "train": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 512, "save_steps": 1000},
        "output": str(tmp_path / "dpo"),
    }), progress=False)
    check = record_of(out)["step0_check"]
    assert check["passed"] and check["max_deviation"] <= check["tolerance"]


# ---- both ways on tiny models, in each dtype ---------------------------------------------------------------------

DTYPES = ["bfloat16", "float16", "float32"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ref", ["adapter", "precompute"])
def test_right_reference_passes_in_every_dtype(dtype, ref, tiny_model_dir, sft_adapter, tmp_path):  # noqa: F811 (the fixture)
    out = run_dpo(recipe(tiny_model_dir, prefs(tmp_path), tmp_path / "out", sft_adapter, ref, dtype=dtype,
                         max_steps=1), progress=False)
    check = record_of(out)["step0_check"]
    assert check["passed"] and check["max_deviation"] <= check["tolerance"]


def reference_without_sft_adapter(monkeypatch) -> None:
    """The silent failure in precompute mode: reference log-probs computed by the base (adapters disabled) while
    the policy starts from the SFT adapter."""
    from trl import DPOTrainer

    original = DPOTrainer.compute_ref_log_probs

    def base_log_probs(self, model, inputs):
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            return original(self, model, inputs)

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", base_log_probs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ref", ["adapter", "precompute"])
def test_wrong_reference_fails_in_every_dtype(dtype, ref, tiny_model_dir, sft_adapter, tmp_path, monkeypatch):  # noqa: F811 (the fixture)
    (reference_without_sft_adapter if ref == "precompute" else reference_adapter_dropped)(monkeypatch)
    with pytest.raises(AlignError, match=rf"step-0 reference check failed for --ref {ref}"):
        run_dpo(recipe(tiny_model_dir, prefs(tmp_path), tmp_path / "out", sft_adapter, ref, dtype=dtype,
                       max_steps=1), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
