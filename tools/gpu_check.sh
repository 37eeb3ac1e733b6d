#!/usr/bin/env bash
# The one-call GPU check (docs/benchmarks.md, "One-call GPU check"). On a GPU machine without network, in the
# repository root with gpu_check/wheels carried beside it (made here by `python tools/gpu_check.py prepare`):
#
#     bash tools/gpu_check.sh [--budget-s 450] [--parts pretrain,model_only] [--batch 256] ...
#
# Installs the wheels into gpu_check/site (never touching the machine's own packages), runs every part and prints
# ONE JSON object on stdout, within 8 minutes; progress goes to stderr, each part's log to gpu_check/run/logs.
# PYTHON picks the interpreter (default python3: the one that has torch, torchvision and timm).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    printf '{"error": "no Python interpreter %s here: set PYTHON=/path/to/python"}\n' "$PYTHON"
    exit 1
fi
output=$("$PYTHON" tools/gpu_check.py run "$@")
status=$?
if [ -z "$output" ]; then
    # the helper died before printing (a bad option, a crash): still one JSON object, naming what to look at
    printf '{"error": "tools/gpu_check.py run exited with %d before printing its result; see stderr"}\n' "$status"
    exit 1
fi
printf '%s\n' "$output"
exit "$status"
