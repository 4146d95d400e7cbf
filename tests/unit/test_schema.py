"""The committed JSON Schema is the one the code generates; real events validate against it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import msgspec

from relay.normalize import Normalizer
from relay.schema import Engine, Event, json_schema
from tests.contract import fixture_lines

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "event-v1.schema.json"


def test_committed_schema_matches_the_code() -> None:
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed == json_schema(), (
        "schemas/event-v1.schema.json drifted from relay/schema.py: regenerate it with "
        "`docker-event-relay schema > schemas/event-v1.schema.json` (additive changes only "
        "within v1)"
    )


def test_cli_prints_the_same_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "schema"], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out) == json.loads(SCHEMA_FILE.read_text())


def test_recorded_events_validate_against_the_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    engine = Engine(id="E", name="n", version="28.5.2", api_version="1.51", node_name="node-1")
    n = Normalizer(engine)
    count = 0
    for line in fixture_lines("engine-28.5.2-events.jsonl") + fixture_lines(
        "engine-20.10.24-events.jsonl"
    ):
        doc = msgspec.json.decode(Event(n.normalize(line)).json())
        validator.validate(doc)
        count += 1
    assert count == 153
    validator.validate(msgspec.json.decode(Event(n.gap(1, 2, "x")).json()))
    # And a document missing a required attribute does not.
    doc.pop("specversion")
    assert not validator.is_valid(doc)
