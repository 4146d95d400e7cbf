"""Test certificates made with openssl: a CA, a server certificate for 127.0.0.1 and localhost,
a client certificate (also with an encrypted key), and a second, unrelated CA for "wrong CA"
cases.

One set per test session: `make_pki(directory)` returns the set already in `directory` when
there is one. A test module declares the fixture with one line, `pki = pki_fixture()`.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

KEY_PASSWORD = "client-key-passphrase"
# EC keys: generated in milliseconds, and every TLS peer here (stunnel, Mosquitto, aiohttp,
# aiokafka, paho) takes them.
_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_CA_EXT = [
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
]
_LEAF_EXT = {
    "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    "client": "subjectAltName=DNS:relay\nextendedKeyUsage=clientAuth\n",
}


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path
    """CA certificate (PEM) that signed the server and client certificates."""
    other_ca: Path
    """A CA that signed nothing here: trusting only it fails verification."""
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path
    """client_key under KEY_PASSWORD."""

    def server_context(self, *, require_client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    def client_tls(self, **overrides: Any) -> dict[str, Any]:
        """A sink's `tls:` settings for mTLS with this CA."""
        return {
            "ca_file": str(self.ca),
            "cert_file": str(self.client_cert),
            "key_file": str(self.client_key),
            **overrides,
        }


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> None:
    _openssl(
        directory,
        "req",
        "-x509",
        *_NEW_KEY,
        *_CA_EXT,
        "-days",
        "2",
        "-subj",
        f"/CN=relay test {name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
    )


def _leaf(directory: Path, name: str) -> None:
    (directory / f"{name}.ext").write_text(_LEAF_EXT[name])
    _openssl(
        directory,
        "req",
        *_NEW_KEY,
        "-subj",
        f"/CN=relay test {name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
    )
    _openssl(
        directory,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
    )


def make_pki(directory: Path) -> Pki:
    """The certificate set in `directory`, made there first if it is not there yet."""
    pki = Pki(
        directory=directory,
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        client_key_encrypted=directory / "client-encrypted.key",
    )
    done = directory / "complete"
    if done.exists():
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _leaf(directory, "server")
    _leaf(directory, "client")
    _openssl(
        directory,
        "pkey",
        "-in",
        "client.key",
        "-aes256",
        "-passout",
        f"pass:{KEY_PASSWORD}",
        "-out",
        "client-encrypted.key",
    )
    done.touch()
    return pki


def pki_fixture() -> Any:
    """A session fixture for a test module: `pki = pki_fixture()`. Modules share one set."""

    @pytest.fixture(scope="session")
    def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
        return make_pki(tmp_path_factory.getbasetemp() / "pki")

    return pki
