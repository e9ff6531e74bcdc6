#!/usr/bin/env bash
# Set up zenflow, check style and types, and run the test suite against the local RabbitMQ
# and PostgreSQL.
# Extra arguments go to pytest, e.g. scripts/test.sh -k crash -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
# shellcheck disable=SC1091
source "$root/.venv/bin/activate"
cd "$root"

python scripts/check_services.py --tests || [ "${CI:-}" != "true" ] || exit 1
echo "ruff check"
ruff check .
echo "mypy"
mypy
# The end-to-end tests mostly wait on processes, the broker and the database, so three
# workers finish about twice as fast as one on 2 cores. Each test module's tests stay on one
# worker (--dist loadscope), which keeps one engine cluster per module fixture.
python -m pytest -q -n "${ZENFLOW_TEST_WORKERS:-3}" --dist loadscope "$@"
