#!/usr/bin/env bash
# Set up zenflow and run the example order flow end to end: migrate a SQLite database, start
# an engine and an agent, dispatch several orders (one declined, one refunded), wait for them,
# print their timelines, and stop everything this script started.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
# shellcheck disable=SC1091
source "$root/.venv/bin/activate"

python "$root/scripts/check_services.py" || exit 1

workdir="$root/.example"
mkdir -p "$workdir"
cd "$workdir"
rm -f zenflow.db zenflow.db-wal zenflow.db-shm engine.log agent.log
export ZENFLOW_DATABASE_URL="${ZENFLOW_DATABASE_URL:-sqlite:///$workdir/zenflow.db}"
export ZENFLOW_NAMESPACE="${ZENFLOW_NAMESPACE:-zenflow-example}"
export PYTHONPATH="$root/examples${PYTHONPATH:+:$PYTHONPATH}"

pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT

zenflow db upgrade
# setsid keeps Ctrl-C from reaching them directly: stop_all sends one SIGTERM, which lets
# them finish what they hold (a second signal would make them exit at once).
setsid zenflow engine --app shop > engine.log 2>&1 &
pids+=($!)
setsid zenflow agent --app shop > agent.log 2>&1 &
pids+=($!)
echo "engine and agent started; logs in $workdir/engine.log and $workdir/agent.log"

python "$root/examples/demo.py" --logs "$workdir"
