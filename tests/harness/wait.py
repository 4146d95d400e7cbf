"""Polling with a deadline: the only place where the tests may sleep.

Tests synchronise on observable state (a socket answers, a message arrived), never on a fixed
delay; these helpers re-check a predicate every `interval` seconds until it holds or the
deadline passes.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")


def _timeout_message(timeout: float, message: str, predicate: object, value: object) -> str:
    return f"timed out after {timeout:g}s: {message or repr(predicate)} (last value: {value!r})"


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Call `predicate` until it returns a truthy value and return that value.

    Raises AssertionError (so pytest shows it as a test failure, not an error in the harness)
    with `message` and the last value seen if `timeout` seconds pass first. Exceptions raised
    by the predicate propagate: a predicate that expects transient errors catches them itself.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timeout_message(timeout, message, predicate, value))
        time.sleep(interval)


@overload
async def async_wait_for(
    predicate: Callable[[], Awaitable[T]],
    timeout: float,  # noqa: ASYNC109
    interval: float = ...,
    message: str = ...,
) -> T: ...


@overload
async def async_wait_for(
    predicate: Callable[[], T],
    timeout: float,  # noqa: ASYNC109
    interval: float = ...,
    message: str = ...,
) -> T: ...


async def async_wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    # Same signature as wait_for on purpose; the deadline is checked inside the loop.
    timeout: float,  # noqa: ASYNC109
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Async twin of `wait_for`; `predicate` may be a plain or an async callable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        value: T = await result if inspect.isawaitable(result) else result
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(_timeout_message(timeout, message, predicate, value))
        await asyncio.sleep(interval)
