"""Q8_0 block scales: ggml's reference rounding (amax / 127, what `align export` writes) against least-squares scale
searches, on the embedded model and on a model fine-tuned from it.

    python benchmarks/q8_0_scales.py [--merged RUNDIR/merged] [--variants ref,narrow,112-128,64-128] [--no-round-trip]

Per variant: the relative weight error, the share of the fine-tune delta (merged - base) the file keeps (projection,
1.0 = unbiased), and, unless --no-round-trip, `align export --type q8_0` with that quantizer and its round trip
(top-1 agreement, mean KL). `narrow` is llama.cpp's make_qx_quants search (scales -(128 + 0.1 i) / max, i in -9..9,
each refitted by least squares); the wide variants search further. The table in benchmarks/RESULTS.md (issue 16)
came from this code."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS: dict[str, list[float] | None] = {
    "ref": None,
    "narrow": [128 + 0.1 * i for i in range(-9, 10)],
    "112-128": [128 - 0.25 * i for i in range(65)],
    "64-128": [128 - 0.25 * i for i in range(257)],
}
MATRICES = ("model.layers.3.mlp.up_proj.weight", "model.layers.10.self_attn.q_proj.weight",
            "model.layers.20.mlp.down_proj.weight")


def searched(blocks: torch.Tensor, candidates: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the candidate grid whose least-squares scale leaves the smallest squared error."""
    signed_max = blocks.gather(1, blocks.abs().argmax(1, keepdim=True))
    best = torch.full((blocks.shape[0],), -1.0, dtype=torch.float64)
    levels, scale = torch.zeros_like(blocks), torch.zeros(blocks.shape[0])
    for nmax in candidates:
        inverse = torch.where(signed_max == 0, torch.zeros_like(signed_max), -nmax / signed_max)
        q = torch.clamp(torch.round(inverse * blocks), -128, 127)
        sumlx, suml2 = (blocks * q).sum(1).double(), (q * q).sum(1).double().clamp_min(1e-30)
        score = sumlx * sumlx / suml2  # the squared error left is sum(x^2) - score
        better = score > best
        best = torch.where(better, score, best)
        levels = torch.where(better[:, None], q, levels)
        scale = torch.where(better, (sumlx / suml2).float(), scale)
    return levels, scale


def quantize(data: np.ndarray, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(-1, 32)
    return searched(blocks, VARIANTS[variant])


def dequantized(data: np.ndarray, variant: str) -> torch.Tensor:
    import gguf

    if VARIANTS[variant] is None:  # what `align export` writes: gguf's bit-exact port of ggml's reference rounding
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, q8_0), q8_0)).reshape(-1, 32)
    levels, scale = quantize(data, variant)
    return levels * scale.half().float()[:, None]  # the file stores the scale as f16


def q8_0_bytes(data: np.ndarray, variant: str) -> np.ndarray:
    levels, scale = quantize(data, variant)
    blocks = np.concatenate([scale.numpy().astype(np.float16).view(np.uint8).reshape(-1, 2),
                             levels.numpy().astype(np.int8).view(np.uint8)], axis=1)
    return blocks.reshape(*data.shape[:-1], data.shape[-1] // 32 * 34)


def weight_table(base_dir: Path, merged_dir: Path | None, variants: list[str]) -> None:
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    merged = load_file(str(merged_dir / "model.safetensors")) if merged_dir else None
    for name in MATRICES:
        weights = (merged or base)[name].float()
        row = [name.removeprefix("model.")]
        for variant in variants:
            error = dequantized(weights.numpy(), variant).reshape(weights.shape) - weights
            cell = f"{variant}: error {100 * float(error.norm() / weights.norm()):.3f}%"
            if merged is not None:
                delta = weights - base[name].float()
                kept = float(((error + delta) * delta).sum() / (delta * delta).sum())
                cell += f", delta kept {kept:.3f}"
            row.append(cell)
        print(" | ".join(row), flush=True)


def round_trips(spec: str, variants: list[str]) -> None:
    import gguf

    import align.export as export

    plain = export.encode_tensor
    for variant in variants:
        def encode(data, export_type, variant=variant):
            if export_type == "q8_0" and data.ndim > 1 and data.shape[-1] % 32 == 0:
                return q8_0_bytes(data, variant), gguf.GGMLQuantizationType.Q8_0
            return plain(data, export_type)

        if VARIANTS[variant] is not None:  # "ref" round-trips what `align export` writes (gguf's bit-exact ggml port)
            export.encode_tensor = encode
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            result = export.export_gguf(spec, Path(scratch) / "m.gguf", "q8_0")
            seconds = time.perf_counter() - started
            check = export.verify_round_trip(spec, result.path)
        export.encode_tensor = plain
        print(f"{spec} {variant}: export {seconds:.1f} s, top-1 agreement {check.top1_agreement:.4f} "
              f"(clear {check.top1_agreement_clear:.4f}), mean KL {check.mean_kl:.2e}, "
              f"max abs diff {check.max_abs_diff:.3f}, {check.positions} positions", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merged", type=Path, help="a model dir fine-tuned from the embedded model")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-round-trip", action="store_true")
    args = parser.parse_args()
    from align.core.models import resolve_model

    variants = args.variants.split(",")
    weight_table(Path(resolve_model("smollm2-135m").base), args.merged, variants)
    if not args.no_round_trip:
        for spec in ["smollm2-135m"] + ([str(args.merged)] if args.merged else []):
            round_trips(spec, variants)


if __name__ == "__main__":
    main()
