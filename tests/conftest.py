"""Fixtures for real engines and brokers (DESIGN.md section 5).

Everything is lazy and nothing is autouse: a test that requests no fixture from here (all of
tests/unit) starts no process.

Engines: `engine` is parametrized over the engines to test, ids "20.10" and "28.5";
RELAY_TEST_ENGINES=20.10,28.5 (comma-separated) narrows the list. A requested engine whose
dockerd is missing fails its tests with instructions; it is never skipped silently.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import (
    EnginePool,
    EngineSpec,
    Mosquitto,
    MotoS3,
    PrivateEngine,
    Tansu,
    known_engines,
    require_engine,
)
from tests.harness.podman import PrivatePodman

INTEGRATION_DIR = Path(__file__).parent / "integration"


def _requested_engines() -> list[EngineSpec]:
    known = {spec.name: spec for spec in known_engines()}
    raw = os.environ.get("RELAY_TEST_ENGINES", "")
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if not names:
        return list(known.values())
    unknown = sorted(set(names) - known.keys())
    if unknown:
        raise pytest.UsageError(
            f"RELAY_TEST_ENGINES names unknown engines {unknown}; known: {sorted(known)}"
        )
    return [known[name] for name in dict.fromkeys(names)]


REQUESTED_ENGINES = _requested_engines()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Mark rather than skip: `-m "not integration"` selects the fast suite explicitly.
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def requested_engines() -> list[EngineSpec]:
    """The engine specs this run covers (RELAY_TEST_ENGINES or all known)."""
    return REQUESTED_ENGINES


@pytest.fixture(scope="session")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnginePool]:
    pool = EnginePool(lambda name: tmp_path_factory.mktemp(f"engine-{name}"))
    yield pool
    pool.stop_all()


@pytest.fixture(params=REQUESTED_ENGINES, ids=[spec.name for spec in REQUESTED_ENGINES])
def engine(request: pytest.FixtureRequest, engines: EnginePool) -> PrivateEngine:
    """The shared engine of this parameter; tests may restart it but leave it running."""
    spec: EngineSpec = request.param
    return engines.get(spec)


@pytest.fixture(params=REQUESTED_ENGINES, ids=[spec.name for spec in REQUESTED_ENGINES])
def engine_fresh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrivateEngine]:
    """A private engine for one test, free to stop, restart or break."""
    spec: EngineSpec = request.param
    require_engine(spec)
    engine = PrivateEngine(spec.name, spec.dockerd_path, tmp_path_factory.mktemp("engine"))
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def podman_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., PrivatePodman]]:
    """Start private Podman services (tests/harness/podman.py), each free to restart or break:
    make(events_logfile_max_size=...). Fails, never skips, when podman is missing."""
    started: list[PrivatePodman] = []

    def make(events_logfile_max_size: int | None = None) -> PrivatePodman:
        service = PrivatePodman(tmp_path_factory.mktemp("podman"), events_logfile_max_size)
        started.append(service)
        service.start()
        return service

    yield make
    for service in started:
        service.close()


@pytest.fixture
def podman(podman_factory: Callable[..., PrivatePodman]) -> PrivatePodman:
    """A private Podman service of this test alone, with Podman's default events file size."""
    return podman_factory()


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """One tansu for the session: use unique topic names. Do not stop it; see tansu_fresh."""
    with Tansu(tmp_path_factory.mktemp("tansu")) as broker:
        yield broker


@pytest.fixture
def tansu_fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """A tansu of this test alone, for stop/restart scenarios (restart loses all data)."""
    with Tansu(tmp_path_factory.mktemp("tansu")) as broker:
        yield broker


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """One local S3 (moto) for the session: each tansu on it gets a bucket of its own."""
    with MotoS3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def tansu_s3(s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """One tansu for the session that keeps its topics and records across a restart (its
    storage is S3). Use unique topic names; a test may restart it but must leave it running."""
    with s3.tansu(tmp_path_factory.mktemp("tansu-s3"), "tansu-session") as broker:
        yield broker


@pytest.fixture
def tansu_s3_fresh(s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """A tansu on S3 of this test alone (a bucket of its own), for stop/restart scenarios."""
    bucket = f"tansu-{uuid.uuid4().hex[:12]}"
    with s3.tansu(tmp_path_factory.mktemp("tansu-s3"), bucket) as broker:
        yield broker


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One anonymous Mosquitto for the session: use unique topics. Do not stop it."""
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture
def mosquitto_fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A Mosquitto of this test alone, for stop/restart scenarios."""
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Mosquitto]]:
    """Start Mosquittos with custom config (TLS, passwords): make(extra_config=..., ...)."""
    started: list[Mosquitto] = []

    def make(extra_config: str = "", allow_anonymous: bool = True) -> Mosquitto:
        broker = Mosquitto(
            tmp_path_factory.mktemp("mosquitto"),
            extra_config=extra_config,
            allow_anonymous=allow_anonymous,
        )
        started.append(broker)
        broker.start()
        return broker

    yield make
    for broker in started:
        broker.stop()
