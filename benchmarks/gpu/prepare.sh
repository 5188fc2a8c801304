#!/usr/bin/env bash
# Build .gpu-carry/ (git ignores it) for the GPU machine, here, before a GPU is lent (issue 23):
#   wheels/     CPython 3.12 manylinux x86_64 wheels of exactly what the project imports and the GPU image lacks,
#               each with --no-deps and every dependency named (the image has torch 2.11+cu130, transformers 5.17,
#               peft, accelerate 1.15, tokenizers, safetensors, numpy, pandas, pyarrow, triton; no trl, datasets,
#               pydantic, bitsandbytes or liger-kernel), at the versions this checkout's .venv runs;
#               bitsandbytes trimmed to its CUDA 13.x and CPU libraries (41 MiB -> about 4 MiB);
#   tokenizer/  SmolLM2's tokenizer (the random-init models' vocabulary);
#   data/       HH-style multi-turn chat rows (SFT) and pairs (DPO) from benchmarks/export_data.py.
# Prints what travels (the working tree and this folder) and fails above the device tool's 64 MiB.
#     bash benchmarks/gpu/prepare.sh            then, on the GPU machine: bash benchmarks/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
CARRY=.gpu-carry
LIMIT=$((64 * 1024 * 1024))

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# what the project imports that the image lacks, and what those need that the image lacks too
NEEDED=(trl datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection typing-extensions
        bitsandbytes)
SPECS=()
for name in "${NEEDED[@]}"; do SPECS+=("$name==$(version "$name")"); done
SPECS+=("liger-kernel==${LIGER_VERSION:-0.8.5}")  # CUDA only: not in this CPU checkout's .venv

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/data"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" "${SPECS[@]}"

# bitsandbytes loads libbitsandbytes_cuda<torch's CUDA>.so (cuda130 for torch 2.11+cu130) or the CPU one: the other
# CUDA, ROCm and XPU builds are 37 MiB of the wheel. Their files and RECORD lines are dropped.
"$PY" - "$CARRY"/wheels/bitsandbytes-*.whl <<'PYTHON'
import re, sys, zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d*)\.(so|dylib|dll)$")
trimmed = wheel.with_suffix(".trimmed")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
    dropped = {i.filename for i in src.infolist() if "libbitsandbytes_" in i.filename and not keep.search(i.filename)}
    for info in src.infolist():
        if info.filename in dropped:
            continue
        data = src.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(line for line in data.decode().splitlines(keepends=True)
                           if line.split(",")[0] not in dropped).encode()
        dst.writestr(info, data)
trimmed.replace(wheel)
print(f"bitsandbytes: dropped {len(dropped)} libraries")
PYTHON

"$PY" - "$CARRY/tokenizer" <<'PYTHON'
import sys
sys.path.insert(0, "benchmarks")
from transformers import AutoTokenizer
from make_model import tokenizer_source

AutoTokenizer.from_pretrained(tokenizer_source(None)).save_pretrained(sys.argv[1])
PYTHON
"$PY" benchmarks/export_data.py hh-style-chat --rows 640 -o "$CARRY/data/sft.jsonl"
"$PY" benchmarks/export_data.py hh-style --rows 640 -o "$CARRY/data/pairs.jsonl"

carry=$(du -sb "$CARRY" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
shared=$( [ -d shared ] && du -sb shared | cut -f1 || echo 0)
total=$((carry + tree + shared))
printf 'travels: %s of %s (working tree %s, .gpu-carry %s)\n' "$(numfmt --to=iec-i --suffix=B $total)" \
    "$(numfmt --to=iec-i --suffix=B $LIMIT)" "$(numfmt --to=iec-i --suffix=B $tree)" "$(numfmt --to=iec-i --suffix=B $carry)"
ls -l "$CARRY/wheels"
if [ "$total" -gt "$LIMIT" ]; then
    echo "error: $total bytes would travel, over the 64 MiB the device tool carries" >&2
    exit 2
fi
