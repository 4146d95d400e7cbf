"""Per-sink routing: which events each sink wants."""

from __future__ import annotations

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
