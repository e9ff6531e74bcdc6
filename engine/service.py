"""The engine process: consumes start requests and task results, publishes task messages.

Message handling, for each delivery:

1. decode and validate (invalid messages are acknowledged, logged and, if the sender asked
   for a reply, answered with an error; they are never requeued);
2. run the transaction in a worker thread (:mod:`engine.processor`);
3. publish the committed outbox messages with publisher confirms, retrying those that
   RabbitMQ did not confirm, then the reply and the run-finished notification;
4. acknowledge the delivery.

A crash at any point repeats at most the work after the last commit: a redelivered start
or result is recognised as a duplicate, and outbox messages left behind are published again
by the sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import fcntl
import functools
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import aio_pika
import aio_pika.abc
import structlog
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from engine.cache import ExecutionCache
from engine.processor import Effects, Processor, RequestError
from engine.store.database import (
    check_schema,
    create_database_engine,
    parse_database_url,
)
from engine.writer import OutgoingMessage
from zenflow import _aio, protocol, serializer
from zenflow.config import Settings, redact_url
from zenflow.errors import ConfigurationError, SerializationError, StoreError
from zenflow.registry import Registry

log = structlog.get_logger("engine")

T = TypeVar("T")

# Seconds between deletions of confirmed outbox rows, and between sweeps for rows that no
# publish is handling (left by a crash, or by a publish that failed).
OUTBOX_FLUSH_INTERVAL = 0.1
OUTBOX_SWEEP_INTERVAL = 5.0
OUTBOX_SWEEP_MIN_AGE = 10.0
# Seconds during which the engine retries an outbox message that RabbitMQ did not confirm
# (connection lost, nack, no confirm, returned). After that, the sweeper publishes it.
OUTBOX_PUBLISH_TIMEOUT = 30.0
# An event or a control request can overtake the start of its run, because the engine
# handles requests concurrently. Such a request naming an unknown run is requeued for this
# many seconds before the engine replies that the run was not found.
UNKNOWN_RUN_GRACE = 2.0
UNKNOWN_RUN_RETRY_DELAY = 0.1

# Seconds between polls for due timers while none is due; it bounds how late a timer fires
# on an idle engine.
TIMER_POLL_INTERVAL = 0.2

# Database errors that pass: a lost connection, a locked SQLite file, a full pool. A message
# whose handling hit one is delivered again later. Any other database error (a value the
# column refuses, a broken constraint) would fail again on every delivery, so it is final.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    PoolTimeout,
    StoreError,
)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Settings of one engine process."""

    settings: Settings
    cache_size: int = 10_000
    max_request_bytes: int = protocol.DEFAULT_MAX_REQUEST_BYTES
    prefetch: int = 200
    workers: int | None = None  # database threads; default 1 on SQLite, 4 on PostgreSQL
    shutdown_timeout: float = 30.0
    clock_offset: float = 0.0  # seconds added to the engine's clock, for tests of timers


