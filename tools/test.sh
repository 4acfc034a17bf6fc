#!/usr/bin/env bash
# `make test`: the control plane's binaries, then every test in three lanes, printing how long
# each phase took.
#
# - The execute lane: the tests that run pods for real (marker `execute`: the end-to-end demo
#   and the node agent's), on testbeds of their own. They need Traefik, the ingress controller
#   of execute mode and the slowest binary to build cold (5-6 min on 2 cores), which builds at
#   the lowest CPU priority first.
# - The engine lane: tests/integration/test_engine.py and test_operator_flower.py
#   (tests/conftest.py LANES), on a testbed of
#   its own (ports shifted by ENGINE_PORT_OFFSET). Its tests spend most of their time waiting
#   on rounds, restarts and timeouts.
# - The main lane: everything else, fast modules first (tests/conftest.py).
# Each lane prints its own report; the run fails if any does.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
t0=$SECONDS
phase() { printf '[test] %-52s %5s s\n' "$1" "$2" >&2; }
ENGINE_PORT_OFFSET=1000

t=$SECONDS
bash tools/testbed/build.sh core >/dev/null
phase "Go control plane (build.sh core)" $((SECONDS - t))

lanes=()
lane_pids=()
# start_lane NAME BUILD PYTEST_ARGS...: in the background, build.sh BUILD (none: nothing) at
# the lowest CPU priority, then pytest with the arguments. In a session of its own, so that
# stopping the tests (Ctrl-C) stops the whole lane with them; build.sh never publishes half
# a binary.
start_lane() {
  local name=$1 build=$2 dir
  shift 2
  dir=$(mktemp -d "${TMPDIR:-/tmp}/pollinate-$name-lane.XXXXXX")
  setsid bash -c '
    cd "$1"; lane=$2; build=$3; shift 3
    rc=0
    if [ "$build" != none ]; then
      nice -n 19 bash tools/testbed/build.sh "$build" >/dev/null 2>"$lane/build.log" || rc=$?
    fi
    echo "$SECONDS" >"$lane/build.seconds"
    if [ "$rc" != 0 ]; then echo "$rc" >"$lane/status"; exit; fi
    start=$SECONDS
    # Its own base for temporary folders, apart from the main lane'"'"'s numbered ones (left in
    # place, like those: a pod'"'"'s folders may be bind mounts while its testbed stops). A short
    # name: the tests put Unix sockets in these folders.
    base=$(mktemp -d "${TMPDIR:-/tmp}/pt.XXXXXX")
    rc=0; .venv/bin/python -m pytest -p no:cacheprovider --basetemp "$base" "$@" \
      >"$lane/pytest.log" 2>&1 || rc=$?
    echo $((SECONDS - start)) >"$lane/pytest.seconds"
    echo "$rc" >"$lane/status"
  ' _ "$top" "$dir" "$build" "$@" &
  lanes+=("$name:$dir")
  lane_pids+=($!)
}
trap 'for p in "${lane_pids[@]}"; do kill -- -"$p" 2>/dev/null || true; done' INT TERM

start_lane execute all -m execute "$@"
# torch with one thread in the lanes' own processes (the training unit tests; the engine's
# server): beside the other lanes, two threads each spun for a core another lane held
# (measured: 1.19x the wall time and 1.29x the CPU of one thread). Sites started by tests
# already use one; the execute lane's pods size theirs from their CPU request, as in production.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
POLLINATE_TESTBED_PORT_OFFSET=$ENGINE_PORT_OFFSET start_lane engine none -m "not execute" --lane engine "$@"

t=$SECONDS
status=0
.venv/bin/python -m pytest -m "not execute" --lane main "$@" || status=$?
[ "$status" = 5 ] && status=0  # nothing selected (a -k or a path that names no such test)
phase "tests, main lane (pytest -m 'not execute' --lane main)" $((SECONDS - t))

t=$SECONDS
for i in "${!lanes[@]}"; do
  name=${lanes[$i]%%:*}
  dir=${lanes[$i]#*:}
  wait "${lane_pids[$i]}" || true
  echo >&2
  echo "==================== lane $name" >&2
  grep -v ': cached$' "$dir/build.log" >&2 2>/dev/null || true
  cat "$dir/pytest.log" 2>/dev/null || true
  [ "$name" = execute ] && phase "Traefik, built in the background (build.sh all)" \
    "$(cat "$dir/build.seconds" 2>/dev/null || echo '?')"
  phase "tests, $name lane" "$(cat "$dir/pytest.seconds" 2>/dev/null || echo '?')"
  lane_status=$(cat "$dir/status" 2>/dev/null || echo 1)
  rm -rf "$dir"
  # 5: nothing selected (a -k or a path that names none of this lane's tests).
  if [ "$lane_status" != 0 ] && [ "$lane_status" != 5 ]; then
    echo "[test] the $name lane failed (exit $lane_status; above)" >&2
    status=1
  fi
done
phase "waited for the other lanes after the main lane" $((SECONDS - t))
phase "make test in all" $((SECONDS - t0))
exit "$status"
