#!/usr/bin/env bash
# `make test`: the control plane's binaries, then every test in two lanes, printing how long
# each phase took.
#
# The tests that run pods for real (marker `execute`: the end-to-end demo and the node agent's)
# run on testbeds of their own, and need Traefik, the ingress controller of execute mode and
# the slowest binary to build cold (5-6 min on 2 cores). They form a second lane: Traefik builds
# at the lowest CPU priority, then that lane's tests run beside the others. Most of the other
# tests' time is spent waiting on processes (rounds, timeouts, restarts), not computing, and
# they order themselves fast modules first (tests/conftest.py), so the two lanes share the
# cores without starving each other. Each lane prints its own report; the run fails if either does.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
t0=$SECONDS
phase() { printf '[test] %-52s %5s s\n' "$1" "$2" >&2; }

t=$SECONDS
bash tools/testbed/build.sh core >/dev/null
phase "Go control plane (build.sh core)" $((SECONDS - t))

lane=$(mktemp -d "${TMPDIR:-/tmp}/pollinate-execute-lane.XXXXXX")
# A session of its own, so that stopping the tests (Ctrl-C) stops the whole lane with them;
# build.sh never publishes half a binary.
setsid bash -c '
  cd "$1"; lane=$2; shift 2
  rc=0; nice -n 19 bash tools/testbed/build.sh all >/dev/null 2>"$lane/build.log" || rc=$?
  echo "$SECONDS" >"$lane/build.seconds"
  if [ "$rc" != 0 ]; then echo "$rc" >"$lane/status"; exit; fi
  start=$SECONDS
  # Its own base for temporary folders, apart from the main lane'"'"'s numbered ones (left in
  # place, like those: a pod'"'"'s folders may be bind mounts while its testbed stops).
  base=$(mktemp -d "${TMPDIR:-/tmp}/pytest-execute-lane.XXXXXX")
  rc=0; .venv/bin/python -m pytest -m execute -p no:cacheprovider --basetemp "$base" "$@" \
    >"$lane/pytest.log" 2>&1 || rc=$?
  echo $((SECONDS - start)) >"$lane/pytest.seconds"
  echo "$rc" >"$lane/status"
' _ "$top" "$lane" "$@" &
lane_pid=$!
trap 'kill -- -"$lane_pid" 2>/dev/null || true' INT TERM

t=$SECONDS
status=0
# torch in the main lane's own process (the training unit tests) with one thread: beside the
# other lane, two threads each spun for the core the other lane held (measured: 1.19x the wall
# time and 1.29x the CPU of one thread). Sites started by tests already use one; the execute
# lane's pods size theirs from their CPU request, as in production.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} \
  .venv/bin/python -m pytest -m "not execute" "$@" || status=$?
phase "tests, main lane (pytest -m 'not execute')" $((SECONDS - t))

t=$SECONDS
wait "$lane_pid" || true
echo >&2
echo "==================== lane 2: Traefik, then the tests that run pods (pytest -m execute)" >&2
grep -v ': cached$' "$lane/build.log" >&2 || true
cat "$lane/pytest.log" 2>/dev/null || true
phase "Traefik, built in the background (build.sh all)" "$(cat "$lane/build.seconds" 2>/dev/null || echo '?')"
phase "tests, execute lane (pytest -m execute)" "$(cat "$lane/pytest.seconds" 2>/dev/null || echo '?')"
phase "waited for the execute lane after the main lane" $((SECONDS - t))
lane_status=$(cat "$lane/status" 2>/dev/null || echo 1)
rm -rf "$lane"
# 5: nothing selected (a -k or a path that names no test that runs pods).
if [ "$lane_status" != 0 ] && [ "$lane_status" != 5 ]; then
  echo "[test] the execute lane failed (exit $lane_status; above)" >&2
  status=1
fi
[ "$status" = 5 ] && status=0
phase "make test in all" $((SECONDS - t0))
exit "$status"
