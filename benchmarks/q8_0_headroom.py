"""How much weight error can a model take before its round-trip top-1 agreement drops below 99%, and can any Q8_0
file get there? Issue 16's Q8_0 target, measured against what the format allows.

    python benchmarks/q8_0_headroom.py [--model smollm2-135m | RUNDIR/merged] [--skip-gptq]

Every row perturbs the source model's matrices in memory and scores the fixed round-trip prompt set
(`align.export`) against the unperturbed source, as `align export --verify` does with a file:

- `q8_0`: ggml's reference rounding (what `align export --type q8_0` writes), then the same error scaled by 1/2 and
  1/4, which is about what a block format with one or two more bits per weight would leave;
- `gaussian`: random noise with Q8_0's error RMS per row (is it the size of the error or its pattern?);
- `bf16`: the weights rounded to bfloat16 (8 significant bits, no block scale);
- `q8_0 only in X`: one kind of matrix quantized, the rest exact (where the flips come from);
- `q8_0 gptq`: a GPTQ-style rounding onto the same Q8_0 grid (a scale per 32 weights, levels in -128..127) that
  carries each column's rounding error into the columns not yet rounded, weighted by the layer inputs' second
  moments. It is calibrated on the very prompts it is scored on, which favours it: if this misses, no rounding
  onto Q8_0's grid chosen without seeing the scores will do better.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MATRIX_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q8_0_BLOCK = 32


def reference_q8_0(weight: torch.Tensor) -> torch.Tensor:
    import gguf

    q8_0 = gguf.GGMLQuantizationType.Q8_0
    data = weight.float().numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, q8_0), q8_0)).reshape(weight.shape)


def input_second_moments(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """X^T X of every decoder-layer linear's inputs over `batches` (GPTQ's Hessian, up to a factor 2)."""
    moments: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def add(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            moments[name] = moments.get(name, 0) + x.T @ x
        return add

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return moments


def gptq_q8_0(weight: torch.Tensor, moments: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022, column by column) onto Q8_0's grid: (levels, f16 scale per 32-column block).

    Each block's scale is set as ggml's reference rounding sets it (`quantize_row_q8_0_ref`: d = max |w| / 127 in
    fp32, levels rounded half away from zero from w / d, d stored as f16), from the block's weights as they stand
    when it is reached; so with uncorrelated inputs, where no error is carried, this is the reference rounding."""
    w = weight.double().clone()
    rows, columns = w.shape
    h = moments.clone()
    h += damp * h.diagonal().mean() * torch.eye(columns, dtype=torch.float64)
    inverse_factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = torch.zeros_like(w)
    scales = torch.zeros(rows, columns // Q8_0_BLOCK, dtype=torch.float16)
    for col in range(columns):
        block = col // Q8_0_BLOCK
        if col % Q8_0_BLOCK == 0:
            d = w[:, col:col + Q8_0_BLOCK].abs().amax(1).float() / 127
            inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            scales[:, block] = d.half()
        x = (w[:, col].float() * inverse).double()
        levels[:, col] = torch.clamp(torch.sign(x) * torch.floor(x.abs() + 0.5), -128, 127)
        error = (w[:, col] - levels[:, col] * scales[:, block].double()) / inverse_factor[col, col]
        w[:, col:] -= error[:, None] * inverse_factor[col, col:][None, :]
    return levels, scales


def dequantized(levels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return levels.float() * scales.float().repeat_interleave(Q8_0_BLOCK, dim=1)


def main() -> None:
    from align.export import LogitTally, load_export_tokenizer, load_merged_model, round_trip_prompts
    from align.core.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip-gptq", action="store_true")
    args = parser.parse_args()
    resolved = resolve_model(args.model)
    tokenizer = load_export_tokenizer(resolved)
    model = load_merged_model(resolved, tokenizer).eval()
    batches = [torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
               for prompt in round_trip_prompts(tokenizer)]

    def logits() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(batch).logits[0].clone() for batch in batches]

    source = logits()
    leads = torch.cat([s.double().topk(2, -1).values for s in source])
    leads = leads[:, 0] - leads[:, 1]
    print(f"{args.model}: {len(batches)} prompts, {leads.numel()} positions; source's lead of best over runner-up "
          + ", ".join(f"< {m}: {int((leads < m).sum())}" for m in (0.01, 0.03, 0.1)))
    # named_parameters lists a tied embedding / output matrix once (state_dict names it twice)
    matrices = {name: p.data for name, p in model.named_parameters() if p.ndim == 2}
    exact = {name: tensor.clone() for name, tensor in matrices.items()}
    q8_0 = {name: reference_q8_0(tensor) for name, tensor in exact.items()}

    def score(label: str, perturbed: Callable[[str], torch.Tensor]) -> None:
        for name, tensor in matrices.items():
            tensor.copy_(perturbed(name))
        tally = LogitTally()
        for s, e in zip(source, logits()):
            tally.add(s, e)
        print(f"| {label} | {tally.agree / tally.positions:.4f} ({tally.positions - tally.agree} flips) | "
              f"{tally.clear_agree} / {tally.clear} | {tally.kl / tally.positions:.2e} |", flush=True)

    print("\n| weights | top-1 agreement | where clear | mean KL |\n|---|---|---|---|")
    for factor in (1.0, 0.5, 0.25):
        score(f"q8_0 error x {factor}", lambda n, f=factor: exact[n] + f * (q8_0[n] - exact[n]))
    noise = torch.Generator().manual_seed(0)
    score("gaussian, q8_0's error RMS per row", lambda n: exact[n] + torch.randn(
        exact[n].shape, generator=noise) * (q8_0[n] - exact[n]).pow(2).mean(-1, keepdim=True).sqrt())
    score("bf16", lambda n: exact[n].bfloat16().float())
    for kind in MATRIX_KINDS:
        score(f"q8_0 only in {kind}", lambda n, k=kind: q8_0[n] if f".{k}." in n else exact[n])
    if not args.skip_gptq:
        for name, tensor in matrices.items():
            tensor.copy_(exact[name])
        moments = input_second_moments(model, batches)
        start = time.perf_counter()
        gptq = {name: dequantized(*gptq_q8_0(exact[name], moments[name.removesuffix(".weight")]))
                if name.removesuffix(".weight") in moments else q8_0[name] for name in exact}
        score(f"q8_0 gptq, calibrated on these prompts ({time.perf_counter() - start:.0f} s)", lambda n: gptq[n])


if __name__ == "__main__":
    main()
