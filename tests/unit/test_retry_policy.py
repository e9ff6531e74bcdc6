"""Retry policies, task run options, the engine's retry decision and the agent's attempt limits.

Pure logic, without a broker or a database: zenflow.retry, the validation of task classes and
@task options, engine.retries.next_delay over hand-built steps, and agent.attempts.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.attempts import RunningAttempt, retry_advice
from engine.replay import Step, task_options
from engine.retries import LEASE_EXPIRED, lost_attempt, next_delay, policy_of
from zenflow import NonRetryableError, Retry, Task, protocol, set_default_retry, task
from zenflow.commands import TaskCall
from zenflow.errors import AttemptCancelled, DefinitionError
from zenflow.retry import (
    MAX_ATTEMPTS,
    MAX_DELAY,
    NO_RETRY,
    default_retry,
    is_non_retryable,
    seconds_of,
)

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

SECOND = dt.timedelta(seconds=1)


class CardDeclined(ValueError):
    """A user error class, defined in this module so its qualified name is known."""


class Billing:
    class Refused(Exception):
        """A nested error class: its qualified name has a dot inside the class part."""


class FlaggedError(Exception):
    non_retryable = True


class TruthyFlagError(Exception):
    non_retryable = 1  # truthy, but not True


@pytest.fixture
def restore_default_retry() -> Iterator[None]:
    saved = default_retry()
    try:
        yield
    finally:
        set_default_retry(saved)


def raises_naming(value: str, call: Callable[[], object], *words: str) -> str:
    """Call ``call``, expect a DefinitionError whose message contains ``value`` and ``words``."""
    with pytest.raises(DefinitionError) as caught:
        call()
    message = str(caught.value)
    assert value in message, message
    for word in words:
        assert word in message, message
    return message


# Retry: validation.


@pytest.mark.parametrize(
    ("attempts", "value_text"),
    [(0, "0"), (-1, "-1"), (True, "True"), (1.5, "1.5"), (MAX_ATTEMPTS + 1, "10001"), ("3", "'3'")],
)
def test_retry_rejects_invalid_attempts(attempts: Any, value_text: str) -> None:
    raises_naming(value_text, lambda: Retry(attempts=attempts), "attempts")


@pytest.mark.parametrize("attempts", [1, 2, MAX_ATTEMPTS])
def test_retry_accepts_attempts_in_range(attempts: int) -> None:
    assert Retry(attempts=attempts).attempts == attempts


@pytest.mark.parametrize("field", ["initial", "max_delay"])
@pytest.mark.parametrize(
    "value",
    [
        dt.timedelta(seconds=-1),
        dt.timedelta(microseconds=-1),
        MAX_DELAY + SECOND,
        5,
        2.5,
        "5s",
        None,
    ],
)
def test_retry_rejects_invalid_delays(field: str, value: Any) -> None:
    value_text = str(value) if isinstance(value, dt.timedelta) else repr(value)
    raises_naming(value_text, lambda: Retry(**{field: value}), field)


@pytest.mark.parametrize(
    ("backoff", "value_text"),
    [
        (0.5, "0.5"),
        (0, "0"),
        (-2.0, "-2.0"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (100.5, "100.5"),
        (True, "True"),
        ("2", "'2'"),
    ],
)
def test_retry_rejects_invalid_backoff(backoff: Any, value_text: str) -> None:
    raises_naming(value_text, lambda: Retry(backoff=backoff), "backoff")


@pytest.mark.parametrize(
    ("entry", "value_text"),
    [(int, "int"), ("", "''"), (5, "5"), (None, "None"), (object(), "object")],
)
def test_retry_rejects_invalid_non_retryable_entries(entry: Any, value_text: str) -> None:
    raises_naming(value_text, lambda: Retry(non_retryable=(KeyError, entry)), "non_retryable")


@pytest.mark.parametrize(("value", "value_text"), [(None, "None"), (5, "5"), (1.5, "1.5")])
def test_retry_rejects_non_iterable_non_retryable(value: Any, value_text: str) -> None:
    raises_naming(value_text, lambda: Retry(non_retryable=value), "non_retryable")


def test_retry_wraps_single_non_retryable() -> None:
    assert Retry(non_retryable=KeyError).non_retryable == (KeyError,)
    assert Retry(non_retryable="KeyError").non_retryable == ("KeyError",)


def test_retry_non_retryable_list_is_hashable() -> None:
    policy = Retry(non_retryable=[KeyError, "billing.CardDeclined"])

    assert policy.non_retryable == (KeyError, "billing.CardDeclined")
    assert hash(policy) == hash(Retry(non_retryable=(KeyError, "billing.CardDeclined")))


# Retry: the delay sequence.


def test_retry_delays_grow_then_cap() -> None:
    policy = Retry(attempts=6, initial=SECOND, backoff=3.0, max_delay=dt.timedelta(seconds=20))

    delays = [policy.delay(attempt) for attempt in range(1, 7)]

    assert delays == [SECOND, 3 * SECOND, 9 * SECOND, 20 * SECOND, 20 * SECOND, None]


def test_retry_delay_after_last_attempt() -> None:
    assert Retry(attempts=3).delay(3) is None
    assert Retry(attempts=3).delay(4) is None
    assert NO_RETRY.delay(1) is None


def test_retry_zero_initial_delay() -> None:
    policy = Retry(attempts=4, initial=dt.timedelta(0), backoff=100.0)

    assert [policy.delay(attempt) for attempt in (1, 2, 3)] == [dt.timedelta(0)] * 3


def test_retry_initial_capped_by_max_delay() -> None:
    policy = Retry(initial=dt.timedelta(minutes=5), max_delay=dt.timedelta(minutes=1))

    assert policy.delay(1) == dt.timedelta(minutes=1)


@pytest.mark.parametrize(
    ("backoff", "attempt"),
    [(100.0, 200), (100.0, MAX_ATTEMPTS - 1), (2.5, 900), (3.0, 700), (2.0, MAX_ATTEMPTS - 1)],
)
def test_retry_delay_huge_attempt_is_max(backoff: float, attempt: int) -> None:
    policy = Retry(attempts=MAX_ATTEMPTS, initial=SECOND, backoff=backoff, max_delay=MAX_DELAY)

    assert policy.delay(attempt) == MAX_DELAY


policies = st.builds(
    Retry,
    attempts=st.integers(min_value=1, max_value=60),
    initial=st.timedeltas(min_value=dt.timedelta(0), max_value=dt.timedelta(hours=2)),
    backoff=st.floats(min_value=1.0, max_value=100.0),
    max_delay=st.timedeltas(min_value=dt.timedelta(0), max_value=MAX_DELAY),
)


@PROPERTY_SETTINGS
@given(policies)
def test_retry_delays_monotonic_and_capped(policy: Retry) -> None:
    delays = [policy.delay(attempt) for attempt in range(1, policy.attempts)]

    assert all(delay is not None for delay in delays)
    present = [delay for delay in delays if delay is not None]
    assert all(dt.timedelta(0) <= delay <= policy.max_delay for delay in present)
    assert present == sorted(present)
    assert policy.delay(policy.attempts) is None


@PROPERTY_SETTINGS
@given(
    attempts=st.integers(min_value=2, max_value=MAX_ATTEMPTS),
    backoff=st.floats(min_value=1.0, max_value=100.0),
    max_delay=st.timedeltas(min_value=dt.timedelta(0), max_value=MAX_DELAY),
    data=st.data(),
)
def test_retry_delay_any_attempt_in_range(
    attempts: int, backoff: float, max_delay: dt.timedelta, data: st.DataObject
) -> None:
    policy = Retry(attempts=attempts, initial=SECOND, backoff=backoff, max_delay=max_delay)
    attempt = data.draw(st.integers(min_value=1, max_value=attempts - 1))

    delay = policy.delay(attempt)

    assert delay is not None
    assert dt.timedelta(0) <= delay <= max_delay


# Retry: the wire form.


def test_retry_to_wire_qualified_names() -> None:
    policy = Retry(
        attempts=4,
        initial=dt.timedelta(milliseconds=250),
        backoff=1.5,
        max_delay=dt.timedelta(minutes=2),
        non_retryable=(KeyError, CardDeclined, Billing.Refused, "billing.Other"),
    )

    wire = policy.to_wire()

    assert wire == {
        "attempts": 4,
        "initial": 0.25,
        "backoff": 1.5,
        "max_delay": 120.0,
        "non_retryable": [
            "KeyError",
            f"{__name__}.CardDeclined",
            f"{__name__}.Billing.Refused",
            "billing.Other",
        ],
    }
    again = Retry.from_wire(wire)
    assert again.to_wire() == wire
    assert again.non_retryable == tuple(wire["non_retryable"])


names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)


@PROPERTY_SETTINGS
@given(policy=policies, non_retryable=st.lists(names, max_size=5))
def test_retry_wire_round_trip(policy: Retry, non_retryable: list[str]) -> None:
    policy = Retry(
        attempts=policy.attempts,
        initial=policy.initial,
        backoff=policy.backoff,
        max_delay=policy.max_delay,
        non_retryable=tuple(non_retryable),
    )

    again = Retry.from_wire(policy.to_wire())

    assert again == policy


VALID_WIRE: dict[str, Any] = {
    "attempts": 3,
    "initial": 1.0,
    "backoff": 2.0,
    "max_delay": 60.0,
    "non_retryable": ["KeyError"],
}


@pytest.mark.parametrize("missing", ["attempts", "initial", "backoff", "max_delay"])
def test_from_wire_missing_field(missing: str) -> None:
    fields = {key: value for key, value in VALID_WIRE.items() if key != missing}

    raises_naming(missing, lambda: Retry.from_wire(fields), "invalid")


def test_from_wire_without_non_retryable() -> None:
    fields = {key: value for key, value in VALID_WIRE.items() if key != "non_retryable"}

    assert Retry.from_wire(fields).non_retryable == ()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attempts", "3"),
        ("attempts", 3.0),
        ("attempts", None),
        ("attempts", 2**70),
        ("attempts", 0),
        ("initial", "soon"),
        ("initial", None),
        ("initial", math.nan),
        ("initial", math.inf),
        ("initial", -math.inf),
        ("initial", 1e300),
        ("initial", -5),
        ("initial", [1]),
        ("max_delay", math.nan),
        ("max_delay", 1e20),
        ("max_delay", {"seconds": 1}),
        ("backoff", math.nan),
        ("backoff", "2"),
        ("backoff", None),
        ("backoff", 0.1),
        ("non_retryable", 5),
    ],
)
def test_from_wire_hostile_field(field: str, value: Any) -> None:
    fields = {**VALID_WIRE, field: value}

    raises_naming(field if field != "non_retryable" else "5", lambda: Retry.from_wire(fields))


def test_from_wire_string_non_retryable() -> None:
    # The wire form is a list of names, so a bare string must not become a list of letters.
    fields = {**VALID_WIRE, "non_retryable": "KeyError"}

    try:
        policy = Retry.from_wire(fields)
    except DefinitionError as error:
        assert "KeyError" in str(error)
    else:
        assert policy.non_retryable == ("KeyError",)


# Default policy.


def test_default_retry_set_and_reset(restore_default_retry: None) -> None:
    set_default_retry(None)
    assert default_retry() == NO_RETRY

    policy = Retry(attempts=7)
    set_default_retry(policy)
    assert default_retry() is policy

    set_default_retry(None)
    assert default_retry() == NO_RETRY


@pytest.mark.parametrize(
    ("value", "value_text"), [(3, "3"), ("Retry", "'Retry'"), (Retry, "Retry")]
)
def test_set_default_retry_rejects_non_policy(
    value: Any, value_text: str, restore_default_retry: None
) -> None:
    raises_naming(value_text, lambda: set_default_retry(value), "default retry")


def test_task_options_default_policy(restore_default_retry: None) -> None:
    set_default_retry(Retry(attempts=9))
    own = Retry(attempts=2)

    assert task_options(TaskCall("T", "q"))["retry"]["attempts"] == 9
    assert task_options(TaskCall("T", "q", retry=own))["retry"]["attempts"] == 2
    assert task_options(TaskCall("T", "q", timeout=5, heartbeat=1.5)) == {
        "retry": Retry(attempts=9).to_wire(),
        "timeout": 5.0,
        "heartbeat": 1.5,
    }


# Errors that must not be retried.


@pytest.mark.parametrize(
    ("error", "names", "expected"),
    [
        (KeyError("k"), ["KeyError"], True),
        (KeyError("k"), ["LookupError"], True),  # a base class matches its subclasses
        (LookupError("k"), ["KeyError"], False),  # but not the other way round
        (CardDeclined(), ["CardDeclined"], True),
        (CardDeclined(), [f"{__name__}.CardDeclined"], True),
        (CardDeclined(), ["ValueError"], True),
        (CardDeclined(), ["other.module.CardDeclined"], False),
        (Billing.Refused(), ["Refused"], True),
        (Billing.Refused(), [f"{__name__}.Billing.Refused"], True),
        (RuntimeError("x"), ["KeyError", "ValueError"], False),
        (RuntimeError("x"), [], False),
        (NonRetryableError("declined"), [], True),
        (FlaggedError(), [], True),
    ],
)
def test_is_non_retryable_cases(error: BaseException, names: list[str], expected: bool) -> None:
    assert is_non_retryable(error, names) is expected


def test_is_non_retryable_instance_flag() -> None:
    error = RuntimeError("fatal")
    error.non_retryable = True  # type: ignore[attr-defined]

    assert is_non_retryable(error, [])


def test_is_non_retryable_truthy_flag() -> None:
    # Any true value of the attribute counts, as for an if statement.
    assert is_non_retryable(TruthyFlagError(), [])


def test_non_retryable_error_subclass() -> None:
    class Declined(NonRetryableError):
        pass

    assert is_non_retryable(Declined("no"), ["Unrelated"])


# Timeouts and heartbeat intervals.


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (5, 5.0), (0.25, 0.25), (dt.timedelta(minutes=2), 120.0)],
)
def test_seconds_of_valid_limits(value: Any, expected: float | None) -> None:
    assert seconds_of(value, "timeout", "T") == expected


@pytest.mark.parametrize(
    ("value", "value_text"),
    [
        (0, "0"),
        (-1, "-1"),
        (dt.timedelta(0), "timedelta(0)"),
        (dt.timedelta(seconds=-3), "timedelta(days=-1"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (True, "True"),
        ("30", "'30'"),
        (MAX_DELAY + SECOND, "timedelta(days=366, seconds=1)"),
        (1e10, "10000000000.0"),
    ],
)
def test_seconds_of_rejects_invalid_limits(value: Any, value_text: str) -> None:
    raises_naming(value_text, lambda: seconds_of(value, "timeout", "Owner"), "timeout", "Owner")


# Task classes and @task options.


@pytest.mark.parametrize(
    ("attribute", "value", "value_text"),
    [
        ("retry", 3, "3"),
        ("retry", Retry, "Retry"),
        ("retry", {"attempts": 3}, "'attempts'"),
        ("timeout", -1, "-1"),
        ("timeout", 0, "0"),
        ("timeout", "10s", "'10s'"),
        ("timeout", math.nan, "nan"),
        ("timeout", dt.timedelta(days=400), "400"),
        ("heartbeat", dt.timedelta(0), "timedelta(0)"),
        ("heartbeat", True, "True"),
        ("heartbeat", math.inf, "inf"),
    ],
)
def test_task_class_invalid_option(attribute: str, value: Any, value_text: str) -> None:
    def define() -> type[Task]:
        return type("Broken", (Task,), {attribute: value, "handle": lambda self: None})

    raises_naming(value_text, define, attribute, "Broken")


def test_task_class_non_callable_retry_delay() -> None:
    # @task(retry_delay=...) rejects a value that is not a function. A class is held to
    # the same rule, since `retry_delay = timedelta(seconds=5)` would otherwise be ignored.
    def define() -> type[Task]:
        return type(
            "FixedDelay", (Task,), {"retry_delay": dt.timedelta(seconds=5), "handle": lambda s: 1}
        )

    raises_naming("timedelta(seconds=5)", define, "retry_delay", "FixedDelay")


def test_task_class_options_in_call() -> None:
    policy = Retry(attempts=4)

    class Charge(Task):
        retry = policy
        timeout = dt.timedelta(seconds=90)
        heartbeat = 10

        def handle(self) -> None:
            return None

    call = Charge().to_call()

    assert call.retry is policy
    assert call.timeout == 90.0
    assert call.heartbeat == 10.0


@pytest.mark.parametrize(
    ("options", "value_text", "word"),
    [
        ({"retry": 3}, "3", "retry"),
        ({"retry": "Retry(3)"}, "'Retry(3)'", "retry"),
        ({"timeout": 0}, "0", "timeout"),
        ({"timeout": -2.5}, "-2.5", "timeout"),
        ({"timeout": "1m"}, "'1m'", "timeout"),
        ({"heartbeat": math.nan}, "nan", "heartbeat"),
        ({"heartbeat": dt.timedelta(days=367)}, "367", "heartbeat"),
        ({"retry_delay": 5}, "5", "retry_delay"),
        ({"retry_delay": dt.timedelta(seconds=5)}, "timedelta(seconds=5)", "retry_delay"),
    ],
)
def test_task_decorator_invalid_option(options: dict[str, Any], value_text: str, word: str) -> None:
    def define() -> object:
        @task(**options)
        def charge() -> None:
            return None

        return charge

    raises_naming(value_text, define, word, "charge")


def test_task_decorator_options_in_call() -> None:
    policy = Retry(attempts=2)

    def delay(error: BaseException, attempt: int) -> dt.timedelta | None:
        return None

    @task(retry=policy, timeout=dt.timedelta(seconds=3), heartbeat=1, retry_delay=delay)
    def charge(amount: int) -> int:
        return amount

    call = charge(5)

    assert (call.retry, call.timeout, call.heartbeat) == (policy, 3.0, 1.0)
    assert charge.retry_delay is delay


# engine.retries: the decision after a failed attempt.


def task_step(
    policy: Retry | None = None,
    *,
    attempt: int = 1,
    first_attempt: int = 1,
    options: dict[str, Any] | None = None,
) -> Step:
    if options is None and policy is not None:
        options = {"retry": policy.to_wire()}
    return Step(
        step=1,
        decision=1,
        mode="execute",
        name="Charge",
        queue="billing",
        payload=b"",
        batch=None,
        options=options,
        attempt=attempt,
        first_attempt=first_attempt,
    )


def failed_result(attempt: int = 1, **fields: Any) -> protocol.TaskResult:
    return protocol.TaskResult(
        run_id="run-1",
        step=1,
        attempt=attempt,
        ok=False,
        error={"type": "RuntimeError", "message": "boom", "traceback": ""},
        **fields,
    )


ERROR = {"type": "RuntimeError", "message": "boom", "traceback": ""}
FIVE = Retry(attempts=5, initial=SECOND, backoff=2.0, max_delay=dt.timedelta(minutes=1))


def test_next_delay_follows_policy() -> None:
    delays = [next_delay(task_step(FIVE, attempt=n), ERROR) for n in range(1, 6)]

    assert delays == [SECOND, 2 * SECOND, 4 * SECOND, 8 * SECOND, None]


@pytest.mark.parametrize(
    "options",
    [
        None,
        {},
        {"retry": None},
        {"retry": "3 attempts"},
        {"retry": {"attempts": 5}},
        {"retry": {**FIVE.to_wire(), "initial": math.nan}},
        {"retry": {**FIVE.to_wire(), "attempts": True}},
    ],
)
def test_next_delay_without_valid_policy(
    options: dict[str, Any] | None,
) -> None:
    step = task_step(options=options)

    assert policy_of(step) == NO_RETRY
    assert next_delay(step, ERROR) is None
    assert next_delay(step, ERROR, failed_result(retry_decided=True, retry_delay=1.0)) is None


def test_next_delay_after_manual_retry() -> None:
    two = Retry(attempts=2, initial=SECOND, backoff=3.0)

    # Attempts 1 and 2 failed, then a manual retry began a new series at attempt 3.
    assert next_delay(task_step(two, attempt=3, first_attempt=3), ERROR) == SECOND
    assert next_delay(task_step(two, attempt=4, first_attempt=3), ERROR) is None
    assert next_delay(task_step(FIVE, attempt=7, first_attempt=5), ERROR) == 4 * SECOND


def test_next_delay_huge_attempt() -> None:
    step = task_step(FIVE, attempt=protocol.MAX_COUNTER, first_attempt=1)

    assert next_delay(step, ERROR) is None


def test_next_delay_non_retryable_result() -> None:
    assert next_delay(task_step(FIVE), ERROR, failed_result(non_retryable=True)) is None


@pytest.mark.parametrize(
    ("listed", "reported", "retried"),
    [
        ("KeyError", "KeyError", False),
        ("billing.errors.CardDeclined", "CardDeclined", False),
        ("CardDeclined", "CardDeclined", False),
        ("KeyError", "RuntimeError", True),
        ("LookupError", "KeyError", True),  # bases are the agent's to match
    ],
)
def test_next_delay_listed_error_types(listed: str, reported: str, retried: bool) -> None:
    policy = Retry(attempts=3, non_retryable=(listed,))
    error = {**ERROR, "type": reported}

    delay = next_delay(task_step(policy), error)

    assert (delay is not None) is retried


@pytest.mark.parametrize(
    ("hook_delay", "expected"),
    [
        (5.0, dt.timedelta(seconds=5)),
        (0.0, dt.timedelta(0)),
        (0.001, dt.timedelta(milliseconds=1)),
        (-5.0, dt.timedelta(0)),
        (1e308, MAX_DELAY),
        (float(2**70), MAX_DELAY),
        (None, None),
        (math.nan, SECOND),  # the policy's first delay
    ],
)
def test_next_delay_hook_delay_bounded(
    hook_delay: float | None, expected: dt.timedelta | None
) -> None:
    result = failed_result(retry_decided=True, retry_delay=hook_delay)

    assert next_delay(task_step(FIVE), ERROR, result) == expected


def test_next_delay_hook_after_last_attempt() -> None:
    result = failed_result(attempt=5, retry_decided=True, retry_delay=1.0)

    assert next_delay(task_step(FIVE, attempt=5), ERROR, result) is None


@PROPERTY_SETTINGS
@given(
    hook_delay=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    attempt=st.integers(min_value=1, max_value=protocol.MAX_COUNTER),
)
def test_next_delay_always_bounded(hook_delay: float | None, attempt: int) -> None:
    policy = Retry(attempts=MAX_ATTEMPTS, initial=SECOND, backoff=1.5, max_delay=MAX_DELAY)
    result = failed_result(attempt=attempt, retry_decided=True, retry_delay=hook_delay)

    delay = next_delay(task_step(policy, attempt=attempt), ERROR, result)

    if attempt >= MAX_ATTEMPTS or hook_delay is None:
        assert delay is None
    else:
        assert delay is not None
        assert dt.timedelta(0) <= delay <= MAX_DELAY


def result_body(**fields: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "type": "task_result",
        "run_id": "run-1",
        "step": 1,
        "attempt": 1,
        "ok": False,
        "error": {"type": "RuntimeError", "message": "boom"},
        **fields,
    }


def test_result_null_retry_delay_stops() -> None:
    result = protocol.TaskResult.from_body(result_body(retry_delay=None))

    assert result.retry_decided
    assert next_delay(task_step(FIVE), ERROR, result) is None


@pytest.mark.parametrize("junk", ["x", [5], True])
def test_result_junk_retry_delay_uses_policy(junk: Any) -> None:
    # The protocol allows seconds or null. Anything else is no decision of the hook.
    result = protocol.TaskResult.from_body(result_body(retry_delay=junk))

    assert next_delay(task_step(FIVE), ERROR, result) == SECOND


@pytest.mark.parametrize("junk", ["yes", 1, "true", [True], {"value": True}])
def test_result_non_boolean_non_retryable(junk: Any) -> None:
    result = protocol.TaskResult.from_body(result_body(non_retryable=junk))

    assert not result.non_retryable
    assert next_delay(task_step(FIVE), ERROR, result) == SECOND


def test_lost_attempt_message() -> None:
    step = task_step(FIVE, attempt=2)

    error = lost_attempt(step, {"agent": "host:42", "heartbeat_at": "2030-01-01T00:00:00"})

    assert error["type"] == LEASE_EXPIRED
    assert "attempt 2 of task Charge" in error["message"]
    assert "host:42" in error["message"]
    assert "2030-01-01T00:00:00" in error["message"]
    assert "unknown" in lost_attempt(step, None)["message"]


# agent.attempts: limits, heartbeats and the hook's advice.


def task_message(**fields: Any) -> protocol.TaskMessage:
    values: dict[str, Any] = {
        "run_id": "run-1",
        "workflow": "checkout",
        "step": 3,
        "attempt": 1,
        "task": "Charge",
        "args": (),
        "kwargs": {},
        **fields,
    }
    return protocol.TaskMessage(**values)


def running(message: protocol.TaskMessage, started: float = 100.0) -> RunningAttempt:
    # The delivery is only acknowledged by the agent's service, which these tests leave out.
    return RunningAttempt(message, cast(Any, None), started=started, last_beat=started)


def test_limit_exceeded_timeout() -> None:
    attempt = running(task_message(timeout=2.0))

    assert attempt.limit_exceeded(101.999) is None
    kind, message = attempt.limit_exceeded(102.0) or ("", "")

    assert kind == "TaskTimeout"
    assert "task Charge ran longer than its timeout of 2 s" in message
    assert "attempt 1" in message


def test_limit_exceeded_heartbeat() -> None:
    attempt = running(task_message(heartbeat=0.5))

    assert attempt.limit_exceeded(100.4) is None
    exceeded = attempt.limit_exceeded(100.5)

    assert exceeded is not None
    assert exceeded[0] == "TaskHeartbeatTimeout"
    assert "no heartbeat for 0.5 s" in exceeded[1]
    assert "zenflow.heartbeat()" in exceeded[1]


def test_limit_exceeded_after_beat() -> None:
    attempt = running(task_message(heartbeat=1.0), started=0.0)
    attempt.last_beat = 10.0

    assert attempt.limit_exceeded(10.9) is None
    assert attempt.limit_exceeded(11.0) is not None


def test_limit_exceeded_timeout_first() -> None:
    attempt = running(task_message(timeout=1.0, heartbeat=1.0))

    exceeded = attempt.limit_exceeded(105.0)

    assert exceeded is not None
    assert exceeded[0] == "TaskTimeout"


def test_limit_exceeded_without_limits() -> None:
    assert running(task_message()).limit_exceeded(1e12) is None


def test_next_check_nearest_deadline() -> None:
    attempt = running(task_message(timeout=10.0, heartbeat=4.0))

    assert attempt.next_check(100.0, ack_after=60.0, lease=30.0) == pytest.approx(4.0)
    assert attempt.next_check(100.0, ack_after=2.0, lease=30.0) == pytest.approx(2.0)
    attempt.last_beat = 107.0
    assert attempt.next_check(108.0, ack_after=60.0, lease=30.0) == pytest.approx(2.0)


def test_next_check_after_hand_over() -> None:
    attempt = running(task_message())
    attempt.handed_over = True
    attempt.last_lease = 200.0

    assert attempt.next_check(205.0, ack_after=1.0, lease=30.0) == pytest.approx(5.0)


def test_next_check_past_deadline() -> None:
    attempt = running(task_message(timeout=1.0))

    assert attempt.next_check(500.0, ack_after=1.0, lease=30.0) == pytest.approx(0.01)


def test_beat_keeps_latest_details() -> None:
    attempt = running(task_message(), started=0.0)

    attempt.beat({"row": 10})
    attempt.beat(None)

    assert attempt.details == {"row": 10}
    assert attempt.last_beat > 0.0


def test_beat_after_give_up() -> None:
    attempt = running(task_message(timeout=1.0))
    attempt.give_up("task Charge ran longer than its timeout of 1 s")
    before = attempt.last_beat

    with pytest.raises(AttemptCancelled, match="ran longer than its timeout of 1 s"):
        attempt.beat({"row": 11})

    assert attempt.last_beat == before
    assert attempt.details is None


def test_heartbeat_details_shortened() -> None:
    attempt = running(task_message(attempt=4))
    attempt.beat({"rows": list(range(10_000))})

    beat = attempt.heartbeat("host:1", 30.0)

    assert (beat.run_id, beat.step, beat.attempt, beat.agent, beat.lease) == (
        "run-1",
        3,
        4,
        "host:1",
        30.0,
    )
    assert isinstance(beat.details, str)
    assert len(beat.details) < 1000


def advice(
    hook: Callable[..., Any] | None,
    error: BaseException | None = None,
    message: protocol.TaskMessage | None = None,
) -> dict[str, Any]:
    attempt = running(message or task_message(retry=FIVE.to_wire()))
    return retry_advice(attempt, error or RuntimeError("boom"), hook)


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        (dt.timedelta(seconds=3), {"retry_decided": True, "retry_delay": 3.0}),
        (dt.timedelta(seconds=-3), {"retry_decided": True, "retry_delay": 0.0}),
        (2, {"retry_decided": True, "retry_delay": 2.0}),
        (0.5, {"retry_decided": True, "retry_delay": 0.5}),
        (-1, {"retry_decided": True, "retry_delay": 0.0}),
        (None, {"retry_decided": True, "retry_delay": None}),
    ],
)
def test_retry_advice_hook_decision(returned: Any, expected: dict[str, Any]) -> None:
    assert advice(lambda error, attempt: returned) == expected


@pytest.mark.parametrize("returned", ["soon", True, [1], {"seconds": 1}, object(), b"5"])
def test_retry_advice_junk_from_hook(returned: Any) -> None:
    with capture_logs() as logs:
        assert advice(lambda error, attempt: returned) == {}

    assert [entry["event"] for entry in logs] == ["retry_delay_ignored"]


def test_retry_advice_huge_integer_from_hook() -> None:
    # float(10**400) raises OverflowError, and a value from the hook must not break the result.
    with capture_logs():
        result = advice(lambda error, attempt: 10**400)

    assert result in ({}, {"retry_decided": True, "retry_delay": float(MAX_DELAY.days * 86400)})


@pytest.mark.parametrize(
    "failure", [ValueError("hook bug"), ZeroDivisionError(), RecursionError(), KeyError("k")]
)
def test_retry_advice_hook_raises(failure: Exception) -> None:
    def hook(error: BaseException, attempt: int) -> dt.timedelta:
        raise failure

    with capture_logs() as logs:
        assert advice(hook) == {}

    assert [entry["event"] for entry in logs] == ["retry_delay_failed"]


def test_retry_advice_attempt_in_series() -> None:
    seen: list[tuple[type[BaseException], int]] = []

    def hook(error: BaseException, attempt: int) -> None:
        seen.append((type(error), attempt))

    # Attempt 6 is the second of a series that a manual retry began at attempt 5.
    message = task_message(attempt=6, first_attempt=5, retry=FIVE.to_wire())
    advice(hook, KeyError("k"), message)

    assert seen == [(KeyError, 2)]


@pytest.mark.parametrize(
    "error", [NonRetryableError("declined"), FlaggedError(), KeyError("k"), CardDeclined()]
)
def test_retry_advice_non_retryable_skips_hook(
    error: BaseException,
) -> None:
    policy = Retry(attempts=3, non_retryable=(LookupError, "ValueError"))
    calls: list[int] = []

    def hook(failed: BaseException, attempt: int) -> float:
        calls.append(attempt)
        return 1.0

    result = advice(hook, error, task_message(retry=policy.to_wire()))

    assert result == {"non_retryable": True}
    assert calls == []


def test_retry_advice_without_hook() -> None:
    assert advice(None) == {}
    assert advice(None, message=task_message()) == {}


@pytest.mark.parametrize(
    "hostile_retry",
    [
        {"non_retryable": 5},
        {"non_retryable": "KeyError"},
        {"non_retryable": [None, 1, {"a": 1}]},
        {"non_retryable": {"KeyError": 1}},
        {"attempts": "many"},
    ],
)
def test_retry_advice_hostile_message_policy(
    hostile_retry: dict[str, Any],
) -> None:
    # TaskMessage.from_body accepts any map as the policy, so the agent must not trust it.
    body = {**task_message().to_body(), "retry": hostile_retry}
    message = protocol.TaskMessage.from_body(body)

    result = advice(None, RuntimeError("boom"), message)

    assert result in ({}, {"non_retryable": True})


def test_retry_advice_flag_property_raises() -> None:
    class Odd(Exception):
        @property
        def non_retryable(self) -> bool:
            raise RuntimeError("flag lookup failed")

    assert advice(None, Odd()) in ({}, {"non_retryable": True})
