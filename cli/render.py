"""Human-readable output of runs and their history, and JSON output for scripts."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from engine.store.models import RESULT_KINDS, Attempt, HistoryEntry, Timer
from engine.store.queries import RunView, load_json
from zenflow import protocol, serializer
from zenflow.commands import describe_call, describe_rule
from zenflow.errors import SerializationError
from zenflow.protocol import _json_fallback


def to_json(value: Any) -> str:
    """Encode any decoded zenflow value as JSON (datetimes as ISO text, bytes as hex...)."""
    return json.dumps(_jsonable(value), ensure_ascii=False, default=_json_fallback)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k if isinstance(k, str) else to_json(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item) for item in value]
    if type(value) is int:
        return protocol.json_int(value)
    return value


def format_value(value: Any, limit: int = 200) -> str:
    try:
        text = repr(value)
    except ValueError:
        # An int with more than sys.get_int_max_str_digits() digits has no decimal repr.
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_instant(moment: dt.datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{rest:02d}s" if hours else f"{minutes}m{rest:02d}s"


def runs_table(runs: list[RunView]) -> str:
    """Format runs as an aligned table, newest first."""
    if not runs:
        return "no runs"
    now = dt.datetime.now(dt.UTC)
    rows = [("RUN ID", "WORKFLOW", "BUSINESS ID", "STATUS", "STEPS", "CREATED", "DURATION")]
    for run in runs:
        end = run.finished_at or now
        rows.append(
            (
                run.run_id,
                run.workflow,
                run.business_id or "-",
                run.status,
                str(run.steps),
                format_instant(run.created_at),
                format_duration((end - run.created_at).total_seconds()),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def run_timeline(
    run: RunView,
    history: list[HistoryEntry],
    attempts: list[Attempt],
    children: list[RunView] | None = None,
    timers: list[Timer] | None = None,
) -> str:
    """Format a run's summary and the timeline of its history, with durations and errors."""
    lines = [f"run {run.run_id}", f"  workflow     {run.workflow}"]
    if run.business_id:
        lines.append(f"  business id  {run.business_id}")
    if run.parent_id:
        lines.append(f"  parent       {run.parent_id}")
    lines.append(f"  status       {run.status}")
    lines.append(f"  input        {describe_call(run.workflow, run.args, run.kwargs)}")
    lines.append(f"  created      {format_instant(run.created_at)}")
    if run.finished_at is not None:
        took = format_duration((run.finished_at - run.created_at).total_seconds())
        lines.append(f"  finished     {format_instant(run.finished_at)} (took {took})")
    if run.status == "completed":
        lines.append(f"  result       {format_value(run.result)}")
    if run.error:
        lines.append(f"  error        {run.error.get('type')}: {run.error.get('message')}")

    lines.append("")
    lines.append("timeline")
    attempts_by_step = {(a.step, a.attempt): a for a in attempts}
    names: dict[int, str] = {}
    for entry in history:
        offset = (entry.created_at - run.created_at).total_seconds()
        described = _describe_entry(entry, names, attempts_by_step)
        lines.append(f"  {'+' + format(offset, '.3f') + 's':>10}  {described}")
    waiting = waiting_steps(history)
    if run.status in ("running", "paused") and waiting:
        lines.append("")
        lines.append("waiting for")
        leases = {timer.step: timer for timer in timers or () if timer.kind == "lease"}
        for entry in waiting:
            lines.append(f"  {_describe_wait(entry, history, leases.get(entry.step or 0))}")
    if children:
        lines.append("")
        lines.append("children")
        for child in children:
            lines.append(f"  {child.run_id}  {child.workflow}  {child.status}")
    if run.error:
        cause = run.error.get("cause")
        if isinstance(cause, dict) and cause.get("traceback"):
            lines.append("")
            task, step = run.error.get("task"), run.error.get("step")
            lines.append(f"traceback of task {task} (step {step})")
            lines.extend("  " + line for line in str(cause["traceback"]).rstrip().splitlines())
        if run.error.get("traceback"):
            lines.append("")
            lines.append("traceback of the workflow")
            lines.extend("  " + line for line in str(run.error["traceback"]).rstrip().splitlines())
    return "\n".join(lines)


WAIT_KINDS = ("task_scheduled", "child_started", "timer_started", "event_awaited")


def waiting_steps(history: list[HistoryEntry]) -> list[HistoryEntry]:
    """Return the steps that the workflow waits for and that have no result yet.

    A command of a wait.first() whose race another command already won is not waited for.
    """
    finished = {entry.step for entry in history if entry.kind in RESULT_KINDS}
    decided_races = {
        entry.decision
        for entry in history
        if entry.kind in WAIT_KINDS and entry.grouping == "first" and entry.step in finished
    }
    return [
        entry
        for entry in history
        if entry.kind in WAIT_KINDS
        and entry.step not in finished
        and not (entry.grouping == "first" and entry.decision in decided_races)
    ]


