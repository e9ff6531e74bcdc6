"""Human-readable output of runs and their history, and JSON output for scripts."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from engine.store.models import Attempt, HistoryEntry
from engine.store.queries import RunView, load_json
from zenflow import protocol, serializer
from zenflow.commands import describe_call
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


def run_timeline(run: RunView, history: list[HistoryEntry], attempts: list[Attempt]) -> str:
    """Format a run's summary and the timeline of its history, with durations and errors."""
    lines = [f"run {run.run_id}", f"  workflow     {run.workflow}"]
    if run.business_id:
        lines.append(f"  business id  {run.business_id}")
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
    if run.status == "running" and waiting:
        lines.append("")
        lines.append("waiting for")
        for entry in waiting:
            since = format_instant(entry.created_at)
            lines.append(f"  step {entry.step} {entry.name} on queue {entry.queue!r} since {since}")
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


def waiting_steps(history: list[HistoryEntry]) -> list[HistoryEntry]:
    """Return the scheduled steps that the workflow waits for and that have no result yet."""
    finished = {entry.step for entry in history if entry.kind in ("task_completed", "task_failed")}
    return [
        entry for entry in history if entry.kind == "task_scheduled" and entry.step not in finished
    ]


def _describe_entry(
    entry: HistoryEntry,
    names: dict[int, str],
    attempts: dict[tuple[int, int], Attempt],
) -> str:
    kind = entry.kind
    step = entry.step
    if kind == "run_started":
        return "run started"
    if kind in ("task_scheduled", "task_dispatched"):
        assert step is not None
        args, kwargs = _decode(entry.payload, default=[[], {}])
        call = describe_call(entry.name or "?", args, kwargs)
        names[step] = entry.name or "?"
        verb = "dispatched" if kind == "task_dispatched" else "scheduled"
        batch = f" (parallel group of {entry.batch})" if entry.batch else ""
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
    if kind == "result_ignored":
        reason = (load_json(entry.error) or {}).get("reason", "")
        return f"step {step} duplicate result ignored (attempt {entry.attempt}): {reason}"
    if kind == "run_completed":
        return f"run completed -> {format_value(_decode(entry.payload), 120)}"
    if kind == "run_failed":
        error = load_json(entry.error) or {}
        return f"run failed: {error.get('type')}: {error.get('message')}"
    return kind


def _attempt_summary(attempt: Attempt | None) -> str:
    """Describe where and how long an attempt ran, and how long it waited in its queue."""
    if attempt is None:
        return ""
    parts = []
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
