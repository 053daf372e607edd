#!/bin/sh
# Installs the CPU LLM stack into the venv given as $1 (python path). Idempotent. Filled in by the LLM issue.
set -eu
PY="$1"
exit 0
