"""Per-sink routing: which events each sink wants (`RouteFilter`), and the table that hands
each event to the targets whose filter it passes (`RouteTable`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from relay.schema import Context, Event


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
    compose_projects: frozenset[str] = Field(
        default=frozenset(),
        description="Compose projects to keep (data.context.compose.project); events without "
        "one are dropped.",
    )
    exclude_compose_projects: frozenset[str] = Field(
        default=frozenset(), description="Compose projects to drop."
    )
    k8s_namespaces: frozenset[str] = Field(
        default=frozenset(),
        description="Kubernetes namespaces to keep (data.context.kubernetes.namespace); events "
        "without one are dropped.",
    )
    exclude_k8s_namespaces: frozenset[str] = Field(
        default=frozenset(), description="Kubernetes namespaces to drop."
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
        if (
            self.compose_projects
            or self.exclude_compose_projects
            or self.k8s_namespaces
            or self.exclude_k8s_namespaces
        ):
            return self._context_matches(data.context)
        return True

    def _context_matches(self, context: Context | None) -> bool:
        compose = None if context is None else context.compose
        project = None if compose is None else compose.project
        if self.compose_projects and project not in self.compose_projects:
            return False
        if project is not None and project in self.exclude_compose_projects:
            return False
        kubernetes = None if context is None else context.kubernetes
        namespace = None if kubernetes is None else kubernetes.namespace
        if self.k8s_namespaces and namespace not in self.k8s_namespaces:
            return False
        return namespace is None or namespace not in self.exclude_k8s_namespaces

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