def _describe_wait(
    entry: HistoryEntry, history: list[HistoryEntry], lease: Timer | None = None
) -> str:
    since = format_instant(entry.created_at)
    if entry.kind == "task_scheduled":
        return _describe_task_wait(entry, history, lease)
    if entry.kind == "child_started":
        return f"step {entry.step} child workflow {entry.name} since {since}"
    if entry.kind == "timer_started":
        return f"step {entry.step} timer until {format_instant(entry.fire_at)}"
    text = f"step {entry.step} event {_event_names(entry)} since {since}"
    if entry.fire_at is not None:
        text += f", timeout at {format_instant(entry.fire_at)}"
    return text


def _describe_task_wait(
    entry: HistoryEntry, history: list[HistoryEntry], lease: Timer | None
) -> str:
    """Say which attempt of a task step the run waits for, and where that attempt is."""
    latest = entry
    for later in history:
        if later.step == entry.step and later.kind in ("task_retry_scheduled", "task_retried"):
            latest = later
    attempt = latest.attempt or 1
    head = f"step {entry.step} task {entry.name} attempt {attempt}"
    if latest.kind == "task_retry_scheduled":
        return f"{head} failed; attempt {attempt + 1} due at {format_instant(latest.fire_at)}"
    if lease is not None and lease.status == "pending":
        detail = load_json(lease.detail) or {}
        text = f"{head} running on {detail.get('agent') or 'an agent'}"
        if detail.get("heartbeat_at"):
            text += f", last heartbeat {detail['heartbeat_at']}"
        if detail.get("details"):
            text += f" ({detail['details']})"
        return text + f", lease until {format_instant(lease.fire_at)}"
    return (
        f"{head} queued on {entry.queue!r} since {format_instant(latest.created_at)}; no "
        "agent has reported it yet"
    )


def _event_names(entry: HistoryEntry) -> str:
    return " or ".join(repr(name) for name in (entry.name or "").split(","))


def _describe_entry(
    entry: HistoryEntry,
    names: dict[int, str],
    attempts: dict[tuple[int, int], Attempt],
) -> str:
    kind = entry.kind
    step = entry.step
    if kind == "run_started":
        if entry.name:
            return f"run started as a child of run {entry.name} (its step {entry.step})"
        return "run started"
    if kind in ("task_scheduled", "task_dispatched"):
        assert step is not None
        args, kwargs = _decode(entry.payload, default=[[], {}])
        call = describe_call(entry.name or "?", args, kwargs)
        names[step] = entry.name or "?"
        verb = "dispatched" if kind == "task_dispatched" else "scheduled"
        batch = f" (parallel group of {entry.batch})" if entry.batch else ""
        if entry.grouping == "first":
            batch = f" (first of {entry.batch})"
        return f"step {step} {verb:<10} {call} on queue {entry.queue!r}{batch}"
    if kind in ("task_completed", "task_failed"):
        assert step is not None
        suffix = _attempt_summary(attempts.get((step, entry.attempt or 1)))
        if kind == "task_completed":
            value = format_value(_decode(entry.payload), 120)
            return f"step {step} completed  {names.get(step, entry.name)} -> {value}{suffix}"
        error = load_json(entry.error) or {}
        return (
            f"step {step} failed     {names.get(step, entry.name)}: "
            f"{error.get('type')}: {error.get('message')}{suffix}"
        )
    described = _describe_wait_entry(entry, names) or _describe_attempt_entry(
        entry, names, attempts
    )
    if described is not None:
        return described
    if kind == "result_ignored":
        reason = (load_json(entry.error) or {}).get("reason", "")
        return f"step {step} result ignored (attempt {entry.attempt}): {reason}"
    if kind in ("run_paused", "run_resumed", "run_killed", "run_retried"):
        control = load_json(entry.error) or {}
        text = f"run {kind.removeprefix('run_')} by {control.get('by') or 'unknown'}"
        if control.get("reason"):
            text += f": {control['reason']}"
        return text
    if kind == "run_completed":
        return f"run completed -> {format_value(_decode(entry.payload), 120)}"
    if kind == "run_failed":
        error = load_json(entry.error) or {}
        return f"run failed: {error.get('type')}: {error.get('message')}"
    return kind


