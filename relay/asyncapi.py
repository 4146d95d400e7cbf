"""The AsyncAPI 3.0 document of the relay's channels (`docker-event-relay asyncapi`), generated
from the code like the JSON Schema; `schemas/asyncapi.yaml` is its committed copy, and a test
fails when the two differ.

Each sink type that publishes to a channel describes its protocol (`SinkConfigBase.
event_channel()`, handed over by the composition root): its default destination, how its
binding carries a CloudEvent. What is the core's is added here: the CloudEvents messages of
each content mode, the template fields as channel parameters, and the v1 event schema.

The v1 schema is embedded (`components.schemas`, the definitions of `relay.schema.json_schema()`
with their references rewritten), not referenced as `event-v1.schema.json`: the document is
then one file that every AsyncAPI tool reads as it is, with no file or URL to resolve, and
whose schemas are read as AsyncAPI Schema (draft-07 based) rather than as the 2020-12 dialect
that file declares; the definitions use only keywords both share. Both come from the same
structs, so they cannot tell different stories.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any, Final

import msgspec
import yaml

from relay.schema import DATASCHEMA, DEFAULT_TYPE_PREFIX, CloudEvent, EventData, json_schema
from relay.sink import EventChannel
from relay.template import EVENT_FIELDS, Template

ASYNCAPI_VERSION: Final = "3.0.0"
HEADER: Final = (
    "# The AsyncAPI document of docker-event-relay, generated from the code:\n"
    "#   docker-event-relay asyncapi > schemas/asyncapi.yaml\n"
    "# Do not edit: a test fails when it differs from what the code generates.\n"
)

# Where each template field's value comes from, as a path into the structured event; "" when
# the value is absent (a test checks these against relay.template.event_fields).
FIELD_PATHS: Final[Mapping[str, tuple[str, ...]]] = {
    "type": ("data", "type"),
    "action": ("data", "action"),
    "scope": ("data", "scope"),
    "actor_id": ("data", "actor", "id"),
    "actor_name": ("data", "actor", "name"),
    "engine_id": ("data", "engine", "id"),
    "engine_name": ("data", "engine", "name"),
    "node_name": ("data", "engine", "node_name"),
    "id": ("id",),
    "source": ("source",),
    "subject": ("subject",),
    "compose_project": ("data", "context", "compose", "project"),
    "compose_service": ("data", "context", "compose", "service"),
    "compose_number": ("data", "context", "compose", "number"),
    "k8s_namespace": ("data", "context", "kubernetes", "namespace"),
    "k8s_pod": ("data", "context", "kubernetes", "pod"),
    "k8s_container": ("data", "context", "kubernetes", "container"),
}
_FIELD_NOTES: Final[Mapping[str, str]] = {
    "type": "The engine's object type: container, image, volume, network, plugin, daemon, "
    "service, node, secret, config, builder; relay for the relay's own events.",
    "action": "The engine's action without its detail: create, start, die, health_status, prune...",
    "scope": "local or swarm.",
    "actor_id": "The object's id; empty for prunes.",
    "actor_name": "The object's name; empty when it has none.",
    "engine_id": "The engine's id from its /info.",
    "engine_name": "The engine's name from its /info.",
    "node_name": "The node name the relay was given (RELAY_NODE_NAME); empty when none.",
    "id": "The event id (deterministic: consumers dedupe on it).",
    "source": "urn:docker:engine:<engine id>.",
    "subject": "The actor's name, else its id; empty for prunes.",
    "compose_project": "The Compose project; empty when the object has none.",
    "compose_service": "The Compose service; empty when none.",
    "compose_number": "The Compose container number, in decimal; empty when none.",
    "k8s_namespace": "The Kubernetes namespace of the pod; empty when none.",
    "k8s_pod": "The Kubernetes pod; empty when the object is in none.",
    "k8s_container": "The container's name in its Kubernetes pod; empty when none.",
}

# Context attributes a binary binding carries as headers: every attribute but the data and its
# content type (the content type has its own header or protocol field).
ATTRIBUTES: Final = tuple(
    name for name in CloudEvent.__struct_fields__ if name not in ("data", "datacontenttype")
)
# The component names msgspec gives the event's and its data's schemas.
_EVENT: Final = CloudEvent.__name__
_DATA: Final = EventData.__name__


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _rewrite_refs(node: Any) -> Any:
    """The JSON Schema's `#/$defs/X` references as `#/components/schemas/X`."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = "#/components/schemas/" + value.removeprefix("#/$defs/")
            else:
                out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def event_schemas() -> dict[str, Any]:
    """The v1 event schema's definitions, as AsyncAPI components."""
    schema = json_schema()
    defs = _rewrite_refs(schema["$defs"])
    top = schema["$ref"].removeprefix("#/$defs/")
    defs[top] = {
        **defs[top],
        "description": defs[top].get("description", "")
        + f" Schema version 1 ({DATASCHEMA}): the same as schemas/event-v1.schema.json.",
    }
    return dict(sorted(defs.items()))


