"""Configuration: environment (`RELAY_` prefix, `__` for nesting) and an optional YAML file.

Precedence, highest first: environment, YAML file, defaults. Sinks are a list discriminated on
`type`; with no sink configured the relay writes to stdout.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from relay.errors import ConfigError
from relay.normalize import ExecCommandMode
from relay.schema import DEFAULT_TYPE_PREFIX
from relay.sink import SinkConfigBase

# The YAML file's content for the settings source below; pydantic-settings builds sources
# per class, so the path cannot be passed per call otherwise. Set and reset around one load.
_yaml_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "yaml", default=None
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
    queue_max: int = Field(
        default=200_000,
        ge=1000,
        description="Raw lines buffered between the reader and the normalizer.",
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
        description="What of an exec_create/exec_start command line to keep in action_detail: "
        "full, program (the first word; arguments can carry secrets) or none.",
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
