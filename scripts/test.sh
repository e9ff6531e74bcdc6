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
# Tests marked "serial" restart RabbitMQ or change its settings, which would break tests
# running beside them, so they run alone afterwards. Exit code 5 means that a phase
# selected no tests, as with -k.
status=0
python -m pytest -q -n "${ZENFLOW_TEST_WORKERS:-3}" --dist loadscope -m "not serial" "$@" || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
status=0
python -m pytest -q -m serial "$@" || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
