"""Configuration: env and YAML, and bad settings named clearly with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.plugins import load as load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("RELAY_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return path


def test_defaults_without_any_config() -> None:
    s = load_settings()
    assert s.sinks == []
    assert s.engine.host is None
    assert s.spool.overflow == "dead_letter" and s.spool.fsync is True
    assert s.retry.attempts is None
    assert s.dead_letter_file == Path("/var/lib/docker-event-relay/dead-letter.jsonl")


def test_yaml_file_with_sinks_and_env_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(
        tmp_path,
        """
engine:
  host: unix:///tmp/x.sock
  filters: {type: [container]}
state_dir: /tmp/state
sinks:
  - type: stdout
    name: console
    filter: {types: [volume], actions: [prune], min_reclaimed_bytes: 1073741824}
""",
    )
    monkeypatch.setenv("RELAY_ENGINE__HOST", "tcp://127.0.0.1:2376")
    monkeypatch.setenv("RELAY_LOG__LEVEL", "DEBUG")
    s = load_settings(cfg)
    assert s.engine.host == "tcp://127.0.0.1:2376"
    assert s.engine.filters == {"type": ["container"]}
    assert s.log.level == "DEBUG"
    assert s.state_dir == Path("/tmp/state")
    [sink] = s.sinks
    assert sink.type == "stdout" and sink.sink_name == "console"
    assert sink.filter.min_reclaimed_bytes == 1073741824
    assert sink.filter.actions == frozenset({"prune"})


def test_sinks_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_SINKS", '[{"type": "stdout", "max_batch": 7}]')
    [sink] = load_settings().sinks
    assert sink.max_batch == 7


@pytest.mark.parametrize(
    ("yaml_text", "setting", "words"),
    [
        ("retry: {wait_max: -1}", "retry.wait_max", "greater than 0"),
        ("sinks: [{type: carrier-pigeon}]", "sinks[0]", "carrier-pigeon"),
        ("sinks: [{type: stdout, colour: red}]", "sinks[0].colour", "Extra inputs"),
        (
            "sinks: [{type: stdout, filter: {min_reclaimed_bytes: -5}}]",
            "sinks[0].filter.min_reclaimed_bytes",
            "greater than or equal",
        ),
        ("spool: {overflow: explode}", "spool.overflow", "dead_letter"),
        ("engine: {queue_max: 5}", "engine.queue_max", "1000"),
        ("log: {format: xml}", "log.format", "json"),
        ("sinks: [{type: stdout}, {type: stdout}]", "sinks[1].name", "two sinks"),
        ("- just\n- a list", "--config", "mapping"),
        ("engine: [unclosed", "--config", "not valid YAML"),
        ("nonsense_key: 1", "nonsense_key", "Extra inputs"),
    ],
)
def test_bad_settings_name_the_setting(
    tmp_path: Path, yaml_text: str, setting: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, yaml_text))
    assert info.value.setting == setting or str(info.value).startswith(setting), str(info.value)
    assert words in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config: cannot read .*nope.yaml"):
        load_settings(tmp_path / "nope.yaml")


def test_bad_env_value_names_the_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_RETRY__WAIT_INITIAL", "soon")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.setting == "retry.wait_initial"
    assert "RELAY_RETRY__WAIT_INITIAL" in str(info.value)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=60,
    )


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = run_cli(
        "--config", str(write(tmp_path, "sinks: [{type: stdout, name: out}]")), "check-config"
    )
    assert good.returncode == 0, good.stderr
    assert "configuration OK" in good.stdout and "out (stdout)" in good.stdout
    bad = run_cli("check-config", env={"RELAY_OUTBOX__MAX_EVENTS": "0"})
    assert bad.returncode == 2
    assert "outbox.max_events" in bad.stderr
    assert "RELAY_OUTBOX__MAX_EVENTS" in bad.stderr


def test_run_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    bad = run_cli("--config", str(write(tmp_path, "retry: {attempts: 0}")), "run")
    assert bad.returncode == 2
    assert "retry.attempts" in bad.stderr
    assert bad.stdout == ""


def test_readme_configuration_reference_is_current() -> None:
    from relay.docs import reference

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert reference() in readme, (
        "README.md's configuration reference differs from the settings: replace the block "
        "between its BEGIN/END markers with the output of `python -m relay.docs`"
    )


def test_run_says_clearly_when_its_http_port_is_taken(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "run",
            env={
                "RELAY_HTTP__HOST": "127.0.0.1",
                "RELAY_HTTP__PORT": str(port),
                "RELAY_STATE_DIR": str(tmp_path),
                "RELAY_ENGINE__HOST": f"unix://{tmp_path}/no-engine.sock",
            },
        )
    assert result.returncode == 1
    assert f"http: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_sinks_connect_stops_at_once(tmp_path: Path, signame: str) -> None:
    import json
    import os
    import signal
    import socket
    import time

    from tests.harness import wait_for

    with socket.socket() as nobody:  # a port where nothing listens
        nobody.bind(("127.0.0.1", 0))
        dead_port = nobody.getsockname()[1]
    err = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_HTTP__ENABLED="false",
        RELAY_STATE_DIR=str(tmp_path),
        RELAY_ENGINE__HOST=f"unix://{tmp_path}/no-engine.sock",
        RELAY_STARTUP_TIMEOUT="60",
        RELAY_SINKS=json.dumps([{"type": "mqtt", "host": "127.0.0.1", "port": dead_port}]),
    )
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_for(
            lambda: b"delivery failing" in err.read_bytes(),
            timeout=30,
            message="the sink failing to connect",
        )
        sent = time.monotonic()
        proc.send_signal(getattr(signal, signame))
        assert proc.wait(30) == 0
        # Neither the 60 s start-up wait nor the 10 s drain deadline: nothing was queued.
        assert time.monotonic() - sent < 5, "waited for a timeout"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"held in the spool for the next start" in err.read_bytes()
