"""Build a random-init causal LM of a named shape with a given tokenizer, written as safetensors: benchmarks of size
need no hub access (issue 12).

    .venv/bin/python benchmarks/make_model.py llama-1b --tokenizer DIR -o models/llama-1b
    .venv/bin/python benchmarks/make_model.py tiny -o /tmp/tiny          # the embedded model's tokenizer

Shapes (Llama architecture, SwiGLU MLP, RoPE, grouped-query attention):
  tiny      2 layers, hidden 64: CPU smoke runs of every benchmark
  llama-1b  16 layers, hidden 2048, MLP 8192, 32/8 heads, tied embeddings: issue 12's 1.07B GPU model
  llama-3b  28 layers, hidden 3072, MLP 8192, 24/8 heads, tied embeddings (Llama-3.2-3B's shape)
  llama-8b  32 layers, hidden 4096, MLP 14336, 32/8 heads, untied (Llama-3.1-8B's shape)
The vocabulary is the tokenizer's (rounded up to a multiple of 64); weights are drawn with the config's
initializer_range in the dtype asked (bf16 by default), directly on the meta device then materialized layer by
layer, so an 8B model needs no fp32 copy in memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=False),
}


def tokenizer_source(spec: str | None) -> str:
    """A tokenizer dir; by default the embedded model's (SmolLM2's, vocabulary 49152)."""
    if spec:
        return spec
    from align.core.models import resolve_model

    return resolve_model("smollm2-135m").base


def build(shape: str, tokenizer_dir: str, out: Path, dtype: str = "bfloat16", seed: int = 0,
          max_positions: int = 8192, device: str = "cpu") -> dict[str, Any]:
    """`device`: where the weights are drawn (cuda draws a 3B model in a second; the CPU takes minutes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from align.core.models import ensure_chat_template, ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype=dtype, **SHAPES[shape])
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range, generator=generator)
    model.tie_weights()  # RoPE's inv_freq, left empty by to_empty, is a non-persistent buffer: rebuilt at load
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    summary = {"shape": shape, "parameters": sum(p.numel() for p in model.parameters()), "vocab": vocab,
               "dtype": dtype, "tokenizer": tokenizer_dir, "path": str(out)}
    (out / "make_model.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the embedded SmolLM2-135M's)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to draw the weights (cuda: seconds for a 3B model)")
    args = parser.parse_args()
    print(json.dumps(build(args.shape, tokenizer_source(args.tokenizer), args.output, args.dtype, args.seed,
                           device=args.device)))


if __name__ == "__main__":
    main()
