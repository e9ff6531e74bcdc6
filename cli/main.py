"""The ``zenflow`` command.

Exit codes: 0 success; 1 the run failed or the engine rejected the request; 2 invalid
command line; 3 configuration, broker or database error; 4 timed out; 5 run not found.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer

from zenflow.config import Settings, app_modules_from_env, redact_url
from zenflow.errors import (
    ConfigurationError,
    DefinitionError,
    RequestRejected,
    RunFailed,
    RunNotFound,
    RunTimeout,
    SerializationError,
    StoreError,
    TransportError,
    ZenflowError,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIGURATION = 3
EXIT_TIMEOUT = 4
EXIT_NOT_FOUND = 5

app = typer.Typer(
    name="zenflow",
    help="Durable workflows as Python generators, over RabbitMQ and a relational database.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    epilog=(
        "Examples: zenflow db upgrade; zenflow engine --app shop; zenflow agent --app shop; "
        'zenflow start OrderWorkflow \'["A-17", ["book"], 42]\' --wait; zenflow runs list'
    ),
)
runs_app = typer.Typer(help="Inspect and control runs.", no_args_is_help=True)
db_app = typer.Typer(help="Manage the history database.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(db_app, name="db")

AmqpUrl = Annotated[
    str | None,
    typer.Option(
        "--amqp-url",
        help="RabbitMQ URL. Default: $ZENFLOW_AMQP_URL, else amqp://localhost:5672/ as guest.",
        show_default=False,
    ),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="History database URL. Default: $ZENFLOW_DATABASE_URL, else sqlite:///zenflow.db.",
        show_default=False,
    ),
]
Namespace = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        help="Prefix of exchange and queue names. Default: ZENFLOW_NAMESPACE, else zenflow.",
        show_default=False,
    ),
]
Apps = Annotated[
    list[str] | None,
    typer.Option(
        "--app",
        help="Module that defines tasks and workflows; repeat for several. Default: ZENFLOW_APP.",
        show_default=False,
    ),
]
LogLevel = Annotated[
    str | None,
    typer.Option(
        "--log-level", help="debug, info, warning or error. Default: ZENFLOW_LOG_LEVEL, else info."
    ),
]


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {redact_url(message)}", err=True)
    raise typer.Exit(code)


@contextmanager
def clear_errors() -> Iterator[None]:
    """Turn zenflow errors into one line on stderr and a documented exit code."""
    try:
        yield
    except RunFailed as error:
        fail(str(error), EXIT_FAILED)
    except RequestRejected as error:
        fail(f"the engine rejected the request ({error.code}): {error}", EXIT_FAILED)
    except RunTimeout as error:
        fail(str(error), EXIT_TIMEOUT)
    except RunNotFound as error:
        fail(str(error), EXIT_NOT_FOUND)
    except (ConfigurationError, TransportError, StoreError) as error:
        fail(str(error), EXIT_CONFIGURATION)
    except (DefinitionError, SerializationError, TypeError) as error:
        fail(str(error), EXIT_FAILED)
    except ZenflowError as error:
        fail(str(error), EXIT_FAILED)


def _settings(
    amqp_url: str | None = None, database_url: str | None = None, namespace: str | None = None
) -> Settings:
    return Settings.load(amqp_url=amqp_url, database_url=database_url, namespace=namespace)


# Long-running processes.


def _serve(make_service: Callable[[], Any], log_level: str | None) -> None:
    from zenflow.logs import configure_logging

    configure_logging(log_level)
    # Engine and agent hand work between the event loop and worker threads. A thread that
    # becomes ready waits for the GIL up to the switch interval (5 ms by default), which
    # would dominate a step that takes a few milliseconds.
    sys.setswitchinterval(0.0005)
    service = make_service()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def on_signal() -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                # A second signal stops at once; unacknowledged messages return to the queue.
                os._exit(128 + signal.SIGTERM)
            stop.set()

        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, on_signal)
        await service.run(stop)

    asyncio.run(main())


@app.command()
def engine(
    app_modules: Apps = None,
    amqp_url: AmqpUrl = None,
    database_url: DatabaseUrl = None,
    namespace: Namespace = None,
    cache_size: Annotated[
        int,
        typer.Option(
            help="Maximum number of live workflow generators kept in memory.", min=0, max=10_000_000
        ),
    ] = 10_000,
    max_request_bytes: Annotated[
        int,
        typer.Option(
            help="Largest accepted start request body, in bytes.", min=1024, max=128 * 1024 * 1024
        ),
    ] = 1024 * 1024,
    clock_offset: Annotated[
        float,
        typer.Option(
            help="Seconds added to the engine's clock, to test timers and calendar waits "
            "without waiting for the date. Leave at 0 in production.",
            min=-1e9,
            max=1e9,
        ),
    ] = 0.0,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Database worker threads. Default: 1 on SQLite, 4 on PostgreSQL.", min=1, max=256
        ),
    ] = None,
    log_level: LogLevel = None,
) -> None:
    """Run the engine: start runs, record results, drive workflows. Stop with SIGTERM."""
    from engine.service import EngineOptions, EngineService
    from zenflow.registry import load_registry

    with clear_errors():
        settings = _settings(amqp_url, database_url, namespace)
        registry = load_registry(app_modules_from_env(app_modules))
        if not registry.workflows:
            raise ConfigurationError(
                f"no workflows found in {', '.join(registry.modules)}: define Workflow "
                "subclasses or @workflow functions there"
            )
        options = EngineOptions(
            settings=settings,
            cache_size=cache_size,
            max_request_bytes=max_request_bytes,
            workers=workers,
            clock_offset=clock_offset,
        )
        _serve(lambda: EngineService(options, registry), log_level)


@app.command()
def agent(
    app_modules: Apps = None,
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            help="Task queue to consume; repeat for several. "
            "Default: every queue of the app's tasks.",
        ),
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            help="Tasks run at the same time (and messages prefetched).", min=1, max=65535
        ),
    ] = 8,
    ack_after: Annotated[
        float,
        typer.Option(
            help="Seconds after which a running task is acknowledged to RabbitMQ and kept "
            "alive by heartbeats to the engine instead. Keep it below RabbitMQ's "
            "consumer_timeout.",
            min=0,
            max=1500,
        ),
    ] = 60.0,
    lease: Annotated[
        float,
        typer.Option(
            help="Seconds that each heartbeat of a long task is valid for; the engine retries "
            "the task if no heartbeat comes within it. Heartbeats go every third of it.",
            min=1,
            max=3600,
        ),
    ] = 30.0,
    max_deliveries: Annotated[
        int,
        typer.Option(
            help="Times a task message may reach agents that die or stop before finishing it; "
            "then it goes to the dead-letter queue and its step fails with PoisonMessage.",
            min=1,
            max=1000,
        ),
    ] = 5,
    amqp_url: AmqpUrl = None,
    namespace: Namespace = None,
    log_level: LogLevel = None,
) -> None:
    """Run an agent: execute tasks from the queues and publish results. Stop with SIGTERM."""
    from agent.service import AgentOptions, AgentService
    from zenflow.registry import load_registry

    with clear_errors():
        settings = _settings(amqp_url, None, namespace)
        registry = load_registry(app_modules_from_env(app_modules))
        options = AgentOptions(
            settings=settings,
            queues=tuple(queue or ()),
            concurrency=concurrency,
            ack_after=ack_after,
            lease=lease,
            max_deliveries=max_deliveries,
        )
        service = AgentService(options, registry)
        _serve(lambda: service, log_level)


class IfRunning(enum.StrEnum):
    reject = "reject"
    return_existing = "return_existing"


@app.command()
def start(
    workflow: Annotated[
        str, typer.Argument(metavar="WORKFLOW", help="Name of the workflow to start.")
    ],
    args_json: Annotated[
        str | None,
        typer.Argument(
            metavar="ARGS_JSON",
            help="Arguments as JSON: an array of positional arguments, "
            "e.g. '[\"A-17\", 4200]', or an object of keyword arguments.",
        ),
    ] = None,
    business_id: Annotated[
        str | None, typer.Option("--id", help="Business id of the run, e.g. order-A-17.")
    ] = None,
    if_running: Annotated[
        IfRunning,
        typer.Option(
            help="When an active run has the business id: reject the start, or print that run's id."
        ),
    ] = IfRunning.reject,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the run to finish and print its result.")
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for the engine's reply, and with --wait for the run.", min=0.1
        ),
    ] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    amqp_url: AmqpUrl = None,
    namespace: Namespace = None,
) -> None:
    """Start a run of WORKFLOW and print its run id."""
    from cli.render import to_json
    from zenflow.client import Client

    args, kwargs = parse_arguments(args_json)
    with clear_errors():
        settings = _settings(amqp_url, None, namespace)
        with Client(settings.amqp_url, namespace=settings.namespace) as client:
            try:
                run_id = client.start(
                    workflow,
                    *args,
                    business_id=business_id,
                    if_running=if_running.value,
                    reply_timeout=min(timeout, 15.0),
                    **kwargs,
                )
            except RunTimeout as error:
                typer.echo(
                    "warning: no engine replied; the request stays queued until an engine takes it",
                    err=True,
                )
                if wait:
                    raise
                typer.echo(to_json({"run_id": error.run_id}) if as_json else error.run_id)
                return
            if not wait:
                typer.echo(to_json({"run_id": run_id}) if as_json else run_id)
                return
            try:
                result = client.wait(run_id, timeout=timeout)
            except RunFailed as error:
                if as_json:
                    typer.echo(
                        to_json({"run_id": run_id, "status": "failed", "error": error.error})
                    )
                    raise typer.Exit(EXIT_FAILED) from None
                raise
            if as_json:
                typer.echo(to_json({"run_id": run_id, "status": "completed", "result": result}))
            else:
                typer.echo(run_id)
                typer.echo(to_json(result))


def parse_arguments(args_json: str | None) -> tuple[list[Any], dict[str, Any]]:
    """Parse ARGS_JSON into positional and keyword arguments, or exit with a clear error."""
    if args_json is None or not args_json.strip():
        return [], {}
    try:
        value = json.loads(args_json)
    except ValueError as error:
        fail(
            f"invalid ARGS_JSON {args_json!r}: {error}. Pass a JSON array such as "
            '\'["A-17", 4200]\' or an object such as \'{"order_id": "A-17"}\'',
            2,
        )
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    fail(
        f"invalid ARGS_JSON {args_json!r}: expected a JSON array of positional arguments or an "
        f"object of keyword arguments, not {json.dumps(value)[:40]} ({type(value).__name__})",
        2,
    )


def parse_json(text: str, what: str) -> Any:
    """Parse a JSON argument, or exit with a clear error that names it."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        fail(f"invalid {what} {text[:80]!r}: {error}. Pass JSON, e.g. '{{\"id\": 7}}'", 2)


