"""`type: webhook`: CloudEvents over HTTP (binary, structured or batch mode), on aiohttp.

Outcomes follow the CloudEvents HTTP webhook spec: 2xx delivered; 429 and 503 retried after
their `Retry-After`; other 5xx, 408, timeouts and connection errors retried with the shared
policy; 410 Gone stops the sink; redirects are not followed (a 3xx is permanent, like every
other 4xx).

In binary and structured mode each event is one request. A batch handed to `send` is split
into one chain per actor; chains run concurrently (up to `concurrency`, default 1: engine
order), events within a chain one after the other, so one actor's events always arrive in
engine order. When an event fails with a
retryable error, the rest of its chain is held back (not sent) and retried with it.

In batch mode one status answers a whole request: a refused batch of several events is a
rejection (the outbox worker then sends them one at a time); refused alone, an event is
permanent.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import re
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator

from relay.sink import (
    Event,
    EventChannel,
    PermanentSinkError,
    RejectedSinkError,
    RetryableSinkError,
    Sink,
    SinkConfigBase,
    SinkContext,
    SinkError,
    SinkStoppedError,
    TlsSettings,
    encode_header_value,
    resolve_secret_files,
)

if TYPE_CHECKING:
    import aiohttp

USER_AGENT = "docker-event-relay/0.1"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json; charset=utf-8"
DEFAULT_SIGNATURE_HEADER = "X-Relay-Signature"
EXCERPT_CHARS = 200
# Read at most this much of a response: enough for an error excerpt, and reading to EOF lets
# aiohttp put the connection back in the pool.
_RESPONSE_READ_MAX = 64 * 1024

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the sink writes itself; an extra header must not silently replace them.
_RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding"})


class WebhookSinkConfig(SinkConfigBase):
    type: Literal["webhook"] = "webhook"
    url: AnyHttpUrl = Field(description="Where to send: http:// or https://.")
    method: Literal["POST", "PUT"] = Field(default="POST", description="HTTP method.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra request headers (names only are ever logged).",
    )
    timeout: float = Field(
        default=10.0, gt=0, description="Seconds per request, connect to last byte."
    )
    mode: Literal["binary", "structured", "batch"] = Field(
        default="binary",
        description="binary: data as body, attributes as ce-* headers; structured: one "
        "application/cloudevents+json event per request; batch: up to max_batch events per "
        "application/cloudevents-batch+json request.",
    )
    max_batch: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Events handed to one send call; in batch mode, the most events in one "
        "request.",
    )
    max_wait: float = Field(
        default=0.0,
        ge=0,
        le=60,
        description="Batch mode: seconds to wait, once an event is queued, for max_batch "
        "events before sending a smaller batch. 0: send what is queued when the sink is free.",
    )
    concurrency: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Requests in flight at once (binary and structured mode). 1 keeps engine "
        "order; above 1 only each actor's events keep their order (they are always sent one "
        "after the other).",
    )
    bearer_token: SecretStr | None = Field(
        default=None, description="Sent as `Authorization: Bearer <token>`."
    )
    bearer_token_file: Path | None = Field(default=None, description="File holding bearer_token.")
    secret: SecretStr | None = Field(
        default=None,
        description="Shared secret for HMAC-SHA256 request signing (see signature_header).",
    )
    secret_file: Path | None = Field(default=None, description="File holding secret.")
    signature_header: str = Field(
        default=DEFAULT_SIGNATURE_HEADER,
        description="Header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256 of "
        "'<t>.' + body>` when secret is set.",
    )
    tls: TlsSettings | None = Field(
        default=None, description="TLS of https:// URLs: CA and client certificate (mTLS)."
    )

    @field_validator("url")
    @classmethod
    def _no_fragment(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        if url.fragment:
            raise ValueError("a webhook URL has no #fragment")
        return url

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _TOKEN.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            lower = name.lower()
            if lower in _RESERVED_HEADERS or lower.startswith("ce-"):
                raise ValueError(f"{name!r} is set by the sink itself")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"{name!r}: a header value cannot hold CR, LF or NUL")
        return headers

    @field_validator("signature_header")
    @classmethod
    def _valid_signature_header(cls, name: str) -> str:
        if not _TOKEN.match(name) or name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{name!r} is not a usable header name")
        return name

    @model_validator(mode="after")
    def _resolve(self) -> WebhookSinkConfig:
        resolve_secret_files(self, ("bearer_token", "bearer_token_file"), ("secret", "secret_file"))
        if self.secret is not None and not self.secret.get_secret_value():
            raise ValueError("secret: empty")
        lower = {name.lower() for name in self.headers}
        if self.bearer_token is not None:
            token = self.bearer_token.get_secret_value()
            if not token:
                raise ValueError("bearer_token: empty")
            if not all("\x21" <= ch <= "\x7e" for ch in token):
                raise ValueError(
                    "bearer_token: only visible ASCII characters can go in a header (it holds "
                    "a space, CR, LF or another control or non-ASCII character)"
                )
            if "authorization" in lower:
                raise ValueError("headers: 'Authorization' conflicts with bearer_token")
        if self.url.username is not None or self.url.password is not None:
            # aiohttp sends user info as Basic credentials: two Authorization headers.
            if self.bearer_token is not None:
                raise ValueError(
                    "url: holds user:password (Basic auth) and bearer_token is set; use one"
                )
            if "authorization" in lower:
                raise ValueError("url: holds user:password and headers sets 'Authorization'")
        if self.secret is not None and self.signature_header.lower() in lower:
            raise ValueError(f"headers: {self.signature_header!r} is the signature header")
        if self.tls is not None and self.url.scheme != "https":
            raise ValueError("tls: set, but url is not https://")
        return self

    def build(self, context: SinkContext) -> Sink:
        return WebhookSink(self.sink_name, self)

    @classmethod
    def event_channel(cls) -> EventChannel:
        fields = cls.model_fields
        signature = {
            "type": "string",
            "description": "With `secret` set: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "
            "'<t>.' + body>`; the header's name is `signature_header`.",
        }
        return EventChannel(
            title="Webhook sink",
            protocol="http",
            server={
                "host": "{host}",
                "pathname": "{path}",
                "protocol": "http",
                "description": "The receiver at the sink's `url` (https for an https:// URL, "
                "with `tls` for its CA and a client certificate).",
                "variables": {
                    "host": {"description": "host[:port] of `url`."},
                    "path": {"description": "The path (and query) of `url`."},
                },
            },
            address=None,
            description="Each request goes to the sink's `url`; a 2xx answer acknowledges it. "
            "`Authorization: Bearer` with `bearer_token`, and any `headers`, go with it.",
            modes=("binary", "structured", "batch"),
            default_mode=fields["mode"].default,
            mode_setting="mode",
            attribute_header="ce-{name}",
            attribute_escape="the CloudEvents HTTP binding's percent-encoding (everything "
            'outside printable ASCII, and space, `"`, `%`)',
            content_type_header="Content-Type",
            structured_content_type=STRUCTURED_CONTENT_TYPE,
            batch_content_type=BATCH_CONTENT_TYPE,
            extra_headers={fields["signature_header"].default: signature},
            operation_bindings={
                "http": {"method": fields["method"].default, "bindingVersion": "0.3.0"}
            },
        )


# -- pure helpers (unit-tested) ------------------------------------------------------------


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The signature header value: `t=<unix>,v1=<hex HMAC-SHA256(secret, b"<t>." + body)>`."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def binary_headers(event: Event) -> dict[str, str]:
    # Percent-encoded as the CloudEvents HTTP binding says (relay.names): the subject can be
    # any name, control characters and all.
    headers = {f"ce-{k}": encode_header_value(v) for k, v in event.attributes().items()}
    headers["Content-Type"] = event.ce.datacontenttype
    return headers


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP-date); None if absent
    or unreadable (the shared backoff applies then)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive result means it said so oddly
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def excerpt(body: bytes, limit: int = EXCERPT_CHARS) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def classify(
    status: int,
    reason: str,
    where: str,
    body: bytes,
    retry_after: str | None,
    location: str | None,
    sink: str,
) -> SinkError | None:
    """The outcome of one answered request: None when delivered, else the error to raise."""
    if 200 <= status < 300:
        return None
    said = f"{where} answered {status} {reason}".rstrip()
    text = excerpt(body)
    detail = f"{said}: {text}" if text else said
    if status == 410:
        return SinkStoppedError(
            f"{said}: the receiver is gone and asked us to stop; the sink stays stopped until "
            "the relay restarts",
            sink=sink,
        )
    if status in (429, 503):
        return RetryableSinkError(detail, sink=sink, retry_after=parse_retry_after(retry_after))
    if status >= 500 or status == 408:
        return RetryableSinkError(detail, sink=sink)
    if 300 <= status < 400:
        to = f" to {redact_url(location)}" if location else ""
        return PermanentSinkError(
            f"{said}: redirect{to} not followed (a webhook must answer at its URL)", sink=sink
        )
    return PermanentSinkError(detail, sink=sink)


def redact_url(url: str) -> str:
    """scheme://host[:port]/path: no user info, no query (both may carry credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else parts.path


