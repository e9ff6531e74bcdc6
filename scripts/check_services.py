"""Check that RabbitMQ (and optionally PostgreSQL) answer, and explain how to start them.

Usage: python scripts/check_services.py [--tests]

Without --tests it checks the broker of ZENFLOW_AMQP_URL, which the example uses. With
--tests it checks the services the test suite uses: ZENFLOW_TEST_AMQP_URL and
ZENFLOW_TEST_POSTGRES_URL, whose defaults are the local RabbitMQ and PostgreSQL.
Exit code 0 when every checked service answers, 1 otherwise.
"""

from __future__ import annotations

import os
import sys

import pika
import pika.exceptions
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from zenflow.config import DEFAULT_AMQP_URL, redact_url

HELP_RABBITMQ = """\
RabbitMQ does not answer at {url}.
Start one, then run this command again:
  - Debian/Ubuntu:  sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached
  - Docker:         docker compose -f deploy/docker-compose.yml up -d rabbitmq postgres
                    export ZENFLOW_AMQP_URL=amqp://zenflow:zenflow@localhost:5672/
Or point ZENFLOW_AMQP_URL at a broker you already run."""

HELP_POSTGRES = """\
PostgreSQL does not answer at {url}.
Start one (Debian: sudo pg_ctlcluster 15 main start; Docker: see deploy/docker-compose.yml),
or set ZENFLOW_TEST_POSTGRES_URL. Without it the PostgreSQL tests are skipped (failed in CI)."""


HELP_LOGIN = """\
RabbitMQ at {url} answers but rejected the login.
Check the user name and password in the URL (the default user guest only logs in from
localhost; the compose broker in deploy/ has the user zenflow, password zenflow)."""


def rabbitmq_problem(url: str) -> str | None:
    """Return a help text when the broker at ``url`` cannot be used, or None when it can."""
    parameters = pika.URLParameters(url)
    parameters.socket_timeout = 3
    parameters.connection_attempts = 1
    try:
        pika.BlockingConnection(parameters).close()
    except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError):
        return HELP_LOGIN.format(url=redact_url(url))
    except (pika.exceptions.AMQPError, OSError):
        return HELP_RABBITMQ.format(url=redact_url(url))
    return None


def postgres_answers(url: str) -> bool:
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except SQLAlchemyError:
        return False
    return True


def main() -> int:
    ok = True
    for_tests = "--tests" in sys.argv[1:]
    if for_tests:
        amqp_url = os.environ.get("ZENFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    else:
        amqp_url = os.environ.get("ZENFLOW_AMQP_URL", DEFAULT_AMQP_URL)
    problem = rabbitmq_problem(amqp_url)
    if problem is not None:
        print(problem, file=sys.stderr)
        ok = False
    if for_tests:
        postgres_url = os.environ.get(
            "ZENFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        )
        if not postgres_answers(postgres_url):
            print(HELP_POSTGRES.format(url=redact_url(postgres_url)), file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
