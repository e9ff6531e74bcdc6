"""Start a zenflow run and wait for its result, as a program that does not use zenflow would.

This script uses the engine's public AMQP entry (schema version 1) with pika and JSON
only. It does not import zenflow, so it shows what a client in another language has to do:

1. publish a ``start`` request as JSON to the direct exchange ``<namespace>.engine`` with
   routing key ``requests``, with ``reply_to`` set to an exclusive queue and a
   ``correlation_id``;
2. read the reply with that correlation id, which contains the run id;
3. publish ``get_run`` requests until the run is completed or failed.

Usage::

    python start_run.py --workflow Sequential --args '[5]' --business-id order-17

It prints the run id on the first line and the run's result as JSON on the second.
Exit codes: 0 the run completed; 1 the engine rejected a request or the run failed;
2 invalid arguments; 3 no reply or no result before the timeout.
"""

from __future__ import annotations

import sys

# Checked before any other import: nothing below may bring zenflow in.
assert "zenflow" not in sys.modules, "start_run.py must run without zenflow"

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import pika  # noqa: E402

JSON_CONTENT_TYPE = "application/json"
SCHEMA_VERSION = 1
POLL_INTERVAL = 0.1  # seconds between get_run requests


class Rejected(Exception):
    """The engine replied with ``ok: false``; ``error`` is the reply's error map."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.error = error


class EngineEntry:
    """A connection to the engine's public entry, with an exclusive queue for replies."""

    def __init__(self, amqp_url: str, namespace: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.channel = self.connection.channel()
        # Exclusive: the broker deletes the queue when the connection closes. Not
        # auto-delete, which would delete it when the first reply's consumer is cancelled.
        declared = self.channel.queue_declare("", exclusive=True)
        self.reply_queue = declared.method.queue
        self.exchange = f"{namespace}.engine"
        self.channel.confirm_delivery()

    def request(self, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Publish one request and return the ``ok`` reply to it.

        Raises:
            Rejected: the reply has ``ok: false``.
            TimeoutError: no reply arrived within ``timeout`` seconds.
        """
        correlation_id = str(uuid.uuid4())
        properties = pika.BasicProperties(
            content_type=JSON_CONTENT_TYPE,
            reply_to=self.reply_queue,
            correlation_id=correlation_id,
            message_id=str(uuid.uuid4()),
            delivery_mode=2,
        )
        # mandatory: an exchange without the engine's requests queue bound raises here.
        self.channel.basic_publish(
            self.exchange,
            "requests",
            json.dumps(body).encode("utf-8"),
            properties,
            mandatory=True,
        )
        reply = self._reply(correlation_id, timeout)
        if reply.get("version") != SCHEMA_VERSION or reply.get("type") != "reply":
            raise ValueError(f"unexpected reply: {reply!r}")
        if not reply.get("ok"):
            raise Rejected(dict(reply.get("error") or {}))
        return reply

    def _reply(self, correlation_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for method, properties, body in self.channel.consume(
            self.reply_queue, auto_ack=True, inactivity_timeout=0.2
        ):
            if method is not None and properties.correlation_id == correlation_id:
                self.channel.cancel()
                if properties.content_type != JSON_CONTENT_TYPE:
                    raise ValueError(
                        f"reply has content type {properties.content_type!r}, "
                        f"expected {JSON_CONTENT_TYPE}"
                    )
                return dict(json.loads(body))
            # A reply to an earlier request that timed out, or no message yet.
            if time.monotonic() >= deadline:
                self.channel.cancel()
                raise TimeoutError(f"no reply to request {correlation_id} within {timeout} s")
        raise TimeoutError(f"reply consumer for {correlation_id} was cancelled")

    def close(self) -> None:
        self.connection.close()


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start a zenflow run through the engine's AMQP entry and print its result."
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("ZENFLOW_AMQP_URL", "amqp://guest:guest@localhost:5672/"),
        help="RabbitMQ URL. Default: ZENFLOW_AMQP_URL, else amqp://guest:guest@localhost:5672/.",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("ZENFLOW_NAMESPACE", "zenflow"),
        help="Prefix of the engine's exchange and queues. Default: ZENFLOW_NAMESPACE, "
        "else zenflow.",
    )
    parser.add_argument(
        "--workflow",
        default=os.environ.get("START_RUN_WORKFLOW"),
        help="Name of the workflow to start. Default: START_RUN_WORKFLOW.",
    )
    parser.add_argument(
        "--args",
        dest="args_json",
        default=os.environ.get("START_RUN_ARGS", "[]"),
        help="Positional arguments as a JSON array. Default: START_RUN_ARGS, else [].",
    )
    parser.add_argument(
        "--kwargs",
        dest="kwargs_json",
        default=os.environ.get("START_RUN_KWARGS", "{}"),
        help="Keyword arguments as a JSON object. Default: START_RUN_KWARGS, else {}.",
    )
    parser.add_argument(
        "--business-id",
        default=os.environ.get("START_RUN_BUSINESS_ID"),
        help="Business id of the run. Default: START_RUN_BUSINESS_ID, else none.",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="Seconds to wait for each reply and for the run to finish. Default: 60.",
    )
    options = parser.parse_args(argv)

    if not options.workflow:
        parser.error("--workflow (or START_RUN_WORKFLOW) is required")
    try:
        options.args = json.loads(options.args_json)
        options.kwargs = json.loads(options.kwargs_json)
    except ValueError as error:
        parser.error(f"--args and --kwargs must be JSON: {error}")

    if not isinstance(options.args, list):
        parser.error(f"--args must be a JSON array, not {options.args_json}")
    if not isinstance(options.kwargs, dict):
        parser.error(f"--kwargs must be a JSON object, not {options.kwargs_json}")
    return options


def start_and_wait(options: argparse.Namespace) -> int:
    entry = EngineEntry(options.amqp_url, options.namespace)
    try:
        start = {
            "version": SCHEMA_VERSION,
            "type": "start",
            "workflow": options.workflow,
            "args": options.args,
            "kwargs": options.kwargs,
        }
        if options.business_id:
            start["business_id"] = options.business_id
        run_id = entry.request(start, options.timeout)["run_id"]
        print(run_id, flush=True)

        deadline = time.monotonic() + options.timeout
        while True:
            query = {"version": SCHEMA_VERSION, "type": "get_run", "run_id": run_id}
            run = entry.request(query, options.timeout)["run"]
            if run["status"] == "completed":
                print(json.dumps(run["result"]), flush=True)
                return 0
            if run["status"] == "failed":
                print(f"run {run_id} failed: {json.dumps(run['error'])}", file=sys.stderr)
                return 1
            if time.monotonic() >= deadline:
                print(
                    f"run {run_id} is still {run['status']} after {options.timeout} s",
                    file=sys.stderr,
                )
                return 3
            time.sleep(POLL_INTERVAL)
    finally:
        entry.close()


def main(argv: list[str]) -> int:
    options = parse_arguments(argv)
    try:
        code = start_and_wait(options)
    except Rejected as error:
        print(f"the engine rejected the request: {json.dumps(error.error)}", file=sys.stderr)
        code = 1
    except TimeoutError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 3
    assert "zenflow" not in sys.modules, "start_run.py imported zenflow"
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
