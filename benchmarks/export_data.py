"""Write a built-in dataset (or HH-style multi-turn preference pairs) as jsonl, to carry to a machine without this
checkout's generators (a GPU box) and pass to the benchmarks' `--data`.

    .venv/bin/python benchmarks/export_data.py builtin:pig-latin -o data/pig-latin.jsonl
    .venv/bin/python benchmarks/export_data.py builtin:pig-latin-prefs --split seen -o data/prefs-seen.jsonl
    .venv/bin/python benchmarks/export_data.py hh-style --rows 570 -o data/hh.jsonl   # long multi-turn pairs
    .venv/bin/python benchmarks/export_data.py hh-style-chat --rows 640 -o data/hh-chat.jsonl   # the same, as SFT

`hh-style` rows are Anthropic-HH-like dialogues (2-3 user turns, long assistant turns, the chosen and rejected
conversations differing in the last answer) drawn from common English words with a seed: 300-500 tokens a pair
with SmolLM2's tokenizer, the kind of rows issue 12's precompute check failed on in bf16. They are preference
pairs (`align dpo`, `dpo_memory.py`); `hh-style-chat` writes the chosen conversations of the same draw as OpenAI
`messages` rows, which SFT readers (`align sft`, `sft_throughput.py`, `estimate_accuracy.py`) take.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any


def hh_style_pairs(rows: int, seed: int = 0) -> list[dict[str, Any]]:
    from align.core.demo import common_words

    rng = random.Random(seed)
    words = list(common_words(3000))

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."

    out = []
    for _ in range(rows):
        turns: list[dict[str, str]] = []
        for _ in range(rng.randint(2, 3)):
            turns.append({"role": "user", "content": " ".join(sentence(12) for _ in range(2))})
            turns.append({"role": "assistant", "content": " ".join(sentence(14) for _ in range(rng.randint(3, 6)))})
        turns.append({"role": "user", "content": sentence(15)})
        chosen = " ".join(sentence(16) for _ in range(rng.randint(2, 5)))
        rejected = " ".join(sentence(16) for _ in range(rng.randint(1, 4)))
        out.append({"chosen": turns + [{"role": "assistant", "content": chosen}],
                    "rejected": turns + [{"role": "assistant", "content": rejected}]})
    return out


def hh_style_chats(rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """The chosen conversations of `hh_style_pairs` (the same draw), as SFT rows."""
    return [{"messages": pair["chosen"]} for pair in hh_style_pairs(rows, seed)]


def rows_of(source: str, split: str, limit: int | None, seed: int) -> list[dict[str, Any]]:
    if source == "hh-style":
        return hh_style_pairs(limit or 570, seed)
    if source == "hh-style-chat":
        return hh_style_chats(limit or 570, seed)
    from align.core.demo import builtin_dataset

    rows = builtin_dataset(source.removeprefix("builtin:"), split)
    return rows[:limit] if limit else rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="builtin:NAME (pig-latin, pig-latin-prefs, reverse-words), hh-style (pairs) or "
                                           "hh-style-chat (SFT)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--rows", type=int, help="at most this many rows (hh-style*: how many, default 570)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    rows = rows_of(args.source, args.split, args.rows, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(args.output)
    print(f"{len(rows)} rows -> {args.output}")


if __name__ == "__main__":
    main()
