#!/usr/bin/env bash
# Run the test suite on a fresh machine: set up .venv, then pytest (extra arguments go to pytest).
# pytest exits 5 when it collects no tests; that fails this script too.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m pytest "$@"
