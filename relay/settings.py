"""Configuration: environment (`RELAY_` prefix, `__` for nesting) and an optional YAML file.

Precedence, highest first: environment, YAML file, defaults. Sinks are a list discriminated on
`type`; with no sink configured the relay writes to stdout.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from relay.errors import ConfigError
from relay.identity import ENGINE_ID_PATTERN
from relay.normalize import ExecCommandMode
from relay.redact import most_kept
from relay.schema import DEFAULT_TYPE_PREFIX
from relay.sink import SinkConfigBase

# The YAML file's content for the settings source below; pydantic-settings builds sources
# per class, so the path cannot be passed per call otherwise. Set and reset around one load.
_yaml_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "yaml", default=None
)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_host(value: str) -> bool:
    """An IP address, or a host name (RFC 1123 labels)."""
    try:
        ipaddress.ip_address(value.strip("[]"))
        return True
    except ValueError:
        pass
    name = value.removesuffix(".")
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(p) for p in name.split("."))


def engine_address_problem(address: str) -> str | None:
    """Why `address` is not an engine address the relay can use; None when it is."""
    parts = urlsplit(address)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        if not parts.path.startswith("/") or parts.netloc:
            return f"{address!r}: a unix socket address is unix:///absolute/path"
        return None
    if scheme in ("tcp", "http", "https"):
        try:
            port = parts.port
        except ValueError:
            return f"{address!r}: the port is not a number from 1 to 65535"
        if not parts.hostname or not is_host(parts.hostname):
            return f"{address!r}: no valid host name or IP address"
        if scheme == "tcp" and port is None:
            return f"{address!r}: tcp:// needs a port (2375, or 2376 with TLS)"
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            return f"{address!r}: an engine address has no path, query or fragment"
        return None
    return (
        f"{address!r}: use unix:///path/to/docker.sock or tcp://host:port "
        "(ssh:// and npipe:// are not supported)"
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineSettings(_Section):
    host: str | None = Field(
        default=None,
        description="Engine address (unix://, tcp://). Default: DOCKER_HOST, else the local "
        "socket. TLS follows DOCKER_TLS_VERIFY and DOCKER_CERT_PATH.",
    )
    filters: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Engine-side filters, the keys of `docker events --filter` "
        "(type, event, label, container, image...).",
    )
    resume_margin: float = Field(
        default=1.0,
        ge=0,
        description="On resume, ask the engine to replay from this many seconds before the "
        "last event handled (its stream is only roughly time-ordered); replays are dropped by "
        "event id.",
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="Connect timeout (s).")
    id: str | None = Field(
        default=None,
        pattern=ENGINE_ID_PATTERN,
        description="Pin the engine's identity (the `source` of its events, part of every "
        "event id, the key of the stored position) instead of the engine's /info ID, or for "
        "Podman the id derived from its host name and storage root. 1 to 128 of A-Z a-z 0-9 "
        "._:- (no leading punctuation). Changing it makes the relay read from now.",
    )

    @field_validator("id", mode="before")
    @classmethod
    def _unset_id(cls, value: object) -> object:
        # RELAY_ENGINE__ID= (empty) means unset, as for the other optional settings.
        return None if value == "" else value

    @field_validator("host")
    @classmethod
    def _engine_address(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        problem = engine_address_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    queue_max: int = Field(
        default=200_000,
        ge=1000,
        description="Raw lines buffered between the reader and the normalizer; beyond, the "
        "newest lines are dropped (counted in relay_reader_lines_dropped_total).",
    )
    max_line_bytes: int = Field(
        default=1024 * 1024,
        ge=64 * 1024,
        description="Longest line (one engine event) read; a longer line is dropped as it "
        "arrives, its first KiB dead-lettered as malformed and counted in "
        "relay_engine_lines_oversized_total.",
    )


class RetrySettings(_Section):
    """One policy for engine reconnects, sink starts and deliveries: exponential backoff with
    jitter (stamina)."""

    attempts: int | None = Field(
        default=None, ge=1, description="Attempts per batch before dead-lettering; empty: forever."
    )
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds per batch before dead-lettering; empty: forever."
    )
    wait_initial: float = Field(
        default=0.5,
        gt=0,
        description="Wait after the first failed attempt (s); doubles after each.",
    )
    wait_max: float = Field(default=30.0, gt=0, description="Longest wait between attempts (s).")
    wait_jitter: float = Field(
        default=1.0, ge=0, description="Up to this many seconds, at random, added to each wait."
    )
    retry_after_max: float = Field(
        default=300.0, gt=0, description="Longest Retry-After a destination may impose (s)."
    )


class OutboxSettings(_Section):
    max_events: int = Field(
        default=2_000,
        ge=1,
        description="Events a sink holds in memory; the rest of its backlog waits in the spool "
        "on disk and is read back in order.",
    )


class SpoolSettings(_Section):
    """The durable spool, STATE_DIR/spool.db: what each sink still owes survives any crash."""

    max_bytes: int = Field(
        default=256 * 1024**2,
        ge=1024,
        description="Bytes of events one sink may hold (memory and disk); beyond, `overflow`.",
    )
    max_total_bytes: int = Field(
        default=1024**3,
        ge=1024,
        description="Bytes of events all sinks together may hold; beyond, `overflow`.",
    )
    overflow: Literal["dead_letter", "drop_oldest", "drop_newest"] = Field(
        default="dead_letter",
        description="When a sink's spool is full: write the newest event to the dead-letter "
        "file (nothing lost), or drop the oldest or newest (counted in a metric).",
    )
    durable: bool = Field(
        default=True,
        description="Keep the spool on disk. false: in memory only (nothing survives a restart, "
        "each start is a first start); for measuring what the disk costs, not for production.",
    )
    fsync: bool = Field(
        default=True,
        description="fsync every commit (SQLite synchronous=FULL): a power loss or kernel "
        "crash loses nothing committed. false (NORMAL): faster commits; a power loss may lose "
        "the last commits, a process crash still loses nothing.",
    )
    commit_interval: float = Field(
        default=0.05,
        gt=0,
        le=5,
        description="Seconds between group commits (sooner when commit_max_events are waiting).",
    )
    commit_max_events: int = Field(
        default=500, ge=1, description="Events that start a commit before the interval is up."
    )


class SchemaSettings(_Section):
    type_prefix: str = Field(
        default=DEFAULT_TYPE_PREFIX, min_length=1, description="Reverse-DNS prefix of `type`."
    )
    exec_command: ExecCommandMode = Field(
        default="program",
        description="What of an exec_create/exec_start command line a sink receives in "
        "action_detail, unless its redact.exec_command says otherwise: full, program (the "
        "first word; arguments can carry secrets) or none.",
    )


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR."
    )
    format: Literal["json", "console"] = Field(
        default="json", description="json lines, or a readable console format."
    )


class HttpSettings(_Section):
    enabled: bool = Field(default=True, description="Serve /metrics, /healthz and /readyz.")
    host: str = Field(default="0.0.0.0", description="Address of the HTTP port.")
    port: int = Field(default=9477, ge=0, le=65535, description="The HTTP port (0: any free).")

    @field_validator("host")
    @classmethod
    def _bind_address(cls, value: str) -> str:
        if not is_host(value):
            raise ValueError(
                f"{value!r} is not an IP address or host name (0.0.0.0: every IPv4 interface, "
                ":: every interface)"
            )
        return value


ContextMetric = Literal["compose_project", "k8s_namespace"]


class MetricsSettings(_Section):
    context: frozenset[ContextMetric] = Field(
        default=frozenset(),
        description="Count events per Compose project (compose_project: "
        "relay_compose_events_total) and per Kubernetes namespace (k8s_namespace: "
        "relay_kubernetes_events_total). Off by default: the values are labels that whoever "
        "creates a container chooses, and each one is a set of series.",
    )
    context_max_values: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Projects (and namespaces) counted by name; events of any further one, or "
        "of a name longer than 253 characters, are counted under _other (no Compose project or "
        "namespace can be called that).",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RELAY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    engine: EngineSettings = Field(default_factory=EngineSettings)
    # The composition root (relay.plugins) narrows this to the union of the installed sink
    # types, discriminated on `type`.
    sinks: list[SinkConfigBase] = Field(default_factory=list)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    schema_: SchemaSettings = Field(default_factory=SchemaSettings, alias="schema")
    log: LogSettings = Field(default_factory=LogSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    state_dir: Path = Field(
        default=Path("/var/lib/docker-event-relay"),
        description="Where the spool lives (spool.db: the events each sink still owes, and "
        "the position in the engine's stream), and the dead-letter file.",
    )
    dead_letter_path: Path | None = Field(
        default=None,
        description="JSON-lines file for events that cannot be delivered. "
        "Default: STATE_DIR/dead-letter.jsonl.",
    )
    node_name: str | None = Field(
        default=None,
        description="Kubernetes node name (downward API), carried in every event.",
    )
    drain_timeout: float = Field(
        default=10.0, ge=0, description="On SIGTERM, seconds to finish deliveries."
    )
    startup_timeout: float = Field(
        default=10.0, ge=0, description="Seconds to wait for sinks before reading anyway."
    )

    def check(self) -> None:
        """Cross-setting rules that pydantic cannot place on one field."""
        seen: set[str] = set()
        for index, sink in enumerate(self.sinks):
            name = sink.sink_name
            if name in seen:
                raise ConfigError(
                    f"sinks[{index}].name", f"two sinks are called {name!r}; give each a name"
                )
            seen.add(name)
        if self.engine.host is None and os.environ.get("DOCKER_HOST"):
            problem = engine_address_problem(os.environ["DOCKER_HOST"])
            if problem is not None:
                raise ConfigError("engine.host", f"from DOCKER_HOST: {problem}")

    def check_paths(self) -> None:
        """The state directory (and the dead-letter file's) can be used: an existing writable
        directory, or one the relay can create. Checked by `run` and `check-config` alike."""
        needs_state = self.spool.durable or self.dead_letter_path is None
        if needs_state:
            _writable_dir(self.state_dir, "state_dir")
        if self.dead_letter_path is not None:
            if self.dead_letter_path.is_dir():
                raise ConfigError(
                    "dead_letter_path", f"{self.dead_letter_path} is a directory, not a file"
                )
            _writable_dir(self.dead_letter_path.parent, "dead_letter_path")

    def kept_exec_command(self) -> ExecCommandMode:
        """What the normalizer keeps of an exec command line: the most any sink receives
        (each sink's redact.exec_command, else schema.exec_command), so that the spool holds
        no more than some sink needs."""
        default = self.schema_.exec_command
        return most_kept([s.redact.exec_command or default for s in self.sinks] or [default])

    @property
    def dead_letter_file(self) -> Path:
        return self.dead_letter_path or self.state_dir / "dead-letter.jsonl"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


def _writable_dir(path: Path, setting: str) -> None:
    """`path` is a directory the relay may write in, or the nearest existing ancestor is
    (the relay creates the rest)."""
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(setting, f"{probe} is a dangling symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is not a directory" if probe == path else f"cannot be created: {probe} is a file"
        raise ConfigError(setting, f"{path} {what}")
    where = "" if probe == path else f" (it would be created in {probe})"
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(setting, f"{path} is not writable by this user{where}")
    try:
        # Permission bits do not tell everything (root, a read-only mount): try for real.
        with tempfile.TemporaryFile(dir=probe, prefix=".relay-check-"):
            pass
    except OSError as exc:
        raise ConfigError(setting, f"{path} is not writable: {exc.strerror}{where}") from exc


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_yaml_data.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get() or {})


def _setting_name(loc: tuple[int | str, ...]) -> str:
    # Sink entries carry the discriminator in the location (sinks, 0, kafka, topic): drop it.
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif i >= 2 and loc[0] == "sinks" and isinstance(loc[i - 1], int):
            continue
        else:
            parts.append(("." if parts else "") + ("schema" if part == "schema_" else str(part)))
    return "".join(parts) or "config"


def _env_name(setting: str) -> str:
    head = setting.split("[", 1)[0].split(".")
    return "RELAY_" + "__".join(p.upper() for p in head)


def _takes_json(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the setting at `path` is a mapping, list or section (given as JSON in the
    environment), as opposed to a scalar."""
    annotation: Any = model
    for part in path:
        fields = getattr(annotation, "model_fields", None)
        if fields is None:
            return False
        field = fields.get(part) or fields.get(part + "_")
        if field is None:
            return False
        annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    # dict[...], list[...], and optional or aliased forms of them.
    text = str(annotation)
    return any(kind in text for kind in ("dict[", "list[", "Dict[", "List["))


def _env_parse_error(exc: SettingsError, model: type[Settings]) -> ConfigError:
    """pydantic-settings says only which top-level field failed to parse: find the variable."""
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match[1] if match else ""
    prefix = f"RELAY_{field}".upper()
    for name in sorted(os.environ):
        upper = name.upper()
        if upper != prefix and not upper.startswith(prefix + "__"):
            continue
        if not _takes_json(model, upper.removeprefix("RELAY_").lower().split("__")):
            continue
        try:
            json.loads(os.environ[name])
        except ValueError as err:
            setting = ".".join(p.lower() for p in upper.removeprefix("RELAY_").split("__"))
            setting = (
                "schema" + setting[len("schema_") :] if setting.startswith("schema_") else setting
            )
            return ConfigError(
                setting, f"{name} is not valid JSON ({err}); complex settings take JSON there"
            )
    cause = exc.__cause__ or exc
    return ConfigError(field or "environment", f"cannot parse: {cause} [env {prefix}]")


def load_settings(config_file: Path | None = None, model: type[Settings] = Settings) -> Settings:
    """Read and validate the configuration; raise ConfigError naming the first bad setting.
    `model` is the Settings class with the installed sinks (`relay.plugins.settings_model()`)."""
    data: dict[str, Any] = {}
    if config_file is not None:
        import yaml  # only when a file is given

        try:
            loaded = yaml.safe_load(config_file.read_text())
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {config_file}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"{config_file} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("--config", f"{config_file} must hold a mapping of settings")
        data = loaded
    token = _yaml_data.set(data)
    try:
        settings = model()
    except SettingsError as exc:
        raise _env_parse_error(exc, model) from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        setting = _setting_name(tuple(err["loc"]))
        msg = err["msg"]
        if err["type"] == "value_error" and msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        where = f" [env {_env_name(setting)}]"
        raise ConfigError(setting, f"{msg}{more}{where}") from exc
    finally:
        _yaml_data.reset(token)
    settings.check()
    return settings
