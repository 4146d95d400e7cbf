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

from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, TypeAlias

import stamina
import stamina.instrumentation

from relay.errors import RetryableSinkError

if TYPE_CHECKING:
    from relay.settings import RetrySettings

RetryContext: TypeAlias = AsyncIterable[stamina.Attempt]


def quiet_stamina() -> None:
    """Once per process: the relay logs one line per retry burst itself, and counts retries in
    its own metrics; stamina's per-retry log line and its Prometheus counter would repeat them."""
    stamina.instrumentation.set_on_retry_hooks([])


class RetryPolicy:
    def __init__(self, settings: RetrySettings) -> None:
        self.settings = settings

    def _hook(self, exc: Exception) -> bool | float:
        """stamina's `on`: retry only RetryableSinkError; its Retry-After replaces the backoff."""
        if not isinstance(exc, RetryableSinkError):
            return False
        if exc.retry_after is not None:
            return max(0.0, min(exc.retry_after, self.settings.retry_after_max))
        return True

    def _context(
        self, on: type[Exception] | Callable[[Exception], bool | float], bounded: bool
    ) -> RetryContext:
        s = self.settings
        return stamina.retry_context(
            on=on,
            attempts=s.attempts if bounded else None,
            timeout=s.timeout if bounded else None,
            wait_initial=s.wait_initial,
            wait_max=s.wait_max,
            wait_jitter=s.wait_jitter,
        )

    def delivery(self) -> RetryContext:
        """Attempts of one batch: `async for attempt in policy.delivery(): with attempt: ...`."""
        return self._context(self._hook, bounded=True)

    def start(self) -> RetryContext:
        """Attempts to start a sink: retryable failures, forever."""
        return self._context(self._hook, bounded=False)

    def reconnect(self) -> RetryContext:
        """Attempts to open the engine's event stream: any failure, forever."""
        return self._context(Exception, bounded=False)
