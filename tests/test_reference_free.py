"""`align orpo` and `align simpo`: the trainers are TRL's experimental ones, so their losses are pinned here by a hand
computation on a tiny batch (the issue's condition for building on `trl.experimental`), and both commands are run end
to end on a tiny model, with the reference-free contract (no `--ref`) checked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl

PAIRS = [{"prompt": [{"role": "user", "content": f"say {word}"}],
          "chosen": [{"role": "assistant", "content": f"{word} indeed"}],
          "rejected": [{"role": "assistant", "content": f"not {word} at all"}]}
         for word in ("cat", "dog", "owl", "bee")]


def first_batch(method: str, tiny_model_dir, tmp_path, **settings):
    """TRL's trainer as `align <method>` builds it (align.train.preference.build, with the method's fixed
    arguments), and its first training batch."""
    from transformers import AutoModelForCausalLM

    from align.core.config import LoraSpec
    from align.core.models import load_tokenizer, resolve_model
    from align.train.methods import METHODS
    from align.train.orpo import ORPO
    from align.train.preference import build
    from align.train.simpo import SIMPO
    from align.train.training import lora_config

    how = {"orpo": ORPO, "simpo": SIMPO}[method]
    args = how.arguments({"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "report_to": [],
                          "use_cpu": True, "max_steps": 1, "seed": 0, **settings})
    config = METHODS[method].config_class()(**args)
    tokenizer = load_tokenizer(resolve_model(str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    trainer = build(how, model, lora_config(LoraSpec(dropout=0.0)), config, tokenizer, SimpleNamespace(
        train=PAIRS, eval=[]), [])
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, batch


def mean_logps(model, input_ids, attention_mask, labels):
    """Per sequence: the mean log-probability of the completion tokens (labels != -100), and their count."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    summed = (token_logps * mask).sum(-1)
    return summed / mask.sum(-1), summed, mask.sum(-1)


def sides(trainer, batch):
    model = trainer.model.eval()
    with torch.no_grad():
        chosen = mean_logps(model, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
        rejected = mean_logps(model, batch["rejected_input_ids"], batch["rejected_attention_mask"],
                              batch["rejected_labels"])
        loss = float(trainer.compute_loss(model, batch))
    return chosen, rejected, loss


def test_orpo_loss_is_sft_nll_minus_beta_log_sigmoid_log_odds(tiny_model_dir, tmp_path):
    trainer, batch = first_batch("orpo", tiny_model_dir, tmp_path, beta=0.25)
    (chosen, _, _), (rejected, _, _), loss = sides(trainer, batch)
    # TRL 1.16 takes ORPO's SFT term over the whole chosen sequence, prompt included (its comment says so; the
    # paper's L_SFT is on the answer): pinned as it is
    whole = torch.where(batch["chosen_attention_mask"] == 1, batch["chosen_input_ids"], -100)
    with torch.no_grad():
        _, whole_sum, whole_tokens = mean_logps(trainer.model, batch["chosen_input_ids"],
                                                batch["chosen_attention_mask"], whole)
    nll = -whole_sum.sum() / whole_tokens.sum()
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    expected = nll - 0.25 * F.logsigmoid(log_odds).mean()
    assert loss == pytest.approx(float(expected), abs=1e-4)
    assert float(expected) != pytest.approx(float(nll), abs=1e-3)  # the odds-ratio term counts


def test_simpo_loss_is_the_length_normalized_margin_with_a_target_gap(tiny_model_dir, tmp_path):
    trainer, batch = first_batch("simpo", tiny_model_dir, tmp_path, beta=2.0, simpo_gamma=0.7, cpo_alpha=0.0)
    (chosen, chosen_sum, _), (rejected, rejected_sum, _), loss = sides(trainer, batch)
    expected = -F.logsigmoid(2.0 * (chosen - rejected) - 0.7).mean()
    assert loss == pytest.approx(float(expected), abs=1e-4)
    unnormalized = -F.logsigmoid(2.0 * (chosen_sum - rejected_sum) - 0.7).mean()  # what length normalization changes
    assert float(unnormalized) != pytest.approx(float(expected), abs=1e-3)


def test_simpo_keeps_its_loss_type(tmp_path):
    from align.core.errors import AlignError
    from align.train.simpo import SIMPO

    assert SIMPO.arguments({"beta": 2.0})["loss_type"] == "simpo"
    with pytest.raises(AlignError, match="simpo is loss_type='simpo'"):
        SIMPO.arguments({"loss_type": "sigmoid"})


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_command_trains_without_a_reference(method, tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from align.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    out = tmp_path / method
    result = CliRunner().invoke(main, [method, "--model", str(tiny_model_dir), "--data", str(data), "-o", str(out),
                                       "--max-steps", "2", "--batch-size", "2", "--report-to", "none"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == method and record["reference"] is None
    assert len([h for h in record["log_history"] if "loss" in h]) == 2
    assert (out / "adapter_model.safetensors").is_file() and (out / "rewards.png").is_file()


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_a_reference_is_refused_in_one_line(method, tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from align.cli import main

    result = CliRunner().invoke(main, [method, "--model", str(tiny_model_dir), "--ref", "adapter",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "reference-free" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
