"""Misconfiguration is exit 2 naming the setting, at `check-config` as at `run`: JSON that does not
parse in a complex variable, contradictions no retry can mend, unusable paths and addresses.
A secret file anyone can read is accepted, with a warning."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import cli


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("RELAY_") or key == "DOCKER_HOST":
            monkeypatch.delenv(key)
    monkeypatch.setenv("RELAY_STATE_DIR", str(tmp_path / "state"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def check(capsys: pytest.CaptureFixture[str], *args: str, **env: str) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        code = cli.main([*args] if args else ["check-config"])
    out = capsys.readouterr()
    return code, out.out, out.err


def webhook(**fields: object) -> str:
    return json.dumps([{"type": "webhook", "url": "http://receiver.example/hook", **fields}])


def secret(tmp_path: Path, text: str, mode: int = 0o400) -> Path:
    path = tmp_path / f"secret-{len(list(tmp_path.iterdir()))}"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("RELAY_SINKS", '[{"type": "stdout"', "sinks"),
        ("RELAY_SINKS", "stdout", "sinks"),
        ("RELAY_ENGINE__FILTERS", "{type: container}", "engine.filters"),
        ("RELAY_ENGINE", '{"host": ', "engine"),
        ("RELAY_SPOOL", "{", "spool"),
    ],
)
def test_json_that_does_not_parse_names_the_variable(
    capsys: pytest.CaptureFixture[str], variable: str, value: str, setting: str
) -> None:
    code, out, err = check(capsys, **{variable: value})
    assert code == 2, err
    assert out == ""
    assert f"configuration error: {setting}: {variable} is not valid JSON" in err
    assert "Traceback" not in err


def test_a_scalar_beside_a_bad_json_variable_is_not_blamed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = check(
        capsys, RELAY_ENGINE__CONNECT_TIMEOUT="5", RELAY_ENGINE__FILTERS="[", RELAY_ENGINE__HOST=""
    )
    assert code == 2
    assert "engine.filters: RELAY_ENGINE__FILTERS is not valid JSON" in err


@pytest.mark.parametrize(
    ("sinks", "words"),
    [
        (
            webhook(url="http://user:pw@receiver.example/hook", bearer_token="t0k"),
            "url: holds user:password (Basic auth) and bearer_token is set",
        ),
        (
            webhook(url="http://user:pw@receiver.example/hook", headers={"Authorization": "x"}),
            "url: holds user:password and headers sets 'Authorization'",
        ),
        (webhook(bearer_token="abc\r\nX-Injected: 1"), "bearer_token: only visible ASCII"),
        (webhook(bearer_token="abc\n"), "bearer_token: only visible ASCII"),
        (webhook(bearer_token="two words"), "bearer_token: only visible ASCII"),
        (webhook(bearer_token=""), "bearer_token: empty"),
    ],
)
def test_contradictions_are_refused_before_any_retry(
    capsys: pytest.CaptureFixture[str], sinks: str, words: str
) -> None:
    code, _, err = check(capsys, RELAY_SINKS=sinks)
    assert code == 2, err
    assert "configuration error: sinks[0]: " in err
    assert words in err
    assert "pw" not in err.replace("password", "") and "t0k" not in err


def test_a_token_file_with_a_line_break_inside_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = secret(tmp_path, "first\nsecond\n")
    code, _, err = check(capsys, RELAY_SINKS=webhook(bearer_token_file=str(path)))
    assert code == 2
    assert "bearer_token: only visible ASCII" in err
    assert "first" not in err and "second" not in err


@pytest.mark.parametrize("field", ["bearer_token_file", "secret_file"])
@pytest.mark.parametrize("content", ["", "\n", "\r\n"])
def test_an_empty_secret_file_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, field: str, content: str
) -> None:
    path = secret(tmp_path, content)
    code, _, err = check(capsys, RELAY_SINKS=webhook(**{field: str(path)}))
    assert code == 2
    assert f"{field}: {path} is empty" in err


def test_an_empty_secret_file_of_another_sink_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = secret(tmp_path, "")
    sinks = [{"type": "mqtt", "host": "broker", "username": "u", "password_file": str(path)}]
    code, _, err = check(capsys, RELAY_SINKS=json.dumps(sinks))
    assert code == 2
    assert f"password_file: {path} is empty" in err


def test_a_world_readable_secret_file_is_accepted_with_a_warning(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    open_to_all = secret(tmp_path, "s3cret-token\n", 0o644)
    private = secret(tmp_path, "other-token\n", 0o440)
    sinks = json.dumps(
        [
            {
                "type": "webhook",
                "name": "a",
                "url": "http://r/",
                "bearer_token_file": str(open_to_all),
            },
            {"type": "webhook", "name": "b", "url": "http://r/", "bearer_token_file": str(private)},
        ]
    )
    code, out, err = check(capsys, RELAY_SINKS=sinks)
    assert code == 0, err
    assert "configuration OK" in out
    warnings = [line for line in err.splitlines() if "readable by every user" in line]
    assert len(warnings) == 1, err
    assert str(open_to_all) in warnings[0] and "0o644" in warnings[0]
    assert "s3cret" not in err


def test_the_state_dir_must_be_a_writable_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, _, err = check(capsys, RELAY_STATE_DIR=str(a_file))
    assert code == 2
    assert f"state_dir: {a_file} is not a directory" in err

    code, _, err = check(capsys, RELAY_STATE_DIR=str(a_file / "state"))
    assert code == 2
    assert f"state_dir: {a_file / 'state'} cannot be created: {a_file} is a file" in err

    # Missing but creatable is fine, and check-config creates nothing.
    fresh = tmp_path / "new" / "state"
    code, _, err = check(capsys, RELAY_STATE_DIR=str(fresh))
    assert code == 0, err
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".relay-check")] == []


def test_run_refuses_an_unusable_state_dir_before_starting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, out, err = check(capsys, "run", RELAY_STATE_DIR=str(a_file))
    assert code == 2
    assert out == ""
    assert "state_dir" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_a_read_only_state_dir_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], check=True)
    try:
        code, _, err = check(capsys, RELAY_STATE_DIR=str(mount))
        assert code == 2
        assert f"state_dir: {mount} is not writable" in err
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_directory_as_dead_letter_path_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = check(capsys, RELAY_DEAD_LETTER_PATH=str(tmp_path))
    assert code == 2
    assert f"dead_letter_path: {tmp_path} is a directory" in err


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("docker.sock", "use unix:///path/to/docker.sock or tcp://host:port"),
        ("ssh://me@node", "ssh:// and npipe:// are not supported"),
        ("unix://relative.sock", "unix:///absolute/path"),
        ("tcp://node", "tcp:// needs a port"),
        ("tcp://node:70000", "port is not a number from 1 to 65535"),
        ("tcp://node:port", "port is not a number from 1 to 65535"),
        ("tcp://bad_host!:2375", "no valid host name or IP address"),
        ("tcp://node:2375/v1.41", "no path, query or fragment"),
    ],
)
def test_an_unparsable_engine_host_is_refused(
    capsys: pytest.CaptureFixture[str], host: str, words: str
) -> None:
    code, _, err = check(capsys, RELAY_ENGINE__HOST=host)
    assert code == 2, err
    assert "configuration error: engine.host: " in err and words in err
    assert "[env RELAY_ENGINE__HOST]" in err


def test_a_bad_docker_host_is_named_too(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = check(capsys, DOCKER_HOST="node:2375")
    assert code == 2
    assert "engine.host: from DOCKER_HOST: 'node:2375'" in err


@pytest.mark.parametrize(
    "host",
    [
        "unix:///var/run/docker.sock",
        "tcp://10.0.0.5:2376",
        "tcp://[fd00::5]:2375",
        "https://engine.internal:2376",
        "http://localhost:2375",
    ],
)
def test_usable_engine_hosts_pass(capsys: pytest.CaptureFixture[str], host: str) -> None:
    code, _, err = check(capsys, RELAY_ENGINE__HOST=host)
    assert code == 0, err


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("0.0.0.0", True),
        ("::", True),
        ("127.0.0.1", True),
        ("localhost", True),
        ("relay-0.metrics.svc", True),
        ("not a host", False),
        ("http://0.0.0.0", False),
        ("0.0.0.0:9477", False),
        ("", False),
    ],
)
def test_the_http_host_is_an_address_or_a_name(
    capsys: pytest.CaptureFixture[str], host: str, ok: bool
) -> None:
    code, _, err = check(capsys, RELAY_HTTP__HOST=host)
    assert code == (0 if ok else 2), err
    if not ok:
        assert "http.host" in err and "RELAY_HTTP__HOST" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_goes_before_or_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, where: str
) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text("sinks: [{type: stdout, name: out}]\n")
    args = ["--config", str(config)]
    argv = [*args, "check-config"] if where == "before" else ["check-config", *args]
    code, out, err = check(capsys, *argv)
    assert code == 0, err
    assert "out (stdout)" in out
