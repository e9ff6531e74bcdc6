"""Dispatch a few orders of the shop example, wait for them and print their timelines.

Run by scripts/example.sh, which starts the engine and the agent first. Standalone:

    ZENFLOW_NAMESPACE=zenflow-example python examples/demo.py --logs .example
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

from shop import OrderWorkflow

from zenflow import Client, RunFailed, RunTimeout

ORDERS = [
    ("A-100", ["book", "pen"], Decimal("42.50")),  # charged at the 2nd attempt, then delivered
    ("A-101", ["lamp"], Decimal("4999.00")),  # card declined, not retried: stock released
    ("A-102", ["book", "unobtainium"], Decimal("30.00")),  # packing fails: refunded
    ("A-103", ["mug", "tea", "spoon"], Decimal("18.20")),  # shipped, no event: reminder
]


def wait_for_processes(logs: Path, timeout: float = 30.0) -> None:
    """Wait until the engine and agent logged that they started; exit if one died."""
    deadline = time.monotonic() + timeout
    for name, event in (("engine.log", "engine_started"), ("agent.log", "agent_started")):
        path = logs / name
        while not (path.exists() and event in path.read_text(errors="replace")):
            if time.monotonic() > deadline:
                tail = path.read_text(errors="replace")[-2000:] if path.exists() else ""
                sys.exit(f"error: {name} shows no {event} after {timeout} s:\n{tail}")
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, help="folder of engine.log and agent.log to watch")
    options = parser.parse_args()
    if options.logs is not None:
        wait_for_processes(options.logs)

    with Client() as client:
        runs = []
        for order_id, items, amount in ORDERS:
            run_id = OrderWorkflow(order_id, items, amount).dispatch(client=client)
            print(f"dispatched order {order_id}: run {run_id}")
            runs.append((order_id, run_id))

        # The carrier's webhook, by business id. The run keeps the event until it waits.
        client.send_event("order-A-100", "Delivered", {"signed_by": "R. Smith"})
        print("sent event Delivered to order-A-100")

        print()
        failures = 0
        for order_id, run_id in runs:
            try:
                result = client.wait(run_id, timeout=60)
            except (RunFailed, RunTimeout) as error:
                failures += 1
                print(f"order {order_id}: {error}")
                continue
            print(f"order {order_id}: {json.dumps(result, default=str)}")

    for order_id, _run_id in runs:
        print(f"\n$ zenflow runs show order-{order_id}")
        sys.stdout.flush()
        subprocess.run(["zenflow", "runs", "show", f"order-{order_id}"], check=False)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
