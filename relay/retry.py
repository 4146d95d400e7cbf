"""The one retry policy every sink shares: exponential backoff with full jitter, on stamina.

Only `RetryableSinkError` is retried; its `retry_after` (HTTP 429/503) replaces the backoff,
capped by `retry_after_max`. `CancelledError` is never retried (stamina guarantees it).
Tests keep waits short through the settings (wait_initial, wait_max, retry_after_max).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from relay.errors import RetryableSinkError

if TYPE_CHECKING:
    # stamina (and tenacity under it) is imported on the first retry: a relay whose sinks
    # never fail does not carry it.
    import stamina

    from relay.settings import RetrySettings


def full_jitter(attempt: int, initial: float, cap: float) -> float:
    """AWS-style full jitter: uniform in [0, min(cap, initial * 2**(attempt-1))]."""
    return random.uniform(0.0, min(cap, initial * 2.0 ** max(attempt - 1, 0)))


class RetryPolicy:
    def __init__(self, settings: RetrySettings) -> None:
        self.settings = settings

    def retries_after(self, done: int) -> bool:
        """Whether the policy allows another attempt after `done` attempts."""
        return self.settings.attempts is None or self.settings.attempts > done

    def backoff(self, attempt: int) -> float:
        return full_jitter(attempt, self.settings.wait_initial, self.settings.wait_max)

    def wait_for(self, exc: RetryableSinkError, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt`: the destination's
        Retry-After (capped), else the backoff."""
        if exc.retry_after is not None:
            return max(0.0, min(exc.retry_after, self.settings.retry_after_max))
        return self.backoff(attempt)

    def attempts(self, done: int = 0) -> stamina._core._RetryContextIterator:
        """A fresh retry context (one per batch): `async for attempt in ...: with attempt: ...`.

        `done` attempts were already made outside it (the outbox's first, fast attempt, after
        which the caller waits `wait_for(...)`): they count against `attempts` and the backoff
        continues from there.
        """
        import stamina
        import stamina.instrumentation

        # The outbox logs one line per retry burst; stamina's per-retry log lines and its
        # Prometheus counter would repeat it.
        stamina.instrumentation.set_on_retry_hooks([])
        count = done
        s = self.settings
        attempts = None if s.attempts is None else max(1, s.attempts - done)

        def decide(exc: Exception) -> bool | float:
            nonlocal count
            if not isinstance(exc, RetryableSinkError):
                return False
            count += 1
            return self.wait_for(exc, count)

        return stamina.retry_context(
            on=decide,
            attempts=attempts,
            timeout=s.timeout,
            wait_initial=s.wait_initial,
            wait_max=s.wait_max,
            wait_jitter=0.0,
        )
