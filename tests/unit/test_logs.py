"""Log formatting: JSON lines by default, a console format for people, the level setting."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from relay.logs import JsonFormatter, setup_logging


class Stderr:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.text = ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Stderr]:
    """What setup_logging's handler writes (it takes sys.stderr when called, in the test)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield Stderr(capsys)
    root.handlers[:], level = saved
    root.setLevel(level)


def test_json_lines_with_time_level_logger_message_and_extras(stderr: Stderr) -> None:
    setup_logging("INFO", "json")
    log = logging.getLogger("relay.test")
    log.info("sink %s: %d event(s)", "kafka", 3, extra={"sink": "kafka", "count": 3})
    log.warning('quote " and newline \n inside', extra={"obj": ValueError("odd")})
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2  # the newline in the message stays inside one JSON line
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "info" and first["logger"] == "relay.test"
    assert first["message"] == "sink kafka: 3 event(s)"
    assert first["sink"] == "kafka" and first["count"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert second["message"] == 'quote " and newline \n inside'
    assert second["obj"] == "odd"  # anything else is stringified, never fails


def test_exceptions_are_one_json_line(stderr: Stderr) -> None:
    setup_logging("INFO", "json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("relay.test").exception("failed")
    (line,) = stderr.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert entry["exception"].startswith("Traceback") and "RuntimeError: boom" in entry["exception"]


def test_console_format_is_readable_not_json(stderr: Stderr) -> None:
    setup_logging("INFO", "console")
    logging.getLogger("relay.app").info("starting: %s", "engine")
    (line,) = stderr.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO    relay\.app: starting: engine", line), line


def test_level_hides_lower_records_and_quiets_client_libraries(stderr: Stderr) -> None:
    setup_logging("WARNING", "json")
    logging.getLogger("relay.x").info("hidden")
    logging.getLogger("relay.x").warning("shown")
    assert [json.loads(ln)["message"] for ln in stderr.getvalue().splitlines()] == ["shown"]

    setup_logging("DEBUG", "json")
    logging.getLogger("relay.x").debug("relay debug")
    logging.getLogger("aiokafka.conn").info("client chatter")
    messages = [json.loads(ln)["message"] for ln in stderr.getvalue().splitlines()]
    assert "relay debug" in messages and "client chatter" not in messages


def test_secret_values_stay_masked_when_logged(stderr: Stderr) -> None:
    """A SecretStr that reaches a log call by mistake prints as stars."""
    setup_logging("DEBUG", "json")
    secret = SecretStr("s3cr3t-value")
    logging.getLogger("relay.x").debug("config %s", {"password": secret}, extra={"pw": secret})
    assert "s3cr3t-value" not in stderr.getvalue()


def test_formatter_without_setup() -> None:
    record = logging.makeLogRecord(
        {"name": "n", "levelname": "INFO", "msg": "m %s", "args": ("x",)}
    )
    assert json.loads(JsonFormatter().format(record))["message"] == "m x"