def ordering_key(event: Event) -> tuple[str, str]:
    """Events with the same key keep their order. Prune events have no actor: per type."""
    data = event.ce.data
    return (data.type, data.actor.id)


def chains(batch: Sequence[Event]) -> list[list[int]]:
    """Batch indexes grouped per actor, each chain in batch order, chains by first appearance."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, event in enumerate(batch):
        groups.setdefault(ordering_key(event), []).append(index)
    return list(groups.values())


# -- the sink --------------------------------------------------------------------------------


class WebhookSink(Sink):
    def __init__(self, name: str, config: WebhookSinkConfig) -> None:
        super().__init__(
            name, config.max_batch, linger=config.max_wait if config.mode == "batch" else 0.0
        )
        self.config = config
        self._url = str(config.url)
        self._where = f"{config.method} {redact_url(self._url)}"
        self._secret = config.secret.get_secret_value().encode() if config.secret else None
        self._session: aiohttp.ClientSession | None = None
        self._gone: str | None = None
        self._static_headers: dict[str, str] = {"User-Agent": USER_AGENT, **config.headers}
        if config.bearer_token is not None:
            self._static_headers["Authorization"] = (
                f"Bearer {config.bearer_token.get_secret_value()}"
            )

    async def start(self) -> None:
        import aiohttp

        ssl_arg: ssl.SSLContext | bool = True
        if self.config.tls is not None:
            ssl_arg = self.config.tls.sink_ssl_context(self.name)
        connector = aiohttp.TCPConnector(limit=self.config.concurrency, ssl=ssl_arg)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            auto_decompress=False,
            # Proxies from the environment would be a silent surprise for a relay.
            trust_env=False,
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(self, batch: Sequence[Event]) -> None:
        session = self._session
        assert session is not None, "the lifecycle guard admits a send only once started"
        if self._gone is not None:
            raise SinkStoppedError(self._gone, sink=self.name)
        if not batch:
            return
        if self.config.mode == "batch":
            body = b"[" + b",".join([event.json() for event in batch]) + b"]"
            try:
                await self._post(session, body, {"Content-Type": BATCH_CONTENT_TYPE})
            except SinkStoppedError:
                raise
            except PermanentSinkError as exc:
                if len(batch) == 1:
                    raise
                # One status answers the whole request: the outbox worker sends the events
                # one at a time to find which the receiver refuses.
                raise RejectedSinkError(
                    f"{exc} (a batch of {len(batch)} events, sent alone next)", sink=self.name
                ) from exc
            return
        await self._send_chains(session, batch)

    async def _send_chains(self, session: aiohttp.ClientSession, batch: Sequence[Event]) -> None:
        failures: dict[int, SinkError] = {}
        limit = asyncio.Semaphore(self.config.concurrency)

        async def run_chain(indexes: list[int]) -> None:
            async with limit:
                for pos, index in enumerate(indexes):
                    if self._gone is not None:
                        for rest in indexes[pos:]:
                            failures[rest] = SinkStoppedError(self._gone, sink=self.name)
                        return
                    try:
                        await self._post_event(session, batch[index])
                    except SinkStoppedError as exc:
                        self._gone = str(exc.args[0])
                        failures[index] = exc
                    except RetryableSinkError as exc:
                        failures[index] = exc
                        held = RetryableSinkError(
                            f"held back behind event {batch[index].id}: {exc}",
                            sink=self.name,
                            retry_after=exc.retry_after,
                        )
                        for rest in indexes[pos + 1 :]:
                            failures[rest] = held
                        return
                    except SinkError as exc:
                        failures[index] = exc

        # One request at a time means engine order across actors too: one chain of everything.
        groups = [list(range(len(batch)))] if self.config.concurrency == 1 else chains(batch)
        if len(groups) == 1:
            await run_chain(groups[0])
        else:
            async with asyncio.TaskGroup() as tg:
                for group in groups:
                    tg.create_task(run_chain(group))
        self.fail(failures, len(batch))

    async def _post_event(self, session: aiohttp.ClientSession, event: Event) -> None:
        if self.config.mode == "binary":
            await self._post(session, event.data_json(), binary_headers(event))
        else:
            await self._post(session, event.json(), {"Content-Type": STRUCTURED_CONTENT_TYPE})

    async def _post(
        self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str]
    ) -> None:
        import aiohttp

        all_headers = {**self._static_headers, **headers}
        if self._secret is not None:
            all_headers[self.config.signature_header] = sign(self._secret, body, int(time.time()))
        try:
            async with session.request(
                self.config.method,
                self._url,
                data=body,
                headers=all_headers,
                allow_redirects=False,
            ) as resp:
                content = await _read_limited(resp)
                error = classify(
                    resp.status,
                    resp.reason or "",
                    self._where,
                    content,
                    resp.headers.get("Retry-After"),
                    resp.headers.get("Location"),
                    self.name,
                )
        except TimeoutError as exc:
            raise RetryableSinkError(
                f"{self._where}: no answer within {self.config.timeout:g}s", sink=self.name
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise RetryableSinkError(f"{self._where}: TLS failed: {exc}", sink=self.name) from exc
        except aiohttp.ClientError as exc:
            raise RetryableSinkError(
                f"{self._where}: {type(exc).__name__}: {exc}", sink=self.name
            ) from exc
        if error is not None:
            raise error


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < _RESPONSE_READ_MAX:
        chunk = await resp.content.read(_RESPONSE_READ_MAX - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
