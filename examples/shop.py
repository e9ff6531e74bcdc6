"""An order flow: reserve stock, charge the card, pack and send a receipt in parallel.

A declined card releases the stock; an item that cannot be packed refunds the charge and
releases the stock. A shipped order then waits for the carrier's "Delivered" event, and
reminds the customer if none came within the delivery window. Run it with
``scripts/example.sh`` from the repository root.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from decimal import Decimal

from zenflow import Retry, Task, TaskFailed, Workflow, current_task, task, wait

# Amounts above this are declined by the fake payment provider.
CARD_LIMIT = Decimal("1000.00")
OUT_OF_STOCK = {"unobtainium"}
# How long a shipped order waits for the carrier's "Delivered" event; days in a real shop,
# seconds here so that the example finishes quickly.
DELIVERY_WINDOW = timedelta(seconds=3)


class CardDeclined(Exception):
    pass


class OutOfStock(Exception):
    pass


class ReserveStock(Task):
    def __init__(self, order_id: str, items: list[str]) -> None:
        self.order_id = order_id
        self.items = items

    def handle(self) -> dict[str, object]:
        time.sleep(0.05)  # a call to the inventory service
        return {"order_id": self.order_id, "reserved": len(self.items)}


class ChargeCard(Task):
    queue = "payments"
    # A gateway timeout is worth retrying; a declined card is not.
    retry = Retry(attempts=3, initial=timedelta(milliseconds=200), non_retryable=(CardDeclined,))
    timeout = timedelta(seconds=10)

    def __init__(self, order_id: str, amount: Decimal) -> None:
        self.order_id = order_id
        self.amount = amount

    async def handle(self) -> dict[str, object]:
        await asyncio.sleep(0.05)  # a call to the payment provider
        attempt = current_task()
        if self.order_id == "A-100" and attempt is not None and attempt.attempt == 1:
            # The fake provider times out once, so the example shows a retry.
            raise ConnectionError("the payment gateway timed out")
        if self.amount > CARD_LIMIT:
            raise CardDeclined(f"card declined for {self.amount} (limit {CARD_LIMIT})")
        return {"charge_id": f"ch_{self.order_id}", "amount": self.amount}


class RefundCharge(Task):
    queue = "payments"

    def __init__(self, charge_id: str) -> None:
        self.charge_id = charge_id

    def handle(self) -> str:
        return f"refunded {self.charge_id}"


@task
def pack_item(order_id: str, item: str) -> str:
    if item in OUT_OF_STOCK:
        raise OutOfStock(f"{item} is out of stock")
    time.sleep(0.02)
    return f"{item} packed"


@task
def send_receipt(order_id: str, charge_id: str) -> str:
    return f"receipt for {charge_id} sent"


@task
def release_stock(order_id: str) -> str:
    return f"stock of {order_id} released"


@task
def notify_warehouse(order_id: str) -> None:
    time.sleep(0.01)


@task
def remind_customer(order_id: str) -> str:
    return f"asked the customer of {order_id} whether the parcel arrived"


class OrderWorkflow(Workflow):
    def __init__(self, order_id: str, items: list[str], amount: Decimal) -> None:
        self.order_id = order_id
        self.items = items
        self.amount = amount

    def id(self) -> str:
        return f"order-{self.order_id}"

    def handle(self):  # type: ignore[no-untyped-def]
        yield ReserveStock(self.order_id, self.items)
        try:
            charge = yield ChargeCard(self.order_id, self.amount)
        except TaskFailed as declined:
            yield release_stock(self.order_id)
            return {"status": "cancelled", "reason": declined.error_message}

        try:
            *packed, receipt = yield [
                *(pack_item(self.order_id, item) for item in self.items),
                send_receipt(self.order_id, charge["charge_id"]),
            ]
        except TaskFailed as problem:
            refund = yield RefundCharge(charge["charge_id"])
            yield release_stock(self.order_id)
            return {"status": "refunded", "reason": problem.error_message, "refund": refund}

        yield notify_warehouse(self.order_id).dispatch()
        delivered = yield wait.event("Delivered", timeout=DELIVERY_WINDOW)
        if delivered is None:
            reminder = yield remind_customer(self.order_id)
            return {"status": "shipped", "packed": packed, "delivery": reminder}
        return {"status": "delivered", "packed": packed, "receipt": receipt, **delivered.data}
