"""Logs under a failure that lasts: a relay process whose Kafka broker is unreachable, at the
default retry settings, writes aiokafka's connect error once, counts the repeats into one
summary, and says "delivery failing" once.

The relay runs at DEBUG here for one reason: its own DEBUG line per failed attempt ("still
failing") counts the attempts, so the test can check the suppressed count against them exactly.
aiokafka logs at WARNING and above whatever the level (README "Logs")."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import EnginePool, EngineSpec, PrivateEngine, wait_for

REPO = Path(__file__).resolve().parents[2]
ATTEMPTS = 5  # with the default waits (0.5 s doubling, up to 1 s jitter): about 10 to 15 s


@pytest.fixture
def any_engine(engines: EnginePool, requested_engines: list[EngineSpec]) -> PrivateEngine:
    """One engine: what is tested here does not depend on its version."""
    return engines.get(requested_engines[0])


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: every connect is refused, and no other
    process can start listening on it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def still_failing(lines: list[dict[str, Any]]) -> int:
    return sum(line["message"].startswith("sink kafka: still failing") for line in lines)


def test_an_unreachable_broker_is_one_aiokafka_line_plus_a_count(
    any_engine: PrivateEngine, refused_port: int, tmp_path: Path
) -> None:
    env = {k: v for k, v in any_engine.env().items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_STATE_DIR=str(tmp_path / "state"),
        RELAY_HTTP__ENABLED="false",
        RELAY_LOG__LEVEL="DEBUG",
        RELAY_SINKS=json.dumps(
            [
                {
                    "type": "kafka",
                    "name": "kafka",
                    "bootstrap_servers": [f"127.0.0.1:{refused_port}"],
                    "topic": "relay-events",
                }
            ]
        ),
    )
    err = tmp_path / "relay.stderr"
    with err.open("wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "run"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    try:

        def attempts_made() -> bool:
            assert proc.poll() is None, f"relay exited {proc.returncode}: {err.read_text()}"
            return 1 + still_failing(log_lines(err)) >= ATTEMPTS

        # Waits grow to 0.5, 1, 2, 4 s plus jitter: the fifth attempt ends within ~16 s.
        wait_for(attempts_made, 60, interval=0.02, message=f"{ATTEMPTS} connect attempts")
        # Sent during the wait before the next attempt (8 s or more): no attempt is cut short.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    lines = log_lines(err)  # every line is JSON, summaries too
    attempts = 1 + still_failing(lines)
    assert attempts == ATTEMPTS
    failing = [ln for ln in lines if "delivery failing" in ln["message"]]
    assert len(failing) == 1 and failing[0]["level"] == "warning", failing

    from_aiokafka = [ln for ln in lines if ln["logger"].split(".")[0] == "aiokafka"]
    written = [ln for ln in from_aiokafka if "suppressed" not in ln]
    summaries = [ln for ln in from_aiokafka if "suppressed" in ln]
    # One connect error per attempt, each the same template: the first is written ...
    assert [ln["message"] for ln in written] == [
        f'Unable connect to "127.0.0.1:{refused_port}": [Errno 111] Connect call failed '
        f"('127.0.0.1', {refused_port})"
    ]
    # ... and the other four are one count, written as the relay exits (less than a minute
    # passed: no summary was due before).
    assert [(s["level"], s["suppressed"]) for s in summaries] == [("error", ATTEMPTS - 1)]
    assert summaries[0]["message"].startswith(f"{ATTEMPTS - 1} more like this in the last ")
    assert summaries[0]["message"].endswith(written[0]["message"])
    # The count comes last, after the relay said it stopped.
    assert lines[-1] is summaries[0] and any("stopped at" in ln["message"] for ln in lines)