def _describe_wait_entry(entry: HistoryEntry, names: dict[int, str]) -> str | None:
    """Describe the history entries of child workflows, timers and events."""
    kind, step = entry.kind, entry.step
    first = f" (first of {entry.batch})" if entry.grouping == "first" else ""
    if kind in ("child_started", "child_dispatched"):
        args, kwargs, *_ = _decode(entry.payload, default=[[], {}, None])
        names[step or 0] = f"workflow {entry.name}"
        verb = "dispatched" if kind == "child_dispatched" else "started"
        call = describe_call(entry.name or "?", args, kwargs)
        return f"step {step} {verb:<10} child workflow {call}{first}"
    if kind == "child_completed":
        value = format_value(_decode(entry.payload), 120)
        return f"step {step} completed  child workflow {entry.name} -> {value}"
    if kind == "child_failed":
        error = load_json(entry.error) or {}
        return f"step {step} failed     child workflow {entry.name}: {error.get('message')}"

    if kind == "timer_started":
        rule = _decode(entry.payload, default={})
        text = describe_rule(rule) if isinstance(rule, dict) and "kind" in rule else "timer"
        return f"step {step} timer set  {text}, fires at {format_instant(entry.fire_at)}{first}"
    if kind == "timer_fired":
        return f"step {step} timer fired"

    if kind == "event_awaited":
        text = f"step {step} waiting    for event {_event_names(entry)}"
        if entry.fire_at is not None:
            text += f", timeout at {format_instant(entry.fire_at)}"
        return text + first
    if kind == "event_received":
        data = format_value(_decode(entry.payload), 120)
        return f"event {entry.name!r} received: {data}"
    if kind == "event_handled":
        return f"event {entry.name!r} given to on_event"
    if kind == "event_delivered":
        return f"step {step} event {entry.name!r} delivered to the wait"
    if kind == "event_timed_out":
        return f"step {step} event wait timed out"
    if kind == "wait_cancelled":
        return f"step {step} wait cancelled: another command of the race finished first"
    return None


def _describe_attempt_entry(
    entry: HistoryEntry, names: dict[int, str], attempts: dict[tuple[int, int], Attempt]
) -> str | None:
    """Describe the retries of a task step: failed attempts, delays and new attempts."""
    kind, step = entry.kind, entry.step or 0
    name = names.get(step, entry.name)
    if kind == "task_retry_scheduled":
        error = load_json(entry.error) or {}
        suffix = _attempt_summary(attempts.get((step, entry.attempt or 1)))
        delay = ""
        if entry.fire_at is not None:
            seconds = (entry.fire_at - entry.created_at).total_seconds()
            delay = f"; retry in {format_duration(seconds)}"
        return (
            f"step {step} attempt {entry.attempt} failed: {name}: {error.get('type')}: "
            f"{error.get('message')}{suffix}{delay}"
        )
    if kind == "task_retried":
        manual = " (manual retry, a new series of attempts)" if entry.grouping == "manual" else ""
        return f"step {step} attempt {entry.attempt} sent for {name}{manual}"
    if kind == "task_failed_retried":
        error = load_json(entry.error) or {}
        return (
            f"step {step} failed     {name}: {error.get('type')}: {error.get('message')} "
            "(then retried by hand)"
        )
    return None


def _attempt_summary(attempt: Attempt | None) -> str:
    """Describe where and how long an attempt ran, and how long it waited in its queue."""
    if attempt is None:
        return ""
    parts = []
    if attempt.attempt > 1:
        parts.append(f"attempt {attempt.attempt}")
    if attempt.started_at is not None and attempt.finished_at is not None:
        ran = (attempt.finished_at - attempt.started_at).total_seconds()
        parts.append(f"ran {format_duration(ran)}")
    if attempt.started_at is not None and attempt.queued_at is not None:
        waited = (attempt.started_at - attempt.queued_at).total_seconds()
        parts.append(f"queued {format_duration(max(waited, 0.0))}")
    if attempt.agent:
        parts.append(f"agent {attempt.agent}")
    return f" ({', '.join(parts)})" if parts else ""


def _decode(payload: bytes | None, default: Any = None) -> Any:
    if payload is None:
        return default
    try:
        return serializer.decode(payload)
    except SerializationError:
        return default


def run_document(
    run: RunView, history: list[HistoryEntry], attempts: list[Attempt]
) -> dict[str, Any]:
    """Return a run with its history and attempts as one JSON-ready document."""
    return {
        **run.to_dict(),
        "history": [
            {
                "seq": entry.seq,
                "kind": entry.kind,
                "step": entry.step,
                "decision": entry.decision,
                "batch": entry.batch,
                "name": entry.name,
                "queue": entry.queue,
                "attempt": entry.attempt,
                "value": _decode(entry.payload),
                "error": load_json(entry.error),
                "at": entry.created_at,
                "grouping": entry.grouping,
                "fire_at": entry.fire_at,
            }
            for entry in history
        ],
        "attempts": [
            {
                "step": attempt.step,
                "attempt": attempt.attempt,
                "task": attempt.task,
                "queue": attempt.queue,
                "status": attempt.status,
                "agent": attempt.agent,
                "queued_at": attempt.queued_at,
                "started_at": attempt.started_at,
                "finished_at": attempt.finished_at,
                "error": load_json(attempt.error),
            }
            for attempt in attempts
        ],
    }
