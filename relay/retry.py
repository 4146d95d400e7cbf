"""The one retry policy, on stamina: engine reconnects, sink starts and deliveries all wait the
same way, configured once (`retry.*`).

The wait after attempt n is stamina's exponential backoff with jitter,
`min(wait_max, wait_initial * 2**(n-1) + uniform(0, wait_jitter))`, except where a destination
said how long to wait (HTTP 429/503 `Retry-After`): that wait, capped by `retry_after_max`,
replaces the backoff through stamina's backoff hook. `CancelledError` is never retried.

Deliveries are bounded by `retry.attempts` / `retry.timeout` (then dead-lettered); engine
reconnects and sink starts are never given up: the events wait in the outbox meanwhile.

Tests turn waiting off with `stamina.set_testing(True, attempts=...)`, not with shortened
settings.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import stamina
import stamina.instrumentation

from relay.errors import RetryableSinkError

if TYPE_CHECKING:
    from relay.settings import RetrySettings


def quiet_stamina() -> None:
    """Once per process: the relay logs one line per retry burst itself, and counts retries in
    its own metrics; stamina's per-retry log line and its Prometheus counter would repeat them."""
    stamina.instrumentation.set_on_retry_hooks([])


class RetryPolicy:
    """stamina's retrying callers, configured once from `retry.*` and used for every retry."""

    def __init__(self, settings: RetrySettings) -> None:
        self.settings = settings
        s = settings
        waits = {
            "wait_initial": s.wait_initial,
            "wait_max": s.wait_max,
            "wait_jitter": s.wait_jitter,
        }
        bounded = stamina.AsyncRetryingCaller(attempts=s.attempts, timeout=s.timeout, **waits)
        forever = stamina.AsyncRetryingCaller(attempts=None, timeout=None, **waits)
        self._delivery = bounded.on(self._hook)
        self._start = forever.on(self._hook)
        self._reconnect = forever.on(Exception)

    def _hook(self, exc: Exception) -> bool | float:
        """stamina's `on`: retry only RetryableSinkError; its Retry-After replaces the backoff."""
        if not isinstance(exc, RetryableSinkError):
            return False
        if exc.retry_after is not None:
            return max(0.0, min(exc.retry_after, self.settings.retry_after_max))
        return True

    async def deliver(self, attempt: Callable[[], Awaitable[None]]) -> None:
        """Attempts of one batch, until one succeeds or `retry.attempts`/`retry.timeout` run
        out (the last error is raised) or an error is not retryable (raised at once).

        The first attempt runs outside stamina: setting up its retry context costs about 55 µs,
        paid per batch, while almost every batch succeeds at once (at 500 events/s, one event
        per batch, three sinks: 8 % of a core). A first attempt that fails is handed to stamina
        as its own first attempt (raised again at once), so the waits, the attempt count and
        the Retry-After hook are stamina's exactly; only `retry.timeout` starts after the first
        attempt instead of before it."""
        try:
            await attempt()
            return
        except Exception as exc:
            if self._hook(exc) is False:
                raise
            failed: Exception | None = exc

        async def again() -> None:
            nonlocal failed
            if failed is not None:
                first, failed = failed, None
                raise first
            await attempt()

        await self._delivery(again)

    async def start(self, attempt: Callable[[], Awaitable[None]]) -> None:
        """Attempts to start a sink: retryable failures, forever."""
        await self._start(attempt)

    async def reconnect(self, attempt: Callable[[], Awaitable[None]]) -> None:
        """Attempts to open the engine's event stream: any failure, forever."""
        await self._reconnect(attempt)
