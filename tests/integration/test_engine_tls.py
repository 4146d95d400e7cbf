"""The relay reaches an engine over tcp:// with TLS, configured the Docker way: DOCKER_HOST,
DOCKER_TLS_VERIFY and DOCKER_CERT_PATH (ca.pem, cert.pem, key.pem), against real engines that
require client certificates (`dockerd --tlsverify`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUESTED_ENGINES
from tests.harness import PrivateEngine, require_engine, wait_for
from tests.harness.brokers import free_port
from tests.harness.engine import EngineSpec
from tests.harness.pki import Pki, pki_fixture

REPO = Path(__file__).resolve().parents[2]
pki = pki_fixture()


@pytest.fixture(params=REQUESTED_ENGINES, ids=[spec.name for spec in REQUESTED_ENGINES])
def tls_engine(
    request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrivateEngine, str]]:
    spec: EngineSpec = request.param
    require_engine(spec)
    port = free_port()
    engine = PrivateEngine(
        spec.name,
        spec.dockerd_path,
        tmp_path_factory.mktemp("tls-engine"),
        extra_args=[
            "--host",
            f"tcp://127.0.0.1:{port}",
            "--tlsverify",
            "--tlscacert",
            str(pki.ca),
            "--tlscert",
            str(pki.server_cert),
            "--tlskey",
            str(pki.server_key),
        ],
    )
    engine.start()
    yield engine, f"tcp://127.0.0.1:{port}"
    engine.stop()


def cert_path(directory: Path, ca: Path, pki: Pki) -> Path:
    """A DOCKER_CERT_PATH directory, with the file names the Docker tools expect."""
    directory.mkdir()
    shutil.copy(ca, directory / "ca.pem")
    shutil.copy(pki.client_cert, directory / "cert.pem")
    shutil.copy(pki.client_key, directory / "key.pem")
    return directory


def start_relay(
    tmp_path: Path, name: str, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "DOCKER_"))}
    base.update(RELAY_STATE_DIR=str(tmp_path / f"{name}-state"), RELAY_HTTP__ENABLED="false", **env)
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "run"], cwd=REPO, env=base, stdout=stdout, stderr=stderr
        )
    return proc, out, err


def test_docker_host_over_tls_with_client_certificates(
    tls_engine: tuple[PrivateEngine, str], pki: Pki, tmp_path: Path
) -> None:
    engine, address = tls_engine
    good = cert_path(tmp_path / "certs", pki.ca, pki)
    wrong = cert_path(tmp_path / "wrong-certs", pki.other_ca, pki)
    relay, out, err = start_relay(
        tmp_path,
        "good",
        {
            "DOCKER_HOST": address,
            "DOCKER_TLS_VERIFY": "1",
            "DOCKER_CERT_PATH": str(good),
        },
    )
    untrusting, _, bad_err = start_relay(
        tmp_path,
        "wrong-ca",
        {
            "DOCKER_HOST": address,
            "DOCKER_TLS_VERIFY": "1",
            "DOCKER_CERT_PATH": str(wrong),
        },
    )
    try:
        wait_for(
            lambda: b"connected" in err.read_bytes() or relay.poll() is not None,
            timeout=30,
            message="relay connected over TLS",
        )
        assert relay.poll() is None, err.read_text()
        engine.cli("volume", "create", "over-tls")

        def delivered() -> list[dict[str, object]]:
            return [
                e
                for e in map(json.loads, out.read_text().splitlines())
                if e["data"]["actor"]["id"] == "over-tls"
            ]

        [event] = wait_for(delivered, timeout=30, message="the event, relayed over TLS")
        assert event["data"]["engine"]["api_version"] == engine.api_version  # type: ignore[index]

        # A relay that does not trust the engine's CA: a clear, retried error naming the
        # address, never a crash.
        wait_for(
            lambda: b"reconnecting" in bad_err.read_bytes(),
            timeout=30,
            message="the wrong-CA relay logs its failure",
        )
        log = [json.loads(line) for line in bad_err.read_text().splitlines()]
        failure = next(r for r in log if "reconnecting" in r["message"])
        assert address in failure["message"]
        assert (
            "CERTIFICATE_VERIFY_FAILED" in failure["message"]
            or "certificate verify" in failure["message"]
        )
        assert untrusting.poll() is None
        assert not any("connected:" in r["message"] for r in log)
    finally:
        for proc in (relay, untrusting):
            proc.terminate()
            assert proc.wait(30) == 0
