"""Templates over event fields (Kafka topics and keys, MQTT topics): `str.format`-style
placeholders, checked once at configuration time and rendered fast.

A topic template must start with fixed text (`require_fixed_start`): an event field is text an
engine user chooses (a network name), and a template that starts with one would let that user
pick any topic, `$SYS/...` or another team's, not only a name under the operator's prefix."""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from typing import Final

from relay.schema import Context, Event

# From `data.context`: "" when the event has none (an MQTT topic level shows "-").
CONTEXT_FIELDS: Final = (
    "compose_project",
    "compose_service",
    "compose_number",
    "k8s_namespace",
    "k8s_pod",
    "k8s_container",
)
_NO_CONTEXT: Final = dict.fromkeys(CONTEXT_FIELDS, "")

EVENT_FIELDS: Final = frozenset(
    {
        "type",
        "action",
        "scope",
        "actor_id",
        "actor_name",
        "engine_id",
        "engine_name",
        "node_name",
        "id",
        "source",
        "subject",
        *CONTEXT_FIELDS,
    }
)


def event_fields(event: Event, fields: frozenset[str] = EVENT_FIELDS) -> dict[str, str]:
    """The template values of one event; absent values (no actor name...) are ""."""
    ce = event.ce
    data = ce.data
    values = {
        "type": data.type,
        "action": data.action,
        "scope": data.scope,
        "actor_id": data.actor.id,
        "actor_name": data.actor.name or "",
        "engine_id": data.engine.id,
        "engine_name": data.engine.name,
        "node_name": data.engine.node_name or "",
        "id": ce.id,
        "source": ce.source,
        "subject": ce.subject or "",
    }
    context = data.context
    if context is not None:
        values.update(_context_fields(context))
    elif fields is EVENT_FIELDS:
        values.update(_NO_CONTEXT)
    # Most events have no context: its fields are "" without being written out first.
    return values if fields is EVENT_FIELDS else {f: values.get(f, "") for f in fields}


def _context_fields(context: Context) -> dict[str, str]:
    values = dict(_NO_CONTEXT)
    compose = context.compose
    if compose is not None:
        values["compose_project"] = compose.project
        values["compose_service"] = compose.service or ""
        if compose.number is not None:
            values["compose_number"] = str(compose.number)
    kubernetes = context.kubernetes
    if kubernetes is not None:
        values["k8s_namespace"] = kubernetes.namespace or ""
        values["k8s_pod"] = kubernetes.pod
        values["k8s_container"] = kubernetes.container or ""
    return values


class Template:
    """Only plain `{field}` placeholders from `allowed`: no attribute access, indexing,
    conversion or format spec, so rendering cannot fail or reach into objects at run time.
    `escape` turns each value into what the destination accepts (an MQTT topic level...);
    `finish` the whole rendered text (a Kafka topic's length...)."""

    __slots__ = ("_escape", "_finish", "_parts", "fields", "source")

    def __init__(
        self,
        source: str,
        *,
        allowed: frozenset[str] = EVENT_FIELDS,
        escape: Callable[[str], str] | None = None,
        finish: Callable[[str], str] | None = None,
    ) -> None:
        self.source = source
        self._escape = escape
        self._finish = finish
        known = ", ".join("{" + f + "}" for f in sorted(allowed))
        try:
            parsed = list(string.Formatter().parse(source))
        except ValueError as exc:
            raise ValueError(f"malformed template {source!r}: {exc}") from exc
        parts: list[tuple[str, str | None]] = []
        for literal, field, spec, conversion in parsed:
            if field is None:
                parts.append((literal, None))
                continue
            if field == "" or field.isdigit():
                raise ValueError(
                    f"template {source!r}: positional placeholder {{{field}}}; name one of {known}"
                )
            if field not in allowed:
                raise ValueError(f"template {source!r}: unknown field {{{field}}}; known: {known}")
            if spec or conversion:
                raise ValueError(
                    f"template {source!r}: {{{field}}} takes no format spec or conversion"
                )
            parts.append((literal, field))
        self._parts = tuple(parts)
        self.fields = frozenset(f for _, f in parts if f is not None)

    @property
    def literal_text(self) -> str:
        """Every fixed part of the template, joined."""
        return "".join(literal for literal, _ in self._parts)

    @property
    def fixed_start(self) -> str:
        """The fixed text before the first placeholder (all of it when there is none)."""
        start: list[str] = []
        for literal, field in self._parts:
            start.append(literal)
            if field is not None:
                break
        return "".join(start)

    @property
    def placeholders(self) -> int:
        """How many placeholders the template has (a field named twice counts twice)."""
        return sum(1 for _, field in self._parts if field is not None)

    def render_values(self, values: Mapping[str, str]) -> str:
        escape = self._escape
        out: list[str] = []
        for literal, field in self._parts:
            out.append(literal)
            if field is not None:
                value = values[field]
                out.append(escape(value) if escape is not None else value)
        text = "".join(out)
        return text if self._finish is None else self._finish(text)

    def render(self, event: Event) -> str:
        return self.render_values(event_fields(event, self.fields))

    def __repr__(self) -> str:
        return f"Template({self.source!r})"


def require_fixed_start(template: Template, setting: str) -> None:
    """ValueError naming `setting` unless `template` has fixed text before its first
    placeholder: no event field alone picks a topic."""
    if template.fields and not template.fixed_start:
        raise ValueError(
            f"{setting}: template {template.source!r} starts with a placeholder; start it "
            "with fixed text (e.g. 'docker/...' or 'docker.'), so that no event field (a "
            "network or container name anyone with engine access chooses) picks the topic"
        )
