"""The agent's record of recent result publishes, by task attempt.

When a connection to RabbitMQ is lost, the task messages that the agent had not
acknowledged yet are delivered again, to this agent or to another. If this agent had
already published the result of such a message, or is still retrying that publish, running
the task again would only produce a second result, which the engine ignores. The ledger
lets the agent recognise such a redelivery and acknowledge it without running the task.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

# (run id, step, attempt) of a task message.
AttemptKey = tuple[str, int, int]

# Maximum number of entries. The oldest entry is dropped first.
DEFAULT_SIZE = 10_000


class ResultLedger:
    """Outcomes of result publishes, as futures that resolve to whether RabbitMQ confirmed."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[AttemptKey, asyncio.Future[bool]] = OrderedDict()

    def begin(self, key: AttemptKey) -> asyncio.Future[bool]:
        """Record that the result of ``key`` is being published. The caller resolves the
        returned future with whether RabbitMQ confirmed it."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._entries[key] = future
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            _, oldest = self._entries.popitem(last=False)
            if not oldest.done():
                oldest.set_result(False)
        return future

    async def confirmed(self, key: AttemptKey) -> bool:
        """Return whether a result of ``key`` was confirmed, waiting for a publish that is
        still being retried."""
        future = self._entries.get(key)
        if future is None:
            return False
        return await asyncio.shield(future)
