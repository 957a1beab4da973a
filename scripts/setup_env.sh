#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned dependencies and this package, editable.
# Sourced by scripts/test.sh and scripts/quickstart.sh; safe to run again (it re-installs only
# when requirements.txt, setup.cfg or pyproject.toml changed).
set -euo pipefail
ARIA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ARIA_ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ARIA_ROOT/.venv"

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "[setup] error: Python >= 3.10 is needed; set PYTHON=/path/to/python3.10+" >&2
    exit 1
  fi
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV" || { echo "[setup] error: '$PYTHON -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
fi
want="$(cat requirements.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.aria-installed" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned dependencies into .venv (a few minutes on a fresh machine)"
  # torch first and pinned, so that no later requirement pulls in another build. (On machines whose
  # pip index serves the CPU wheel this is the small CPU build; stock PyPI on Linux serves CUDA.)
  "$VENV/bin/python" -m pip install -q "$(grep -E '^torch==' requirements.txt)"
  # deepspeed ships as source only; DS_BUILD_OPS=0 skips compiling its CUDA/C++ ops.
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -r requirements.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  echo "$want" > "$VENV/.aria-installed"
fi

# Everything runs offline: no hub downloads, no wandb uploads, DeepSpeed on the CPU accelerator
# unless a GPU is present.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export WANDB_MODE="${WANDB_MODE:-disabled}" TOKENIZERS_PARALLELISM=false
# torch asks for transparent huge pages for every CPU tensor of 2 MB or more: a fresh tensor is then
# faulted in 2 MB pages, not 4 KB ones (quickstart steps ~11% faster; docs/performance.md).
export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi
export PATH="$VENV/bin:$PATH"
