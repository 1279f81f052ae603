#!/usr/bin/env bash
# The GPU smoke check (scripts/gpu_smoke.py says what it checks and why each tolerance):
#
#   bash scripts/gpu-smoke.sh [--out DIR|FILE]          on a machine with one NVIDIA GPU
#   bash scripts/gpu-smoke.sh --cpu [--out DIR|FILE]    anywhere, in a minute or two
#
# Writes gpu-smoke.json (to --out, else $OUT, else the current folder) and exits non-zero if a
# check failed. Python: $SAMI_PYTHON, else the project's .venv, else python3 on PATH (the
# worker image's). Offline: nothing is fetched from a model hub. The whole run is capped at
# 540 s; the script stops its own checks earlier and still writes the report.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${SAMI_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then
    python="$root/.venv/bin/python"
  else
    python=$(command -v python3 || true)
  fi
fi
if [ -z "$python" ]; then
  echo "gpu-smoke: no Python found (set SAMI_PYTHON, or run make venv)" >&2
  exit 2
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
# timeout signals its whole process group: the script reports, then stops its checks.
exec timeout --kill-after=30 540 "$python" "$root/scripts/gpu_smoke.py" "$@"
