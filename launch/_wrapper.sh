#!/bin/bash
# Shared body of launch/mpirun.sh and launch/horovodrun.sh: `_wrapper.sh LAUNCHER ARGS...` runs
# `hybridps launch --launcher LAUNCHER ARGS...` with $HYBRIDPS_BIN, else the hybridps on PATH,
# else the repository's .venv next to this script. Exit code: the job's.
set -euo pipefail
launcher="$1"; shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${HYBRIDPS_BIN:-}" ]]; then
    bin="$HYBRIDPS_BIN"
elif command -v hybridps >/dev/null 2>&1; then
    bin="$(command -v hybridps)"
elif [[ -x "$here/../.venv/bin/hybridps" ]]; then
    bin="$here/../.venv/bin/hybridps"
else
    echo "$launcher.sh: no hybridps found: run make setup in the repository, or set HYBRIDPS_BIN" >&2
    exit 2
fi
exec "$bin" launch --launcher "$launcher" "$@"
