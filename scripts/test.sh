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
python -m pytest -q "$@"
