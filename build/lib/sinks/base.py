"""The sink interface: one attempt per call, failures classified, nothing else.

Retries, dead-lettering, metrics and shutdown live once, in `relay.outbox`. A sink only
connects (`start`), delivers a batch (`send`), closes (`aclose`), and translates its client
library's errors into `RetryableSinkError` / `PermanentSinkError` / `PartialDeliveryError`.
"""

from __future__ import annotations

import abc
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from relay.router import RouteFilter

if TYPE_CHECKING:
    from relay.schema import Event


@dataclass(frozen=True)
class SinkContext:
    """What a sink may know about the relay it runs in."""

    relay_id: str = field(default_factory=socket.gethostname)
    """Stable name of this relay instance: the node name, else the host name."""


class SinkConfigBase(BaseModel):
    """Settings every sink has. Subclasses add `type: Literal[...]` and their own fields."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None, description="Name in logs and metrics; default: the type."
    )
    filter: RouteFilter = Field(
        default_factory=RouteFilter, description="Which events this sink receives."
    )
    max_batch: int = Field(default=100, ge=1, description="Events handed to one send call.")

    @property
    def sink_name(self) -> str:
        return self.name or str(getattr(self, "type", "sink"))

    def build(self, context: SinkContext) -> Sink:
        raise NotImplementedError


class Sink(abc.ABC):
    """One destination. Not retried by itself; see the module docstring."""

    def __init__(self, name: str, max_batch: int = 100) -> None:
        self.name = name
        self.max_batch = max_batch
        self.log = logging.getLogger(f"relay.sink.{name}")

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect. Raise RetryableSinkError when the destination is not there yet."""

    @abc.abstractmethod
    async def send(self, batch: Sequence[Event]) -> None:
        """Deliver `batch` in order; return only once the destination acknowledged all of it."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the connection. Idempotent."""

    def describe(self) -> dict[str, Any]:
        """Non-secret facts for the startup log line."""
        return {}


def read_secret_file(path: Path, setting: str) -> SecretStr:
    """A secret from a file (Kubernetes Secret mounts), without its trailing newline."""
    try:
        return SecretStr(path.read_text().rstrip("\r\n"))
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
