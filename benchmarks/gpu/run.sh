#!/usr/bin/env bash
# Every GPU goal in one command (issue 23), on the GPU machine with the folder prepare.sh built carried along:
#     bash benchmarks/gpu/run.sh                       # writes summary.md, results.json and log.txt to $OUT
#     bash benchmarks/gpu/run.sh --steps dpo-1b        # re-run some steps only
#     bash benchmarks/gpu/run.sh --tiny --out DIR      # the same steps on a 2-layer model, on any machine (CI)
# Where the Python lacks what the project imports (the GPU image), the carried wheels go into a temporary site dir put
# first on PYTHONPATH; nothing is installed into the image.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
SITE="${ALIGNMERGE_GPU_SITE:-/tmp/alignmerge-gpu-site}"
if ! "$PY" -c "import trl, datasets, pydantic" 2>/dev/null && compgen -G ".gpu-carry/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .gpu-carry/wheels/*.whl || exit 2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
args=("$@")
if [[ " $* " != *" --out "* ]]; then
    args+=(--out "${OUT:?no output folder: set OUT or pass --out DIR}")
fi
exec "$PY" benchmarks/gpu/suite.py "${args[@]}"
