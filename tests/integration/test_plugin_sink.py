"""The example third-party sink (examples/sink-plugin, `type: jsonl-file`) as the relay sees it:
found through its entry point, built from its config, and run through the shared contract
suite against a real file. scripts/setup.sh installs it into .venv; its own tests (what is
particular to it: file mode, a write the kernel cuts short) live beside it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cloudevents.http import CloudEvent, from_json

from relay.plugins import build_sinks, bundled_sink_types, settings_model, sink_types
from relay.sink import Sink, SinkContext
from tests.contract import SinkContract, sample_events
from tests.harness import async_wait_for

pytestmark = pytest.mark.integration

PLUGIN_TYPE = "jsonl-file"

try:
    from relay_sink_jsonl import JsonLinesFileSink, JsonLinesFileSinkConfig
except ImportError as exc:  # a missing plugin is a broken set-up, never a silent skip
    raise ImportError(
        "the example sink plugin is not installed: run scripts/setup.sh "
        "(pip install -e examples/sink-plugin)"
    ) from exc


def plugin_sink(path: Path, **settings: Any) -> Sink:
    """A sink of the plugin's type, built the way the relay builds it: from the config class
    that the entry point names."""
    config = sink_types()[PLUGIN_TYPE].model_validate(
        {"type": PLUGIN_TYPE, "path": str(path), **settings}
    )
    return config.build(SinkContext("test"))


async def test_the_relay_finds_the_plugin_through_its_entry_point(tmp_path: Path) -> None:
    assert sink_types()[PLUGIN_TYPE] is JsonLinesFileSinkConfig
    # Found, but not the relay's own: the README documents only the bundled types.
    assert PLUGIN_TYPE not in bundled_sink_types()
    # The settings accept the type, and the relay builds and runs its sink.
    path = tmp_path / "events.jsonl"
    settings = settings_model().model_validate(
        {"sinks": [{"type": PLUGIN_TYPE, "path": str(path), "name": "files"}]}
    )
    ((sink, _),) = build_sinks(settings)
    assert isinstance(sink, JsonLinesFileSink)
    assert (sink.name, sink.path) == ("files", path)
    events = sample_events(5)
    async with sink:
        await sink.send(events)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [e.id for e in events]


class TestJsonLinesFileSinkContract(SinkContract):
    cannot: ClassVar[Mapping[str, str]] = {
        "refuse_one_event": "a batch goes into the file with one write, taken whole or not at "
        "all: nothing refuses one line of it",
        "dead_letter_one_event": "as refuse_one_event",
        "restart": "a file has no server to restart; moving it away (rotation) is no restart: "
        "the sink keeps appending to the file it opened (one writer per file, its README)",
        "slow": "a local file has no network to slow down",
        "secrets": "the jsonl-file sink has no credentials",
    }

    @pytest.fixture(autouse=True)
    def _file(self, tmp_path: Path) -> None:
        self.path = tmp_path / "events.jsonl"

    def make_sink(self) -> Sink:
        return plugin_sink(self.path)

    async def _lines(self, ids: list[str], timeout: float) -> list[bytes]:  # noqa: ASYNC109
        wanted = set(ids)

        def arrived() -> list[bytes] | None:
            data = self.path.read_bytes() if self.path.exists() else b""
            # A batch is one write: the file never ends in half a line here.
            assert not data or data.endswith(b"\n"), "the file ends in a partial line"
            lines = data.splitlines()
            return lines if wanted <= {json.loads(line)["id"] for line in lines} else None

        result = await async_wait_for(arrived, timeout, message=f"{len(ids)} lines")
        assert result is not None
        return result

    async def read_back(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - the contract's
    ) -> list[dict[str, Any]]:
        return [json.loads(line) for line in await self._lines(ids, timeout)]

    async def read_back_sdk(
        self,
        sink: Sink,
        ids: list[str],
        timeout: float,  # noqa: ASYNC109 - the contract's
    ) -> list[CloudEvent]:
        return [from_json(line) for line in await self._lines(ids, timeout)]

    def make_unreachable_sink(self) -> Sink:
        # Its "unreachable": the directory is not there (yet).
        return plugin_sink(self.path.parent / "missing" / "events.jsonl")
