"""Per-sink routing: which events each sink wants (`RouteFilter`), and the table that hands
each event to the targets whose filter it passes (`RouteTable`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from relay.schema import Event


class RouteFilter(BaseModel):
    """Which events a sink receives. Empty lists mean "all"; every given condition must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    types: frozenset[str] = Field(
        default=frozenset(), description="Engine types to keep (container, image, volume...)."
    )
    actions: frozenset[str] = Field(
        default=frozenset(), description="Base actions to keep (start, die, prune, exec_start...)."
    )
    exclude_types: frozenset[str] = Field(default=frozenset(), description="Types to drop.")
    exclude_actions: frozenset[str] = Field(default=frozenset(), description="Actions to drop.")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description='Labels the actor must carry; the value "*" only asks that the label exists.',
    )
    min_reclaimed_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Only events with reclaimed_bytes (prune events) at or above this.",
    )

    def matches(self, event: Event) -> bool:
        data = event.ce.data
        if self.types and data.type not in self.types:
            return False
        if self.actions and data.action not in self.actions:
            return False
        if data.type in self.exclude_types or data.action in self.exclude_actions:
            return False
        if self.min_reclaimed_bytes is not None and (
            data.reclaimed_bytes is None or data.reclaimed_bytes < self.min_reclaimed_bytes
        ):
            return False
        if self.labels:
            labels = data.actor.labels
            for key, want in self.labels.items():
                have = labels.get(key)
                if have is None or (want != "*" and have != want):
                    return False
        return True

    @property
    def is_catch_all(self) -> bool:
        return self == _CATCH_ALL


_CATCH_ALL = RouteFilter()


class Target(Protocol):
    """Where routed events go: a sink's worker, and its bit in the spool."""

    bit: int

    def put(self, event: Event) -> None: ...


class RouteTable:
    def __init__(self, routes: Sequence[tuple[Target, RouteFilter]]) -> None:
        # A catch-all filter is not evaluated at all: most sinks take every event.
        self._routes = [(t, None if f.is_catch_all else f) for t, f in routes]

    def targets(self, event: Event) -> list[Target]:
        return [t for t, f in self._routes if f is None or f.matches(event)]