# Runs.


class Status(enum.StrEnum):
    running = "running"
    paused = "paused"
    completed = "completed"
    failed = "failed"
    killed = "killed"


@contextmanager
def _session(database_url: str | None) -> Iterator[Any]:
    from engine.store.database import check_schema, create_database_engine, translate_errors

    settings = _settings(database_url=database_url)
    database = create_database_engine(settings.database_url, must_exist=True)
    try:
        check_schema(database, settings.database_url)
        with translate_errors(settings.database_url), database.connect() as connection:
            from sqlalchemy.orm import Session

            with Session(connection) as session:
                yield session
    finally:
        database.dispose()


@runs_app.command("list")
def runs_list(
    status: Annotated[Status | None, typer.Option(help="Show only runs with this status.")] = None,
    workflow: Annotated[str | None, typer.Option(help="Show only runs of this workflow.")] = None,
    business_id: Annotated[
        str | None, typer.Option("--business-id", help="Show only runs with this business id.")
    ] = None,
    waiting_for: Annotated[
        str | None,
        typer.Option("--waiting-for", help="Show only runs waiting for the event of this name."),
    ] = None,
    parent: Annotated[
        str | None, typer.Option("--parent", help="Show only child runs of this run id.")
    ] = None,
    limit: Annotated[
        int, typer.Option(help="Maximum number of runs shown, newest first.", min=1, max=1_000_000)
    ] = 50,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON array instead of a table.")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """List runs, newest first."""
    from cli.render import runs_table, to_json
    from engine.store.queries import list_runs, view_run

    with clear_errors(), _session(database_url) as session:
        runs = [
            view_run(run)
            for run in list_runs(
                session,
                status=status.value if status else None,
                workflow=workflow,
                business_id=business_id,
                waiting_for=waiting_for,
                parent_id=parent,
                limit=limit,
            )
        ]
        if as_json:
            typer.echo(to_json([run.to_dict() for run in runs]))
        else:
            typer.echo(runs_table(runs))


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="Run id or business id.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run, history and attempts as JSON.")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Show a run and the timeline of its history, with durations and errors."""
    from cli.render import run_document, run_timeline, to_json
    from engine.store.queries import (
        attempts_of,
        find_run,
        history_of,
        list_runs,
        timers_of,
        view_run,
    )

    with clear_errors(), _session(database_url) as session:
        run = find_run(session, run_id)
        if run is None:
            raise RunNotFound(f"no run has the id or business id {run_id!r}")
        view = view_run(run)
        history = history_of(session, run.id)
        attempts = attempts_of(session, run.id)
        children = [view_run(child) for child in list_runs(session, parent_id=run.id, limit=1000)]
        timers = timers_of(session, run.id)
        if as_json:
            document = run_document(view, history, attempts)
            document["children"] = [child.to_dict() for child in children]
            typer.echo(to_json(document))
        else:
            typer.echo(run_timeline(view, history, attempts, children, timers))


RunReference = Annotated[str, typer.Argument(metavar="RUN", help="Run id or business id.")]


@runs_app.command("event")
def runs_event(
    run: RunReference,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Event name, e.g. Delivered.")],
    data_json: Annotated[
        str | None,
        typer.Argument(metavar="DATA_JSON", help="Event data as JSON. Default: null."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the engine's reply.", min=0.1)
    ] = 30.0,
    amqp_url: AmqpUrl = None,
    namespace: Namespace = None,
) -> None:
    """Send the event NAME with DATA_JSON to a running or paused run."""
    from zenflow.client import Client

    data = parse_json(data_json, "DATA_JSON") if data_json is not None else None
    with clear_errors():
        settings = _settings(amqp_url, None, namespace)
        with Client(settings.amqp_url, namespace=settings.namespace) as client:
            reply = client.send_event(run, name, data, timeout=timeout)
    if reply.get("delivered"):
        typer.echo(f"event {name!r} delivered to run {reply['run_id']}")
    elif reply.get("handled"):
        typer.echo(f"event {name!r} given to on_event of run {reply['run_id']}")
    else:
        typer.echo(f"event {name!r} kept for run {reply['run_id']} until it waits for it")


def _control(
    action: str, run: str, reason: str | None, timeout: float, amqp_url: str | None, ns: str | None
) -> None:
    from zenflow.client import Client

    with clear_errors():
        settings = _settings(amqp_url, None, ns)
        with Client(settings.amqp_url, namespace=settings.namespace) as client:
            if action == "kill":
                reply = client.kill(run, reason=reason, timeout=timeout)
            elif action == "pause":
                reply = client.pause(run, timeout=timeout)
            else:
                reply = client.resume(run, timeout=timeout)
    typer.echo(f"run {reply['run_id']} is {reply['status']}")


ControlTimeout = Annotated[
    float, typer.Option("--timeout", help="Seconds to wait for the engine's reply.", min=0.1)
]


@runs_app.command("kill")
def runs_kill(
    run: RunReference,
    reason: Annotated[
        str | None, typer.Option(help="Why the run is killed; stored in its history.")
    ] = None,
    timeout: ControlTimeout = 30.0,
    amqp_url: AmqpUrl = None,
    namespace: Namespace = None,
) -> None:
    """Kill a run: nothing more is dispatched, timers are cancelled, children are killed."""
    _control("kill", run, reason, timeout, amqp_url, namespace)


@runs_app.command("pause")
def runs_pause(
    run: RunReference,
    timeout: ControlTimeout = 30.0,
    amqp_url: AmqpUrl = None,
    namespace: Namespace = None,
) -> None:
    """Pause a run: running tasks finish and are recorded, the workflow waits for resume."""
    _control("pause", run, None, timeout, amqp_url, namespace)


@runs_app.command("resume")
def runs_resume(
    run: RunReference,
    timeout: ControlTimeout = 30.0,
    amqp_url: AmqpUrl = None,
    namespace: Namespace = None,
) -> None:
    """Resume a paused run with what happened while it was paused."""
    _control("resume", run, None, timeout, amqp_url, namespace)


@runs_app.command("retry")
def runs_retry(
    run: Annotated[
        str | None,
        typer.Argument(
            metavar="[RUN]", help="Run id or business id of a failed run. Omit with --workflow."
        ),
    ] = None,
    workflow: Annotated[
        str | None, typer.Option(help="Retry every failed run of this workflow.")
    ] = None,
    status: Annotated[
        Status | None,
        typer.Option(help="With --workflow: the status of the runs to retry; only failed."),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="With --workflow: do not ask for confirmation.")
    ] = False,
    limit: Annotated[
        int,
        typer.Option(
            help="With --workflow: the maximum number of runs to retry.", min=1, max=100_000
        ),
    ] = 1000,
    timeout: ControlTimeout = 30.0,
    amqp_url: AmqpUrl = None,
    namespace: Namespace = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Retry a failed run from the step that failed, or every failed run of a workflow.

    The failed task step gets a new series of attempts and the workflow continues from it;
    the earlier attempts stay in the history. A run that failed in workflow code is replayed
    with the code the engine runs now.
    """
    from zenflow.client import Client

    if (run is None) == (workflow is None):
        fail("give either RUN or --workflow NAME", EXIT_USAGE)
    if status is not None and status is not Status.failed:
        fail(f"invalid --status {status.value}: only failed runs can be retried", EXIT_USAGE)
    with clear_errors():
        if run is not None:
            targets = [run]
        else:
            from engine.store.queries import list_runs

            with _session(database_url) as session:
                targets = [
                    found.id
                    for found in list_runs(session, status="failed", workflow=workflow, limit=limit)
                ]
            if not targets:
                typer.echo(f"no failed runs of workflow {workflow}")
                return
            noun = "run" if len(targets) == 1 else "runs"
            typer.echo(f"{len(targets)} failed {noun} of workflow {workflow} to retry")
            if not yes:
                typer.confirm("Retry them?", abort=True)
        settings = _settings(amqp_url, None, namespace)
        failures = 0
        with Client(settings.amqp_url, namespace=settings.namespace) as client:
            for target in targets:
                try:
                    reply = client.retry(target, timeout=timeout)
                except RequestRejected as error:
                    if run is not None:
                        raise
                    failures += 1
                    typer.echo(f"run {target} not retried ({error.code}): {error}", err=True)
                    continue
                if "step" in reply:
                    typer.echo(
                        f"run {reply['run_id']} is {reply['status']}: step {reply['step']} "
                        f"runs again as attempt {reply['attempt']}, the first of a new series"
                    )
                else:
                    typer.echo(f"run {reply['run_id']} is {reply['status']} after a replay")
    if failures:
        fail(f"{failures} of {len(targets)} runs were not retried", EXIT_FAILED)


# Database.


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseUrl = None) -> None:
    """Create or migrate the history database to the latest schema."""
    from engine.store.database import upgrade

    with clear_errors():
        settings = _settings(database_url=database_url)
        before, after = upgrade(settings.database_url)
        shown = redact_url(settings.database_url)
        if before == after:
            typer.echo(f"database {shown} is up to date (revision {after})")
        else:
            typer.echo(f"database {shown} upgraded from {before or 'empty'} to revision {after}")


def main() -> None:
    """Entry point of the console script."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