class EngineService:
    def __init__(self, options: EngineOptions, registry: Registry) -> None:
        self.options = options
        self.settings = options.settings
        self.registry = registry
        self.topology = protocol.Topology(self.settings.namespace)
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._run_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._publishing_outbox: set[str] = set()
        self._declared_queues: set[str] = set()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._unknown_runs: dict[str, float] = {}  # message id: first not found
        self._lock_file: IO[str] | None = None
        self._stop = asyncio.Event()
        self.stats = {"runs_started": 0, "results": 0, "duplicates": 0, "rejected": 0}

    # Lifecycle.

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain in-flight messages and close."""
        self._stop = stop
        self._open_store()
        try:
            await self._serve(stop)
        finally:
            self._close_store()

    def _open_store(self) -> None:
        url = self.settings.database_url
        parsed = parse_database_url(url)
        is_sqlite = parsed.get_backend_name() == "sqlite"
        self.database = create_database_engine(url, immediate_transactions=True, must_exist=True)
        if is_sqlite:
            self._lock_sqlite(parsed.database or "")
        check_schema(self.database, url)
        workers = self.options.workers or (1 if is_sqlite else 4)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine-db")
        self.cache = ExecutionCache(self.options.cache_size)
        self.processor = Processor(
            self.database,
            self.registry,
            self.cache,
            self.topology,
            lock_rows=not is_sqlite,
            clock_offset=self.options.clock_offset,
        )

    def _lock_sqlite(self, database: str) -> None:
        """Hold an exclusive lock beside the SQLite file: one engine per SQLite database."""
        if not database or database == ":memory:":
            return
        path = Path(database).expanduser().resolve()
        lock_path = path.with_name(path.name + ".engine-lock")
        handle = open(lock_path, "a+")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigurationError(
                f"another engine ({holder}) is already running against SQLite database {path}; "
                "SQLite supports one engine on one machine, so use PostgreSQL "
                "(--database-url postgresql://...) to run several engines"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(self.identity)
        handle.flush()
        self._lock_file = handle

    def _close_store(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
        database = getattr(self, "database", None)
        if database is not None:
            database.dispose()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def _serve(self, stop: asyncio.Event) -> None:
        connection = await _aio.connect(
            self.settings.amqp_url, name=f"zenflow engine {self.identity}", log=log
        )
        try:
            self.publish_channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            consume_channel = await connection.channel()
            await consume_channel.set_qos(prefetch_count=self.options.prefetch)
            declared = await _aio.declare_entry(self.publish_channel, self.topology)
            self.runs_exchange = declared["runs_exchange"]
            requests = await consume_channel.get_queue(self.topology.requests_queue)
            results = await consume_channel.get_queue(self.topology.results_queue)

            try:
                await self._publish_leftover_outbox()
            except Exception as error:
                # The sweeper publishes them later.
                log.warning("outbox_republish_failed", error=redact_url(_aio.describe(error)))
            request_tag = await requests.consume(self._tracked(self._on_request))
            result_tag = await results.consume(self._tracked(self._on_result))
            log.info(
                "engine_started",
                engine=self.identity,
                namespace=self.settings.namespace,
                workflows=sorted(self.registry.workflows),
                database=redact_url(self.settings.database_url),
                cache_size=self.options.cache_size,
            )
            background = [
                asyncio.create_task(self._flush_outbox_forever()),
                asyncio.create_task(self._sweep_outbox_forever()),
                asyncio.create_task(self._fire_timers_forever()),
            ]
            await stop.wait()

            log.info("engine_stopping", in_flight=len(self._in_flight))
            await _aio.cancel_consumers([(requests, request_tag), (results, result_tag)])
            await self._drain()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._flush_outbox()
        finally:
            await connection.close()
        log.info("engine_stopped", **self.stats)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.options.shutdown_timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.wait(list(self._in_flight), timeout=deadline - time.monotonic())
        if self._in_flight:
            log.warning("engine_drain_timed_out", in_flight=len(self._in_flight))

    def _tracked(
        self, handler: Callable[[aio_pika.abc.AbstractIncomingMessage], Any]
    ) -> Callable[[aio_pika.abc.AbstractIncomingMessage], Any]:
        """Wrap a consumer callback so that shutdown waits for it and a channel close
        (which cancels consumer tasks) does not interrupt a handler half-way."""

        async def consume(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            task = asyncio.create_task(handler(message))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            await asyncio.shield(task)

        return consume

    # Start requests and queries.

    async def _on_request(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        with structlog.contextvars.bound_contextvars(message_id=message.message_id):
            request: protocol.Request | None = None
            try:
                body = protocol.decode_body(
                    message.body, message.content_type, self.options.max_request_bytes
                )
                request = protocol.parse_request(body)
                if isinstance(request, protocol.StartRequest):
                    await self._start(message, request)
                elif isinstance(request, protocol.GetRunRequest):
                    await self._get_run(message, request)
                elif isinstance(request, protocol.EventRequest):
                    await self._send_event(message, request)
                else:
                    await self._control(message, request)
            except (protocol.InvalidMessage, RequestError) as error:
                about_run = isinstance(request, protocol.EventRequest | protocol.ControlRequest)
                if error.code == "run_not_found" and about_run and self._retry_unknown_run(message):
                    # Sent again shortly: the run's start may still be in progress.
                    await asyncio.sleep(UNKNOWN_RUN_RETRY_DELAY)
                    with contextlib.suppress(*_aio.CONNECTION_ERRORS):
                        await message.nack(requeue=True)
                    return
                self.stats["rejected"] += 1
                log.warning(
                    "request_rejected",
                    reason=str(error),
                    code=error.code,
                    field=error.field,
                    reply_to=message.reply_to,
                )
                if isinstance(request, protocol.StartRequest) and request.parent_run_id:
                    try:
                        await self._report_child_failure(request, error)
                    except TRANSIENT_ERRORS as database_error:
                        await self._retry_later(message, database_error)
                        return
                    except Exception as report_error:
                        log.error(
                            "child_failure_not_recorded",
                            error=_aio.describe(report_error),
                            exc_info=True,
                        )
                error_body = {"code": error.code, "message": str(error)}
                if error.field is not None:
                    error_body["field"] = error.field
                await self._reply(message, {"ok": False, "error": error_body})
            except TRANSIENT_ERRORS as error:
                await self._retry_later(message, error)
                return
            except Exception as error:
                log.error("request_failed", error=_aio.describe(error), exc_info=True)
                # The details (SQL, values) stay in the engine's log.
                text = (
                    f"the engine failed to handle the request ({type(error).__name__}); see its log"
                )
                await self._reply(
                    message, {"ok": False, "error": {"code": "internal_error", "message": text}}
                )
            if message.redelivered and message.message_id:
                # A request that _retry_unknown_run requeued is done. Forget its entry, which
                # would take one of the 100 places until it expires. Only redelivered messages
                # do so: a new message reusing the id would restart a retrying request's wait.
                self._unknown_runs.pop(message.message_id, None)
            await _ack(message)

    async def _start(
        self, message: aio_pika.abc.AbstractIncomingMessage, request: protocol.StartRequest
    ) -> None:
        definition = self.registry.workflows.get(request.workflow)
        if definition is None:
            known = ", ".join(sorted(self.registry.workflows)) or "none"
            raise protocol.InvalidMessage(
                "unknown_workflow",
                f"unknown workflow {request.workflow!r}; this engine runs: {known}",
                "workflow",
            )
        try:
            definition.check_arguments(request.args, request.kwargs)
            serializer.encode([list(request.args), request.kwargs], name="arguments")
        except (TypeError, SerializationError) as error:
            raise protocol.InvalidMessage("invalid_arguments", str(error), "args") from None
        run_id = request.run_id
        if run_id is None:
            run_id = (
                protocol.run_id_from_message_id(message.message_id)
                if message.message_id
                else protocol.new_run_id()
            )
        with structlog.contextvars.bound_contextvars(run_id=run_id, workflow=request.workflow):
            async with self._run_lock(run_id):
                effects = await self._in_thread(self.processor.start_run, request, run_id)
            if effects.existing:
                log.info("start_returned_existing_run", existing_run_id=effects.run_id)
                await self._reply(message, {"ok": True, "run_id": effects.run_id, "existing": True})
                return
            if effects.duplicate:
                log.info("start_duplicate_ignored")
            else:
                self.stats["runs_started"] += 1
                log.info(
                    "run_started",
                    business_id=request.business_id,
                    parent_run_id=request.parent_run_id,
                )
            await self._publish_effects(effects)
            await self._reply(
                message, {"ok": True, "run_id": run_id, "duplicate": effects.duplicate}
            )

    async def _report_child_failure(
        self, request: protocol.StartRequest, error: protocol.InvalidMessage | RequestError
    ) -> None:
        """Fail the parent's step when its child run cannot start."""
        async with self._run_lock(request.parent_run_id or ""):
            effects = await self._in_thread(
                self.processor.fail_child_start, request, f"{error.code}: {error}"
            )
        if effects.ignored is not None:
            log.warning("child_failure_ignored", reason=effects.ignored)
        await self._publish_effects(effects)

    async def _send_event(
        self, message: aio_pika.abc.AbstractIncomingMessage, request: protocol.EventRequest
    ) -> None:
        # Requests naming the run the same way take this lock in delivery order, so that
        # events keep their order although the database threads resolve them concurrently.
        async with self._run_lock(f"reference:{request.target.text}"):
            await self._send_event_to_run(message, request)

    async def _send_event_to_run(
        self, message: aio_pika.abc.AbstractIncomingMessage, request: protocol.EventRequest
    ) -> None:
        run_id = await self._in_thread(self.processor.resolve, request.target)
        target = protocol.RunTarget(run_id=run_id)
        with structlog.contextvars.bound_contextvars(run_id=run_id, event=request.name):
            async with self._run_lock(run_id):
                effects = await self._in_thread(
                    self.processor.send_event,
                    dataclasses.replace(request, target=target),
                    message.message_id,
                )
            if effects.duplicate:
                log.info("event_duplicate_ignored")
            else:
                log.info("event_received", delivered=effects.reply.get("delivered"))
            await self._publish_effects(effects)
            await self._reply(message, {"ok": True, **effects.reply})

    async def _control(
        self, message: aio_pika.abc.AbstractIncomingMessage, request: protocol.ControlRequest
    ) -> None:
        run_id = await self._in_thread(self.processor.resolve, request.target)
        target = protocol.RunTarget(run_id=run_id)
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            async with self._run_lock(run_id):
                effects = await self._in_thread(
                    self.processor.control, dataclasses.replace(request, target=target)
                )
            log.info(f"run_{request.action}_requested", by=request.by, reason=request.reason)
            await self._publish_effects(effects)
            await self._reply(message, {"ok": True, **effects.reply})

    def _retry_unknown_run(self, message: aio_pika.abc.AbstractIncomingMessage) -> bool:
        """Return whether to requeue a request that named an unknown run, by message id."""
        key = message.message_id
        if not key:
            return False
        now = time.monotonic()
        if key not in self._unknown_runs and len(self._unknown_runs) >= 100:
            # Drop the entries of requests that did not come back, such as those that
            # another engine took after their requeue.
            self._unknown_runs = {
                seen: since
                for seen, since in self._unknown_runs.items()
                if now - since < UNKNOWN_RUN_GRACE
            }
            if len(self._unknown_runs) >= 100:
                # At most 100 requests wait at once, so a flood of requests for runs that
                # do not exist cannot keep the engine busy requeueing them.
                return False
        since = self._unknown_runs.setdefault(key, now)
        if now - since < UNKNOWN_RUN_GRACE:
            return True
        del self._unknown_runs[key]
        return False

    # Timers.

    async def _fire_timers_forever(self) -> None:
        while True:
            try:
                fired = await self._fire_due_timers()
            except Exception as error:
                log.warning("timer_poll_failed", error=redact_url(_aio.describe(error)))
                fired = 0
            if fired == 0:
                await asyncio.sleep(TIMER_POLL_INTERVAL)

    async def _fire_due_timers(self) -> int:
        """Fire the timers that are due; return how many were handled."""
        timers = await self._in_thread(self.processor.due_timers, 200)
        for timer in timers:
            with structlog.contextvars.bound_contextvars(run_id=timer.run_id, step=timer.step):
                try:
                    async with self._run_lock(timer.run_id):
                        effects = await self._in_thread(self.processor.fire_timer, timer)
                except TRANSIENT_ERRORS:
                    raise  # the loop logs it and polls again
                except Exception as error:
                    # The timer would fail the same way at every poll: fail its run instead,
                    # which also cancels the timer, so the other timers keep firing.
                    log.error("timer_failed", error=_aio.describe(error), exc_info=True)
                    effects = Effects(run_id=timer.run_id)
                    effects.finished = await self._in_thread(
                        self.processor.fail_run, timer.run_id, error
                    )
                late = (self.processor.now() - timer.fire_at).total_seconds() * 1000
                if effects.lost is not None:
                    log.warning(
                        "task_lease_expired", attempt=effects.lost, retry_in=effects.retry_in
                    )
                elif effects.retried is not None:
                    log.info("task_retry_started", attempt=effects.retried, late_ms=round(late, 1))
                elif effects.ignored is None:
                    log.info("timer_fired", late_ms=round(late, 1))
                await self._publish_effects(effects)
        return len(timers)

    async def _get_run(
        self, message: aio_pika.abc.AbstractIncomingMessage, request: protocol.GetRunRequest
    ) -> None:
        run = await self._in_thread(self.processor.get_run, request.run_id, request.business_id)
        if run is None:
            # Not an invalid request: a client may ask right after its start, before the
            # engine has created the run, so this is no warning.
            wanted = request.run_id or request.business_id
            log.debug("run_not_found", wanted=wanted)
            error = protocol.InvalidMessage(
                "run_not_found", f"no run has the id or business id {wanted!r}", "run_id"
            )
            await self._reply(message, {"ok": False, "error": error.to_error()})
            return
        await self._reply(message, {"ok": True, "run": run})

    # Task results.

    async def _on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            body = serializer.decode(message.body)
            if isinstance(body, dict) and body.get("type") == "task_heartbeat":
                await self._on_heartbeat(message, protocol.TaskHeartbeat.from_body(body))
                return
            result = protocol.TaskResult.from_body(body)
        except (protocol.InvalidMessage, Exception) as error:
            log.warning(
                "result_rejected",
                reason=_aio.describe(error),
                correlation_id=message.correlation_id,
            )
            await _ack(message)
            return
        context = {
            "run_id": result.run_id,
            "workflow": result.workflow,
            "step": result.step,
            "attempt": result.attempt,
        }
        with structlog.contextvars.bound_contextvars(**context):
            try:
                async with self._run_lock(result.run_id):
                    effects = await self._in_thread(self.processor.record_result, result)
            except TRANSIENT_ERRORS as error:
                await self._retry_later(message, error)
                return
            except Exception as error:
                log.error("result_failed", error=_aio.describe(error), exc_info=True)
                effects = Effects(run_id=result.run_id)
                with contextlib.suppress(Exception):
                    effects.finished = await self._in_thread(
                        self.processor.fail_run, result.run_id, error
                    )
            self.stats["results"] += 1
            self._log_result(result, effects)
            await self._publish_effects(effects)
            await _ack(message)

    async def _on_heartbeat(
        self, message: aio_pika.abc.AbstractIncomingMessage, heartbeat: protocol.TaskHeartbeat
    ) -> None:
        context = {"run_id": heartbeat.run_id, "step": heartbeat.step, "attempt": heartbeat.attempt}
        with structlog.contextvars.bound_contextvars(**context):
            try:
                async with self._run_lock(heartbeat.run_id):
                    effects = await self._in_thread(self.processor.record_heartbeat, heartbeat)
            except TRANSIENT_ERRORS as error:
                await self._retry_later(message, error)
                return
            except Exception as error:
                log.error("heartbeat_failed", error=_aio.describe(error), exc_info=True)
            else:
                if effects.ignored is not None:
                    log.info("heartbeat_ignored", reason=effects.ignored, agent=heartbeat.agent)
                else:
                    log.debug("heartbeat_recorded", agent=heartbeat.agent, lease=heartbeat.lease)
            await _ack(message)

    def _log_result(self, result: protocol.TaskResult, effects: Effects) -> None:
        if effects.retry_in is not None:
            error = result.error or {}
            log.info(
                "task_retry_scheduled",
                agent=result.agent,
                error_type=error.get("type"),
                error=error.get("message"),
                delay_s=round(effects.retry_in, 3),
            )
            return
        if effects.duplicate:
            self.stats["duplicates"] += 1
            log.info("duplicate_result_ignored")
        elif effects.ignored is not None and effects.ignored.startswith("recorded"):
            log.info("result_recorded_without_advancing", reason=effects.ignored)
        elif effects.ignored is not None:
            log.warning("result_ignored", reason=effects.ignored)
        elif result.ok:
            log.debug("task_completed", agent=result.agent)
        else:
            error = result.error or {}
            log.info(
                "task_failed",
                agent=result.agent,
                error_type=error.get("type"),
                error=error.get("message"),
            )

    # Publishing.

    async def _publish_effects(self, effects: Effects) -> None:
        # Concurrently, so that a step with many parallel tasks waits for one round of
        # confirms rather than one per task.
        await asyncio.gather(*(self._publish_outbox_row(row) for row in effects.outbox))
        if effects.finished is not None:
            await self._notify_finished(effects.finished)

    async def _publish_outbox_row(self, row: OutgoingMessage) -> None:
        """Publish an outbox row and note it as confirmed once RabbitMQ confirmed it.

        A row that RabbitMQ did not confirm (connection lost, nack, no queue) is retried for
        ``OUTBOX_PUBLISH_TIMEOUT`` seconds, then left to the sweeper.
        """
        self._publishing_outbox.add(row.id)
        try:
            deadline = time.monotonic() + OUTBOX_PUBLISH_TIMEOUT
            message = aio_pika.Message(
                row.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **row.properties
            )
            await self._declare_queue(row.routing_key, deadline)
            attempts = await _aio.publish_confirmed(
                self.publish_channel,
                self.publish_channel.default_exchange,
                message,
                row.routing_key,
                deadline=deadline,
                on_returned=functools.partial(self._redeclare_queue, row.routing_key, deadline),
                on_retry=functools.partial(_log_publish_retry, row),
                stop=self._stop,
            )
        except Exception as error:
            # The sweeper publishes the row again, once the connection is back.
            connection_lost = isinstance(error, _aio.CONNECTION_ERRORS)
            (log.warning if connection_lost else log.error)(
                "publish_failed",
                run_id=row.run_id,
                queue=row.routing_key,
                error=_aio.describe(error),
            )
            return
        finally:
            self._publishing_outbox.discard(row.id)
        self.processor.outbox.confirm([row.id])
        if attempts > 1:
            log.info("publish_retried", run_id=row.run_id, queue=row.routing_key, attempts=attempts)
        log.debug("task_published", run_id=row.run_id, queue=row.routing_key)

    async def _declare_queue(self, name: str, deadline: float) -> None:
        if name in self._declared_queues:
            return
        # A robust channel waits for its connection to come back, so the wait is bounded.
        # A failed declare is not final: RabbitMQ returns a message for a missing queue, and
        # the publish then declares the queue again.
        timeout = max(0.0, min(deadline - time.monotonic(), _aio.CONFIRM_TIMEOUT))
        try:
            await asyncio.wait_for(self.publish_channel.declare_queue(name, durable=True), timeout)
        except _aio.CONNECTION_ERRORS:
            return
        self._declared_queues.add(name)

    async def _redeclare_queue(self, name: str, deadline: float) -> bool:
        """Declare a queue again after RabbitMQ returned a message for it, because no queue
        had its name. Return True, so that the message is published again."""
        log.warning("publish_returned", queue=name)
        self._declared_queues.discard(name)
        await self._declare_queue(name, deadline)
        return True

    async def _notify_finished(self, run: dict[str, Any]) -> None:
        status = run["status"]
        with structlog.contextvars.bound_contextvars(
            run_id=run["run_id"], workflow=run["workflow"]
        ):
            if status == "completed":
                log.info("run_completed")
            elif status == "killed":
                log.info("run_killed", reason=(run.get("error") or {}).get("message"))
            else:
                error = run.get("error") or {}
                log.info("run_failed", error_type=error.get("type"), error=error.get("message"))
        body = serializer.encode({"version": protocol.VERSION, "type": "run_finished", **run})
        message = aio_pika.Message(
            body,
            content_type=protocol.MSGPACK_CONTENT_TYPE,
            type="run_finished",
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        try:
            await self.runs_exchange.publish(
                message, self.topology.run_finished_key(status, run["run_id"]), mandatory=False
            )
        except _aio.CONNECTION_ERRORS as error:
            log.warning("notify_failed", run_id=run["run_id"], error=_aio.describe(error))

    async def _reply(
        self, message: aio_pika.abc.AbstractIncomingMessage, body: dict[str, Any]
    ) -> None:
        if not message.reply_to:
            return
        payload, content_type = protocol.encode_body(
            {"version": protocol.VERSION, "type": "reply", **body}, message.content_type
        )
        reply = aio_pika.Message(
            payload, content_type=content_type, correlation_id=message.correlation_id
        )
        try:
            await self.publish_channel.default_exchange.publish(
                reply, message.reply_to, mandatory=False
            )
        except _aio.CONNECTION_ERRORS as error:
            log.warning("reply_failed", reply_to=message.reply_to, error=_aio.describe(error))

    # Outbox maintenance.

    async def _publish_leftover_outbox(self) -> None:
        after = ""
        total = 0
        while True:
            rows = await self._in_thread(self.processor.outbox.pending, 1000, after)
            if not rows:
                break
            await asyncio.gather(*(self._publish_outbox_row(row) for row in rows))
            total += len(rows)
            after = rows[-1].id
        if total:
            log.info("outbox_republished", messages=total)

    async def _flush_outbox(self) -> None:
        try:
            await self._in_thread(self.processor.outbox.flush_confirmed)
        except Exception as error:
            # The rows stay confirmed in memory; the next flush deletes them.
            log.warning("outbox_flush_failed", error=redact_url(_aio.describe(error)))

    async def _flush_outbox_forever(self) -> None:
        while True:
            await asyncio.sleep(OUTBOX_FLUSH_INTERVAL)
            await self._flush_outbox()

    async def _sweep_outbox_forever(self) -> None:
        while True:
            await asyncio.sleep(OUTBOX_SWEEP_INTERVAL)
            try:
                await self._sweep_outbox()
            except Exception as error:
                log.warning("outbox_sweep_failed", error=redact_url(_aio.describe(error)))

    async def _sweep_outbox(self) -> None:
        rows = await self._in_thread(self.processor.outbox.pending, 1000, "")
        # created_at comes from the engine's clock, which --clock-offset may shift.
        cutoff = self.processor.now().timestamp() - OUTBOX_SWEEP_MIN_AGE
        pending = self.processor.outbox.confirmed() | self._publishing_outbox
        stale = [
            row
            for row in rows
            if row.id not in pending
            and (row.created_at is None or row.created_at.timestamp() < cutoff)
        ]
        await asyncio.gather(*(self._publish_outbox_row(row) for row in stale))
        if stale:
            log.info("outbox_swept", messages=len(stale))

    # Helpers.

    @contextlib.asynccontextmanager
    async def _run_lock(self, run_id: str) -> Any:
        """Serialise the handling of one run's messages within this process."""
        lock, users = self._run_locks.get(run_id, (asyncio.Lock(), 0))
        self._run_locks[run_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._run_locks[run_id]
            if users == 1:
                del self._run_locks[run_id]
            else:
                self._run_locks[run_id] = (lock, users - 1)

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, functools.partial(context.run, function, *args)
        )

    async def _retry_later(
        self, message: aio_pika.abc.AbstractIncomingMessage, error: BaseException
    ) -> None:
        """Requeue a message after a pause, for errors that pass (database unreachable)."""
        log.warning(
            "database_unavailable", error=redact_url(_aio.describe(error)), retry_in_seconds=2
        )
        await asyncio.sleep(2)
        with contextlib.suppress(*_aio.CONNECTION_ERRORS):
            await message.nack(requeue=True)


def _log_publish_retry(row: OutgoingMessage, error: BaseException, attempt: int) -> None:
    # Only the first failure of a row is logged. publish_retried counts the others.
    if attempt == 1:
        log.warning(
            "publish_retrying",
            run_id=row.run_id,
            queue=row.routing_key,
            error=redact_url(_aio.describe(error)),
        )


async def _ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    # The channel may have closed meanwhile; the broker then redelivers the message and the
    # engine recognises it as a duplicate.
    with contextlib.suppress(*_aio.CONNECTION_ERRORS):
        await message.ack()
