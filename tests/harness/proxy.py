"""A slow network in front of a real destination: a loopback TCP proxy that holds every chunk
for a fixed delay, in both directions.

It adds latency, not a bandwidth limit: chunks are stamped when they arrive and each is passed
on once its delay is over, so a burst keeps flowing while the first chunk is still held. Order
is kept per direction, and an end of stream (half-close) is delayed like data.

The proxy runs its own event loop in a thread: the test's loop may block (a synchronous wait, a
broker restart) without stalling the traffic through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

from .brokers import HOST, free_port
from .process import Service

_CHUNK = 64 * 1024


class DelayProxy(Service):
    """Accepts on `port` (a free one by default, fixed at construction so that a broker can
    advertise it before the proxy starts) and connects each client to `target_port`."""

    def __init__(self, target_port: int, delay: float, port: int | None = None) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = port if port is not None else free_port()
        self.connections = 0
        """Client connections accepted so far."""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return f"DelayProxy({HOST}:{self.port} -> {self.target_port}, delay={self.delay:g}s)"

    @property
    def log_path(self) -> Path:
        raise NotImplementedError("the proxy keeps no log")

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        """Listen, and return once the port accepts connections."""
        if self._thread is not None:
            return
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name=repr(self), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError(f"{self!r} did not start listening within 10s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"{self!r} could not listen") from self._error

    def stop(self) -> None:
        """Close the listener and every proxied connection, then end the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(stopping.set)
        thread.join(10)

    # -- the proxy's own thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(), which waits for `_ready`
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        connections: set[asyncio.Task[None]] = set()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.ensure_future(self._connection(reader, writer))
            connections.add(task)
            task.add_done_callback(connections.discard)

        server = await asyncio.start_server(accepted, HOST, self.port, reuse_address=True)
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

    async def _connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            # Nothing listens behind the proxy: the client sees its connection closed, as it
            # would see a refused one through a real middlebox.
            client_writer.close()
            return
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(client_reader, upstream_writer))
                group.create_task(self._pipe(upstream_reader, client_writer))
        except* (ConnectionError, OSError):
            pass
        finally:
            for writer in (client_writer, upstream_writer):
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def receive() -> None:
            while chunk := await reader.read(_CHUNK):
                held.put_nowait((loop.time() + self.delay, chunk))
            held.put_nowait((loop.time() + self.delay, b""))

        async def deliver() -> None:
            while True:
                due, chunk = await held.get()
                # The latency this proxy exists to add, not a synchronisation.
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        async with asyncio.TaskGroup() as group:
            group.create_task(receive())
            group.create_task(deliver())
