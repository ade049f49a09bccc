#!/usr/bin/env bash
# The GPU check on a lent GPU machine (its python3 has torch, transformers and peft, and nothing can be downloaded):
#   benchmarks/gpu_check.sh --json "$OUT/gpu_check.json"
# Arguments go to benchmarks/gpu_check.py; the repository root goes on PYTHONPATH (crlft and benchmarks are imported
# from the working tree, not installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