def _non_null(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A property schema without its `null` branch: an absent attribute has no header."""
    branches = schema.get("anyOf")
    if branches is None:
        return dict(schema)
    kept = [b for b in branches if b != {"type": "null"}]
    return dict(kept[0]) if len(kept) == 1 else {"anyOf": kept}


def _parameters() -> dict[str, Any]:
    # A field added to the templates but not yet described here still gets its parameter (a
    # test asks for the description).
    return {
        field: {
            "description": f"`{'.'.join(FIELD_PATHS[field])}`: {_FIELD_NOTES[field]}"
            if field in FIELD_PATHS and field in _FIELD_NOTES
            else f"The template field {{{field}}}."
        }
        for field in sorted(EVENT_FIELDS)
    }


def _address_fields(address: str) -> list[str]:
    """The template's fields in the order they appear (each once)."""
    Template(address)  # a ValueError for an unknown field, as at configuration time
    seen: list[str] = []
    for _, field, _, _ in string.Formatter().parse(address):
        if field is not None and field not in seen:
            seen.append(field)
    return seen


def _headers(
    channel: EventChannel, mode: str, content_type: str, schemas: Mapping[str, Any]
) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    if mode == "binary":
        event = schemas[_EVENT]
        for name in ATTRIBUTES:
            header = channel.attribute_header.format(name=name)
            properties[header] = {
                **_non_null(event["properties"][name]),
                "description": f"The CloudEvents `{name}` attribute; {channel.attribute_escape}.",
            }
            if name in event["required"]:
                required.append(header)
    if channel.content_type_header is not None:
        properties[channel.content_type_header] = {"const": content_type}
        required.append(channel.content_type_header)
    properties.update({name: dict(schema) for name, schema in channel.extra_headers.items()})
    headers: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        headers["required"] = required
    return headers


def _message(
    sink: str, channel: EventChannel, mode: str, schemas: Mapping[str, Any]
) -> dict[str, Any]:
    data_type = schemas[_EVENT]["properties"]["datacontenttype"]["enum"][0]
    if mode == "binary":
        content_type = data_type
        payload: dict[str, Any] = _ref("schemas", _DATA)
        summary = (
            f"The event's `data` as the payload, each context attribute in its own header "
            f"(`{channel.attribute_header}`)."
        )
    elif mode == "structured":
        content_type = channel.structured_content_type
        payload = _ref("schemas", _EVENT)
        summary = "The whole CloudEvent as the payload."
    elif mode == "batch" and channel.batch_content_type is not None:
        content_type = channel.batch_content_type
        payload = {"type": "array", "items": _ref("schemas", _EVENT)}
        summary = "Up to max_batch whole CloudEvents, in engine order, as a JSON array."
    else:
        raise ValueError(f"sink type {sink!r}: no message for content mode {mode!r}")
    message: dict[str, Any] = {
        "name": f"{sink}-{mode}",
        "title": f"v1 event, {mode} mode ({channel.title})",
        "summary": summary,
        "contentType": content_type,
    }
    headers = _headers(channel, mode, content_type, schemas)
    if headers["properties"]:
        message["headers"] = headers
    message["payload"] = payload
    bindings = channel.message_bindings.get(mode)
    if bindings:
        message["bindings"] = dict(bindings)
    return message


def document(channels: Mapping[str, EventChannel]) -> dict[str, Any]:
    """The AsyncAPI document of `channels` (sink type -> its channel)."""
    schemas = event_schemas()
    servers: dict[str, Any] = {}
    doc_channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for sink, channel in channels.items():
        servers[sink] = dict(channel.server)
        modes = (
            f"Content mode: `{channel.mode_setting}` ({', '.join(channel.modes)}; default "
            f"{channel.default_mode}); each sink sends in one mode."
        )
        entry: dict[str, Any] = {
            "address": channel.address,
            "title": channel.title,
            "description": f"{channel.description}\n{modes}\n",
            "servers": [{"$ref": f"#/servers/{sink}"}],
        }
        if channel.address is not None:
            fields = _address_fields(channel.address)
            if fields:
                entry["parameters"] = {field: _ref("parameters", field) for field in fields}
        entry["messages"] = {}
        for mode in channel.modes:
            name = f"{sink}-{mode}"
            messages[name] = _message(sink, channel, mode, schemas)
            entry["messages"][mode] = _ref("messages", name)
        if channel.channel_bindings:
            entry["bindings"] = dict(channel.channel_bindings)
        doc_channels[sink] = entry
        operation: dict[str, Any] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{sink}"},
            "title": f"Relay events to the {channel.title}",
            "summary": "Every event the sink's filter lets through, once its destination "
            "acknowledged it (at least once; consumers dedupe on `id`).",
            "messages": [{"$ref": f"#/channels/{sink}/messages/{mode}"} for mode in channel.modes],
        }
        if channel.operation_bindings:
            operation["bindings"] = dict(channel.operation_bindings)
        operations[f"send-{sink}"] = operation
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "docker-event-relay",
            "version": DATASCHEMA.rsplit(":v", 1)[1],
            "description": _INFO,
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": servers,
        "channels": doc_channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "parameters": _parameters(),
            "messages": messages,
        },
    }


_INFO: Final = f"""\
Docker Engine events as CloudEvents 1.0, relayed to Kafka, MQTT and webhooks.
Every event has `dataschema` {DATASCHEMA} and `type`
`<schema.type_prefix>.<engine type>.<action>` (default prefix {DEFAULT_TYPE_PREFIX}); its
`data` is the normalized engine event (the EventData schema). Within version 1 changes are
additive only.

A binary-mode message carries `data` as its payload and each context attribute in a header;
a structured-mode message carries the whole event. Each channel's address is the default of
its sink's topic setting, its parameters the template fields that default uses; every field a
template may use is a component parameter.
"""


class _Dumper(yaml.SafeDumper):
    """Block style; a text of several lines as a literal block; no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render(doc: Mapping[str, Any]) -> str:
    """The document as YAML, with the header that says it is generated."""
    # A round trip through JSON: only plain data reaches the YAML emitter.
    plain = msgspec.json.decode(msgspec.json.encode(doc))
    body = yaml.dump(plain, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return HEADER + body
