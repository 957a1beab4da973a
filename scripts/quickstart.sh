#!/usr/bin/env bash
# Set up .venv, then show the model working on the CPU: build model=tiny, run a forward pass with an
# image, greedy-generate with the KV cache, and round-trip it through the Hugging Face format.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python scripts/quickstart.py "$@"
