"""Podman as an engine: detection from /version, a stable identity, `engine.id`, and Podman's
events (recorded from Podman 4.3.1: tests/fixtures/podman-4.3.1-events.jsonl) normalized without
its attributes among the labels, its actors named, its actions kept."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from relay.deadletter import DeadLetter
from relay.engine import Connected
from relay.identity import ENGINE_ID_PATTERN, engine_identity, flavour_of, podman_id
from relay.metrics import Metrics
from relay.normalize import Normalizer, event_id
from relay.pipeline import Pipeline
from relay.router import RouteFilter, RouteTable
from relay.schema import Engine, Event
from relay.settings import EngineSettings, SchemaSettings
from relay.spool import Spool
from relay.template import event_fields

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ENGINE = Engine(id="podman-x", name="vm", version="4.3.1", api_version="1.41")
PODMAN_KEYS = {"containerExitCode", "podId", "image", "name"}

# /version as Podman 4.3.1 answers it (measured), and as Docker 20.10 (Debian) and 28.5 do.
PODMAN_VERSION: dict[str, Any] = {
    "Platform": {"Name": "linux/amd64/debian-12"},
    "Components": [
        {"Name": "Podman Engine", "Version": "4.3.1", "Details": {"APIVersion": "4.3.1"}},
        {"Name": "Conmon", "Version": "conmon version 2.1.6, commit: unknown"},
        {"Name": "OCI Runtime (runc)", "Version": "runc version 1.1.5+ds1"},
    ],
    "Version": "4.3.1",
    "ApiVersion": "1.41",
}
DOCKER_VERSIONS: list[dict[str, Any]] = [
    {
        "Platform": {"Name": ""},
        "Components": [{"Name": "Engine", "Version": "20.10.24+dfsg1"}],
        "Version": "20.10.24+dfsg1",
    },
    {
        "Platform": {"Name": "Docker Engine - Community"},
        "Components": [{"Name": "Engine"}, {"Name": "containerd"}, {"Name": "runc"}],
    },
]
PODMAN_INFO: dict[str, Any] = {
    "ID": "9f32cfa0-4ab8-46cd-ac37-2db528e0edfa",
    "Name": "vm",
    "DockerRootDir": "/var/lib/containers/storage",
}


def corpus() -> list[dict[str, Any]]:
    path = FIXTURES / "podman-4.3.1-events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_podman_is_detected_from_version() -> None:
    assert flavour_of(PODMAN_VERSION) == "podman"
    for version in DOCKER_VERSIONS:
        assert flavour_of(version) == "docker"


@pytest.mark.parametrize(
    "version",
    [{}, {"Components": None}, {"Components": [1, "x", {"Name": 5}]}, {"Platform": "podman"}],
)
def test_odd_version_answers_are_docker(version: dict[str, Any]) -> None:
    assert flavour_of(version) == "docker"


def test_podman_id_ignores_the_random_info_id() -> None:
    # Podman answers a new random ID on every /info call: the derived id must not move.
    other_call = {**PODMAN_INFO, "ID": "edf2d062-29ba-4bee-bbb3-2149beaebbe1"}
    assert podman_id(PODMAN_INFO) == podman_id(other_call)
    assert podman_id(PODMAN_INFO).startswith("podman-")
    # What engine.id accepts, so a derived id could be pinned as it is.
    assert re.fullmatch(ENGINE_ID_PATTERN, podman_id(PODMAN_INFO))
    # Another storage root on the host (a rootless user's service), another host: other ids.
    rootless = {**PODMAN_INFO, "DockerRootDir": "/home/u/.local/share/containers/storage"}
    assert podman_id(rootless) != podman_id(PODMAN_INFO)
    assert podman_id({**PODMAN_INFO, "Name": "other"}) != podman_id(PODMAN_INFO)


def test_podman_without_a_storage_root_asks_for_engine_id() -> None:
    with pytest.raises(ValueError, match=r"engine\.id"):
        podman_id({"ID": "x", "Name": "vm"})


def test_identity_per_flavour_and_pinned() -> None:
    assert engine_identity(PODMAN_INFO, "podman", None) == podman_id(PODMAN_INFO)
    docker_info = {"ID": "ABCD:EFGH", "Name": "vm", "DockerRootDir": "/var/lib/docker"}
    assert engine_identity(docker_info, "docker", None) == "ABCD:EFGH"
    # A pinned id wins on any engine.
    assert engine_identity(PODMAN_INFO, "podman", "host-1") == "host-1"
    assert engine_identity(docker_info, "docker", "host-1") == "host-1"
    assert engine_identity({"ID": 5}, "docker", None) == ""


@pytest.mark.parametrize("value", ["host-1", "a", "urn.x:y_z-1", "A" * 128])
def test_engine_id_setting_accepts(value: str) -> None:
    assert EngineSettings(id=value).id == value


@pytest.mark.parametrize("value", ["-x", "a/b", "a b", "a\nb", "é", "A" * 129, "{engine}"])
def test_engine_id_setting_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="id"):
        EngineSettings(id=value)


def test_engine_id_empty_is_unset() -> None:
    assert EngineSettings(id="").id is None
    assert EngineSettings().id is None


def test_corpus_podman_attributes_are_never_labels() -> None:
    n = Normalizer(ENGINE, flavour="podman")
    for raw in corpus():
        ce = n.normalize(json.dumps(raw).encode())
        actor = ce.data.actor
        assert not set(actor.labels) & PODMAN_KEYS, (raw, actor)
        for key in PODMAN_KEYS & set(raw["Actor"]["Attributes"] or {}):
            assert actor.attributes[key] == raw["Actor"]["Attributes"][key]


def test_corpus_actions_and_types_are_kept_as_podman_sent_them() -> None:
    n = Normalizer(ENGINE, flavour="podman")
    seen = set()
    for raw in corpus():
        ce = n.normalize(json.dumps(raw).encode())
        assert (ce.data.type, ce.data.action) == (raw["Type"], raw["Action"])
        assert ce.type == f"dev.docker-event-relay.{raw['Type']}.{raw['Action']}"
        seen.add((ce.data.type, ce.data.action))
        if raw["Action"] == "health_status":
            # Podman sends no status with it: there is no detail to invent.
            assert ce.data.action_detail is None
    assert {
        ("container", "remove"),
        ("container", "exec"),
        ("container", "exec_died"),
        ("container", "init"),
        ("container", "cleanup"),
        ("pod", "create"),
        ("system", "log-rotation"),
    } <= seen
    assert ("container", "destroy") not in seen


def test_corpus_empty_actor_ids_become_the_name_deterministically() -> None:
    n = Normalizer(ENGINE, flavour="podman")
    empty = [raw for raw in corpus() if not raw["Actor"]["ID"]]
    assert {(raw["Type"], raw["Action"]) for raw in empty} >= {
        ("volume", "create"),
        ("volume", "remove"),
        ("volume", "prune"),
        ("image", "pull"),
        ("image", "build"),
        ("system", "log-rotation"),
    }
    for raw in empty:
        line = json.dumps(raw).encode()
        ce = n.normalize(line)
        name = raw["Actor"]["Attributes"]["name"]
        assert ce.data.actor.id == name and ce.subject == (name or None)
        assert ce.id == event_id(ENGINE.id, raw["timeNano"], raw["Type"], raw["Action"], name)
        # The same line from another normalizer of the same engine (a replay after a restart).
        assert Normalizer(ENGINE, flavour="podman").normalize(line).id == ce.id
    # Docker names its volumes in Actor.ID; an empty one stays empty there (its prunes).
    docker = Normalizer(ENGINE).normalize(json.dumps(empty[0]).encode())
    assert docker.data.actor.id == ""


def test_corpus_volume_prunes_have_no_reclaimed_bytes() -> None:
    n = Normalizer(ENGINE, flavour="podman")
    prunes = [raw for raw in corpus() if raw["Action"] == "prune"]
    assert len(prunes) == 3
    for raw in prunes:
        ce = n.normalize(json.dumps(raw).encode())
        assert ce.data.reclaimed_bytes is None
        assert b"reclaimed_bytes" not in msgspec.json.encode(ce)


def test_the_pipeline_normalizes_with_the_flavour_of_the_connected_engine(tmp_path: Path) -> None:
    metrics = Metrics()
    spool = Spool(tmp_path / "spool.db", metrics)
    try:
        spool.open([])
        dead = DeadLetter(tmp_path / "dl.jsonl", spool, metrics)
        pipeline = Pipeline(asyncio.Queue(), RouteTable([]), spool, dead, metrics, SchemaSettings())
        pipeline._handle(Connected(ENGINE, flavour="podman"))
        assert pipeline.normalizer is not None and pipeline.normalizer.flavour == "podman"
        # A reconnect to the same id keeps the cursor, and takes the flavour it reports.
        pipeline._handle(Connected(ENGINE))
        assert pipeline.normalizer.flavour == "docker"
    finally:
        spool.close()


def test_reclaimed_absent_counts_no_bytes_and_passes_no_size_filter() -> None:
    metrics = Metrics()
    metrics.read("volume", "prune", None)
    assert (
        metrics.registry.get_sample_value("relay_reclaimed_bytes_total", {"type": "volume"}) is None
    )
    n = Normalizer(ENGINE, flavour="podman")
    prune = next(raw for raw in corpus() if raw["Action"] == "prune")
    event = Event(n.normalize(json.dumps(prune).encode()))
    assert not RouteFilter(min_reclaimed_bytes=0).matches(event)
    assert RouteFilter(actions=["prune"]).matches(event)
    assert event_fields(event)["actor_id"] == prune["Actor"]["Attributes"]["name"]
