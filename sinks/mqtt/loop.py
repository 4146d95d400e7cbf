"""paho-mqtt driven by the asyncio event loop, instead of by paho's own network thread.

paho does the MQTT protocol; this adapter gives it the loop's socket readiness: a reader on the
socket calls `loop_read`, a writer (registered only while paho has bytes queued that `flush`
could not write at once) `loop_write`, and a timer `loop_misc` (keepalive pings and their
timeout). Only the blocking connect (DNS,
TCP, the TLS handshake) runs in a thread.

Two socket options matter for a relay that waits for the PUBACKs of each batch:
- TCP_NODELAY: Nagle would hold a batch's last small PUBLISH packets until the broker's
  delayed ACK, ~40 ms per batch;
- TCP_QUICKACK after every read: the broker may run with Nagle on (Mosquitto's default), so its
  later PUBACKs of a batch wait for our ACK of the first, which Linux delays up to 40 ms. Quick
  ACK mode ends after each read, so it is set again after each (measured: aiomqtt, which cannot
  do this, reached 0.25 of this adapter's throughput; bench/bench_mqtt_aiomqtt.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

# Seconds between keepalive bookkeeping ticks (paho's loop_misc).
_MISC_TICK = 1.0

_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class LoopAdapter:
    """Attaches one paho client, for its whole life, to the running event loop."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        # A timer on the event loop, not a task: nothing of it outlives `detach()`.
        self._misc_timer: asyncio.TimerHandle | None = None
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    async def connect(self) -> None:
        """Open a new connection (paho's `reconnect`: the address and options were given to
        `connect_async`); its socket is watched from the loop as soon as it exists. Raises
        OSError / ssl.SSLError as the connect does; the CONNACK arrives through paho's
        on_connect."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        await asyncio.to_thread(self.client.reconnect)

    def connected(self) -> None:
        """The CONNACK accepted the connection: keepalive from now on."""
        assert self._loop is not None
        self.stop_keepalive()
        self._misc_timer = self._loop.call_later(_MISC_TICK, self._misc_tick)

    def detach(self) -> None:
        """Stop watching the socket and stop the keepalive ticks."""
        self.stop_keepalive()
        sock = self.client.socket()
        if sock is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
                self._loop.remove_writer(sock.fileno())

    def abandon(self) -> None:
        """Drop a connection attempt that did not end connected."""
        self.detach()
        with contextlib.suppress(Exception):
            # paho closes the socket at the next reconnect; close it now so no late CONNACK
            # or reader callback lands on an abandoned attempt.
            sock = self.client.socket()
            if sock is not None:
                sock.close()

    # -- keepalive -------------------------------------------------------------------------------

    def _misc_tick(self) -> None:
        import paho.mqtt.client as mqtt

        if self.client.loop_misc() == mqtt.MQTT_ERR_SUCCESS and self._loop is not None:
            self._misc_timer = self._loop.call_later(_MISC_TICK, self._misc_tick)
        else:
            self._misc_timer = None

    def stop_keepalive(self) -> None:
        """The connection is gone: no more keepalive ticks until the next `connected()`."""
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None

    # -- paho's socket callbacks (on the loop's thread, or on the connect's thread) -------------

    def _call_in_loop(self, func: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            func(*args)
        else:
            loop.call_soon_threadsafe(func, *args)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._call_in_loop(self._add_reader, sock)

    def _add_reader(self, sock: Any) -> None:
        assert self._loop is not None
        current = self.client.socket()
        # A socket of an attempt that was abandoned meanwhile is not ours to watch.
        if current is not None and current is sock:
            self._loop.add_reader(current.fileno(), self._readable)

    def _readable(self) -> None:
        client = self.client
        client.loop_read()
        _quickack(client.socket())
        # An SSL socket can hold decrypted bytes the selector does not see.
        sock = client.socket()
        while sock is not None and isinstance(sock, ssl.SSLSocket) and sock.pending():
            client.loop_read()
            sock = client.socket()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        fileno = sock.fileno()
        if fileno < 0:
            return
        if threading.get_ident() == self._loop_thread:
            loop.remove_reader(fileno)
            loop.remove_writer(fileno)
        else:
            loop.call_soon_threadsafe(loop.remove_reader, fileno)
            loop.call_soon_threadsafe(loop.remove_writer, fileno)

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._want_writer, sock)

    def _want_writer(self, sock: Any) -> None:
        # paho asks for a writer for every packet it queues. The sink writes a batch's packets
        # itself right after queueing them (`flush`), which nearly always empties paho's queue:
        # the writer is added only if bytes are still waiting when this runs, which saves two
        # epoll_ctl calls and a pass of the loop per batch.
        assert self._loop is not None
        self._loop.call_soon(self._add_writer_if_needed, sock)

    def _add_writer_if_needed(self, sock: Any) -> None:
        if self.client.want_write():
            self._add_writer(sock)

    def flush(self) -> None:
        """Write what paho has queued now, on the loop's thread; what the socket does not take
        at once is written when it becomes writable."""
        client = self.client
        if client.want_write():
            client.loop_write()

    def _add_writer(self, sock: Any) -> None:
        assert self._loop is not None
        current = self.client.socket()
        if current is not None and current is sock:
            self._loop.add_writer(current.fileno(), self.client.loop_write)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        def remove() -> None:
            assert self._loop is not None
            with contextlib.suppress(Exception):
                self._loop.remove_writer(sock.fileno())

        self._call_in_loop(remove)


def _quickack(sock: Any) -> None:
    if sock is not None and _TCP_QUICKACK is not None:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
