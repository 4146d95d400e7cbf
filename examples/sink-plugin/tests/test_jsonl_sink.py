"""The jsonl-file sink against a real file: what is its own (the directory rule, the file mode,
a write the kernel cuts short, the entry point). The shared sink contract suite runs against it
in the relay's own test suite (tests/integration/test_plugin_sink.py)."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from relay.sink import RetryableSinkError
from tests.contract import sample_events

from relay_sink_jsonl import JsonLinesFileSink, JsonLinesFileSinkConfig


def read_lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the file ends in a partial line"
    return [json.loads(line) for line in data.splitlines()]


async def test_missing_directory_is_retryable_until_an_operator_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "events.jsonl"
    sink = JsonLinesFileSink("jsonl", path)
    with pytest.raises(RetryableSinkError, match=f"directory {tmp_path / 'spool'} does not exist"):
        await sink.start()
    path.parent.mkdir()
    events = sample_events(3)
    async with sink:
        await sink.send(events)
    assert [doc["id"] for doc in read_lines(path)] == [e.id for e in events]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    first, second = sample_events(2), sample_events(2)
    for batch in (first, second):
        async with JsonLinesFileSink("jsonl", path, fsync=False) as sink:
            await sink.send(batch)
    assert [doc["id"] for doc in read_lines(path)] == [e.id for e in first + second]


# A child process, so that the file size limit and the ignored SIGXFSZ are its own. The second
# batch crosses the limit: the kernel writes part of it and then refuses (EFBIG), a real
# partial write, as a full disk makes one.
_CHILD = """
import asyncio, json, sys
from pathlib import Path
from relay.sink import RetryableSinkError
from relay_sink_jsonl import JsonLinesFileSink
from tests.contract import sample_events

async def main(path):
    first, big, last = sample_events(10), sample_events(300), sample_events(10)
    error = None
    async with JsonLinesFileSink("jsonl", path) as sink:
        await sink.send(first)
        size = path.stat().st_size
        try:
            await sink.send(big)
        except RetryableSinkError as exc:
            error = str(exc)
        # After the cut, the file ends where the first batch did.
        assert path.stat().st_size == size, (path.stat().st_size, size)
        await sink.send(last)
    print(json.dumps({"ids": [e.id for e in first + last], "error": error}))

asyncio.run(main(Path(sys.argv[1])))
"""
_LIMIT = 64 * 1024


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death; kept across exec
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (_LIMIT, hard))


def test_a_write_cut_short_leaves_no_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.run(
        [sys.executable, "-B", "-c", _CHILD, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_file_size,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)
    assert result["error"] is not None, "the big batch fitted: raise the batch size"
    assert f"cannot append to {path}: File too large" in result["error"]
    assert [doc["id"] for doc in read_lines(path)] == result["ids"]


def test_registered_under_its_type() -> None:
    (entry,) = entry_points(group="docker_event_relay.sinks", name="jsonl-file")
    assert entry.load() is JsonLinesFileSinkConfig
    config = JsonLinesFileSinkConfig.model_validate({"type": "jsonl-file", "path": "/x.jsonl"})
    assert (config.sink_name, config.path, config.fsync) == ("jsonl-file", Path("/x.jsonl"), True)
