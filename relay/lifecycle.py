"""Structured concurrency for the relay's components (anyio's shape, on asyncio's TaskGroup).

Every long-lived task of the relay (HTTP server, sink workers, checkpoint writer, pipeline,
reader) is a component: a coroutine function taking a `TaskStatus`, run by a `Supervisor`
inside the relay's one TaskGroup. A component calls `task_status.started()` once it is ready
(its port bound, its sink connected), and its parent may wait for that before it goes on.

A component that raises is reported as `ComponentError`, carrying its name: the TaskGroup
then cancels every other component, and the relay's teardown (run from `finally`) closes
what they held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from relay.errors import RelayError


class ComponentError(RelayError):
    """A component of the relay failed with an exception it did not expect."""

    def __init__(self, component: str, error: BaseException) -> None:
        super().__init__(f"{component} failed: {type(error).__name__}: {error}")
        self.component = component
        self.error = error


class TaskStatus:
    """Handed to a component: `started()` tells its parent it is ready."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self._future = future

    def started(self) -> None:
        if not self._future.done():
            self._future.set_result(None)


Component = Callable[[TaskStatus], Awaitable[None]]


@dataclass(frozen=True)
class Running:
    """A component the supervisor started: its task, and whether it said it is ready."""

    name: str
    task: asyncio.Task[None]
    ready: asyncio.Future[None]

    async def stop(self) -> None:
        """Cancel it and wait until it has finished (its `finally` blocks included)."""
        self.task.cancel()
        await asyncio.wait([self.task])


class Supervisor:
    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    def spawn(self, name: str, component: Component) -> Running:
        """Run `component` in the group; do not wait for it to be ready."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self._group.create_task(_guarded(name, component, ready), name=name)
        # A component that ends (or fails) before it said so is no longer pending readiness.
        task.add_done_callback(lambda _: ready.cancel())
        return Running(name, task, ready)

    async def start(self, name: str, component: Component) -> Running:
        """Run `component` and wait until it is ready (or has ended)."""
        running = self.spawn(name, component)
        await asyncio.wait([running.ready, running.task], return_when=asyncio.FIRST_COMPLETED)
        return running

    @staticmethod
    async def wait_ready(
        components: Iterable[Running],
        timeout: float,  # noqa: ASYNC109 - a bound on a wait that goes on without it
        cancel_on: asyncio.Event,
    ) -> None:
        """Until every component is ready (or ended), `timeout` passes or `cancel_on` is set."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending: list[asyncio.Future[Any]] = [c.ready for c in components if not c.ready.done()]
        stopping: asyncio.Future[Any] = asyncio.ensure_future(cancel_on.wait())
        try:
            while pending and not stopping.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                await asyncio.wait(
                    [*pending, stopping], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                pending = [f for f in pending if not f.done()]
        finally:
            stopping.cancel()


async def _guarded(name: str, component: Component, ready: asyncio.Future[None]) -> None:
    try:
        await component(TaskStatus(ready))
    except asyncio.CancelledError:
        raise
    except ComponentError:
        raise
    except Exception as exc:
        raise ComponentError(name, exc) from exc
