#!/usr/bin/env bash
# Run the GPU acceptance check with the checkout's virtual environment (.venv), from the repository root:
#   tools/gpu_check.sh --json gpu_check.json      (real check, one CUDA device)
#   tools/gpu_check.sh --dry-run                  (the same code on CPU, tiny shapes)
# Arguments are passed on to tools/gpu_check.py; its exit status is this script's.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${root}/.venv/bin/python"
[[ -x "${python}" ]] || python="$(command -v python3 || command -v python)"
cd "${root}"
exec "${python}" tools/gpu_check.py "$@"
