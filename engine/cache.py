"""A bounded least-recently-used cache of live workflow executions.

A cached run advances in O(1) per step; an evicted one is rebuilt by replaying its history
the next time a result arrives for it.

Evicted generators are not closed here, because another thread may be advancing the same
execution at that moment; Python closes them when they are garbage collected, which runs
the workflow's ``finally`` blocks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from engine.replay import Execution


class ExecutionCache:
    """Live executions by run id, at most ``capacity`` of them."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be 0 or more, not {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, Execution] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, run_id: str) -> Execution | None:
        with self._lock:
            execution = self._entries.get(run_id)
            if execution is None:
                self.misses += 1
                return None
            self._entries.move_to_end(run_id)
            self.hits += 1
            return execution

    def put(self, run_id: str, execution: Execution) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[run_id] = execution
            self._entries.move_to_end(run_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def discard(self, run_id: str) -> None:
        with self._lock:
            self._entries.pop(run_id, None)

    def __len__(self) -> int:
        return len(self._entries)
