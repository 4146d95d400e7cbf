"""A real webhook receiver for the tests: an aiohttp server on a loopback port, in-process.

It records every request (method, path, headers, body, arrival time) and answers 204 unless
told otherwise: `receiver.fail(500, times=2)`, `receiver.fail(429, headers={"Retry-After":
"1"})`, `receiver.fail(410)`, `receiver.slow(2.0)`, `receiver.drop_connection(times=1)`.
Scripted answers apply in order to the next requests; `times=None` means always.
`receiver.refuse(event_id)` answers 400 to every request carrying that event, whatever the
script. `restart()` stops it and listens again on the same port.

With `secret` set it verifies each request's HMAC signature the way the README tells receivers
to (`verify_signature`, standard library only) and answers 401 to a bad one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from .wait import async_wait_for


class SignatureError(Exception):
    """The signature header is missing, malformed, wrong, or too old."""


def verify_signature(
    secret: bytes,
    header: str | None,
    body: bytes,
    tolerance: float = 300.0,
    now: float | None = None,
) -> int:
    """Check `t=<unix>,v1=<hex>`: returns the timestamp, raises SignatureError otherwise.

    The same code as the README's receiver snippet: HMAC-SHA256 over b"<t>." + raw body,
    compared in constant time; a timestamp off by more than `tolerance` seconds is a replay.
    """
    if not header:
        raise SignatureError("no signature header")
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        raise SignatureError("no timestamp") from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise SignatureError("timestamp outside the tolerance (replay?)")
    expected = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, sig) for sig in fields.get("v1", [])):
        raise SignatureError("signature mismatch")
    return timestamp


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    arrived: float  # time.monotonic()
    status: int = 0  # what the receiver answered (0: connection dropped)
    signature_error: str | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip()

    def events(self) -> list[dict[str, Any]]:
        """The CloudEvents in this request, in structured form, whatever the mode."""
        ctype = self.content_type
        if ctype == "application/cloudevents-batch+json":
            events: list[dict[str, Any]] = json.loads(self.body)
            return events
        if ctype == "application/cloudevents+json":
            return [json.loads(self.body)]
        # Binary mode: attributes from ce-* headers (percent-decoded), data from the body.
        event: dict[str, Any] = {
            name[3:]: unquote(value)
            for name, value in self.headers.items()
            if name.startswith("ce-")
        }
        event["datacontenttype"] = ctype
        event["data"] = json.loads(self.body)
        return [event]


@dataclass
class _Script:
    status: int = 204
    # A callable value is computed when the answer is sent (an HTTP date relative to then).
    headers: dict[str, str | Callable[[], str]] = field(default_factory=dict)
    body: str = ""
    delay: float = 0.0
    gate: asyncio.Event | None = None
    drop: bool = False
    times: int | None = None  # None: always


class Receiver:
    def __init__(
        self,
        *,
        secret: bytes | None = None,
        tolerance: float = 300.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.secret = secret
        self.tolerance = tolerance
        self.ssl_context = ssl_context
        self.requests: list[Recorded] = []
        self._scripts: list[_Script] = []
        self._refused: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.in_flight = 0
        self.max_in_flight = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> Receiver:
        """Listen: on a free port the first time, on the same one after a stop."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Short shutdown: a slow handler must not hold the test's teardown.
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def restart(self) -> None:
        """Stop (open connections are cut) and listen again on the same port."""
        await self.aclose()
        await self.start()

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def url(self, path: str = "/hook") -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    # -- scripting -------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        *,
        times: int | None = None,
        headers: dict[str, str | Callable[[], str]] | None = None,
        body: str = "",
    ) -> None:
        self._scripts.append(_Script(status=status, headers=headers or {}, body=body, times=times))

    def hold(self, gate: asyncio.Event, *, times: int | None = None) -> None:
        """Answer only once `gate` is set: a destination as slow as the test wants."""
        self._scripts.append(_Script(gate=gate, times=times))

    def slow(self, delay: float, *, times: int | None = None) -> None:
        self._scripts.append(_Script(delay=delay, times=times))

    def drop_connection(self, *, times: int | None = None) -> None:
        self._scripts.append(_Script(drop=True, times=times))

    def refuse(self, event_id: str, status: int = 400) -> None:
        """Answer `status` to any request that carries the event `event_id`."""
        self._refused[event_id] = status

    def reset(self) -> None:
        self._scripts.clear()
        self._refused.clear()

    def _next_script(self) -> _Script:
        while self._scripts:
            script = self._scripts[0]
            if script.times is None:
                return script
            if script.times > 0:
                script.times -= 1
                if script.times == 0:
                    self._scripts.pop(0)
                return script
            self._scripts.pop(0)
        return _Script()

    # -- the handler -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec = Recorded(
            method=request.method,
            path=request.path_qs,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            arrived=time.monotonic(),
        )
        self.requests.append(rec)
        script = self._next_script()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if script.drop:
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=204)
            if self.secret is not None:
                try:
                    verify_signature(
                        self.secret,
                        request.headers.get("X-Relay-Signature"),
                        body,
                        self.tolerance,
                    )
                except SignatureError as exc:
                    rec.signature_error = str(exc)
                    rec.status = 401
                    return web.Response(status=401, text=f"bad signature: {exc}")
            refusal = self._refusal(rec)
            if refusal is not None:
                rec.status = refusal[0]
                return web.Response(status=refusal[0], text=f"event {refusal[1]} refused")
            if script.delay:
                await asyncio.sleep(script.delay)  # the behaviour under test, not a sync
            if script.gate is not None:
                await script.gate.wait()
            rec.status = script.status
            headers = {k: v() if callable(v) else v for k, v in script.headers.items()}
            return web.Response(status=script.status, headers=headers, text=script.body)
        finally:
            self.in_flight -= 1

    def _refusal(self, rec: Recorded) -> tuple[int, str] | None:
        if not self._refused:
            return None
        try:
            carried = [str(event.get("id")) for event in rec.events()]
        except ValueError:  # not CloudEvents JSON: nothing of ours to refuse
            return None
        for event_id in carried:
            if event_id in self._refused:
                return self._refused[event_id], event_id
        return None

    # -- reading back ----------------------------------------------------------------------

    def delivered(self) -> list[Recorded]:
        return [r for r in self.requests if 200 <= r.status < 300]

    def events(self) -> list[dict[str, Any]]:
        """Events of every request answered 2xx, in arrival order."""
        return [e for r in self.delivered() for e in r.events()]

    async def wait_for_events(
        self,
        count: int,
        # The deadline of the wait, as in harness.wait; checked there.
        timeout: float = 30.0,  # noqa: ASYNC109
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            got = [e for e in self.events() if where is None or where(e)]
            return got if len(got) >= count else None

        result = await async_wait_for(enough, timeout, message=f"{count} event(s) at the receiver")
        assert result is not None
        return result

    async def wait_for_requests(
        self,
        count: int,
        timeout: float = 30.0,  # noqa: ASYNC109 - a deadline, as in harness.wait
    ) -> list[Recorded]:
        await async_wait_for(
            lambda: len(self.requests) >= count,
            timeout,
            message=f"{count} request(s) at the receiver",
        )
        return list(self.requests)
