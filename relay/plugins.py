"""The composition root: finds the sink adapters and wires them into the core.

A sink type is an entry point in the group `docker_event_relay.sinks`, named after the sink's
`type` and pointing at its config class (a `relay.sink.SinkConfigBase`); the project's own
sinks register there like any third-party package:

    [project.entry-points."docker_event_relay.sinks"]
    kafka = "sinks.kafka:KafkaSinkConfig"

From the installed types this module builds the settings model (the `sinks` list as a union
discriminated on `type`) and, from validated settings, the sinks. It is the only place that
knows adapters exist; nothing else in `relay/` imports one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import socket
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field, create_model

from relay.errors import ConfigError
from relay.router import RouteFilter
from relay.settings import Settings, load_settings
from relay.sink import EventChannel, Sink, SinkConfigBase, SinkContext

ENTRY_POINT_GROUP = "docker_event_relay.sinks"
DISTRIBUTION = "docker-event-relay"
DEFAULT_SINK = "stdout"


@functools.cache
def sink_types() -> dict[str, type[SinkConfigBase]]:
    """Every installed sink type, by its `type` name. ConfigError when a plugin is broken: a
    relay that silently lacked a destination would drop what was meant for it."""
    found: dict[str, type[SinkConfigBase]] = {}
    origin: dict[str, str] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"sink plugin {entry.name!r} ({entry.value})"
        try:
            config = entry.load()
        except Exception as exc:
            raise ConfigError(where, f"cannot be loaded: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(config, type) and issubclass(config, SinkConfigBase)):
            raise ConfigError(where, "does not name a relay.sink.SinkConfigBase subclass")
        field = config.model_fields.get("type")
        declared = None if field is None else field.default
        if declared != entry.name:
            raise ConfigError(
                where, f"its config's `type` default is {declared!r}, not {entry.name!r}"
            )
        if entry.name in found and origin[entry.name] != entry.value:
            raise ConfigError(where, f"type {entry.name!r} is also {origin[entry.name]}")
        found[entry.name] = config
        origin[entry.name] = entry.value
    if DEFAULT_SINK not in found:
        raise ConfigError(
            ENTRY_POINT_GROUP,
            f"no {DEFAULT_SINK!r} sink is installed (is the docker-event-relay package installed?)",
        )
    return dict(sorted(found.items()))


def bundled_sink_types() -> dict[str, type[SinkConfigBase]]:
    """The sink types this distribution ships (the README documents these; plugins document
    their own)."""
    mine = {
        entry.name
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if entry.dist is not None and entry.dist.name == DISTRIBUTION
    }
    return {name: config for name, config in sink_types().items() if name in mine}


def event_channels() -> dict[str, EventChannel]:
    """The channels of the bundled sink types that publish to one, by type: what the AsyncAPI
    document describes (`relay.asyncapi`). Plugins are left out, so the committed document
    does not depend on what else is installed."""
    channels: dict[str, EventChannel] = {}
    for name, config in bundled_sink_types().items():
        channel = config.event_channel()
        if channel is not None:
            channels[name] = channel
    return channels


def sink_config_union() -> Any:
    """The type of one `sinks` entry: the installed config classes, discriminated on `type`."""
    configs = tuple(sink_types().values())
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007 - built at run time


@functools.cache
def settings_model() -> type[Settings]:
    """`Settings` whose `sinks` accepts exactly the installed sink types."""
    sink_list = typing.cast(Any, list[sink_config_union()])  # type: ignore[misc]
    model: type[Settings] = create_model(
        "Settings",
        __base__=Settings,
        sinks=(
            sink_list,
            Field(default_factory=list, description="The destinations (default: stdout)."),
        ),
    )
    return model


def load(config_file: Path | None = None) -> Settings:
    """The settings from the environment and `config_file`, with the installed sink types."""
    return load_settings(config_file, settings_model())


def build_sinks(settings: Settings) -> list[tuple[Sink, RouteFilter]]:
    """The configured sinks (stdout when none is), each with its route filter."""
    context = SinkContext(relay_id=settings.node_name or socket.gethostname())
    configs: Sequence[SinkConfigBase] = settings.sinks or [sink_types()[DEFAULT_SINK]()]
    default_exec, kept_exec = settings.schema_.exec_command, settings.kept_exec_command()
    built: list[tuple[Sink, RouteFilter]] = []
    for config in configs:
        sink = config.build(context)
        sink.redaction = config.redact.compile(default_exec, kept_exec)
        sink.flap = config.flap
        sink.reconcile = config.reconcile
        built.append((sink, config.filter))
    return built
