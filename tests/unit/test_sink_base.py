"""What every sink shares (sinks.base): one TLS settings model and one rule for secrets read
from files, checked through each sink's configuration."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from relay.errors import ConfigError, RetryableSinkError
from relay.plugins import load as load_settings
from relay.plugins import sink_config_union
from relay.sink import SinkContext, TlsSettings
from tests.harness.pki import KEY_PASSWORD, Pki, pki_fixture

pki = pki_fixture()

SINKS = {
    "kafka": {"type": "kafka", "bootstrap_servers": "b:9092"},
    "mqtt": {"type": "mqtt"},
    "webhook": {"type": "webhook", "url": "https://127.0.0.1:9/hook"},
}


def any_sink(kind: str, **values: Any) -> Any:
    return TypeAdapter(sink_config_union()).validate_python({**SINKS[kind], **values})


def any_sink_error(kind: str, **values: Any) -> str:
    with pytest.raises(ValidationError) as info:
        any_sink(kind, **values)
    return str(info.value)


@pytest.mark.parametrize("kind", sorted(SINKS))
def test_every_sink_takes_the_same_tls_settings(kind: str, pki: Pki, tmp_path: Path) -> None:
    c = any_sink(kind, tls=pki.client_tls())
    assert isinstance(c.tls, TlsSettings)
    ctx = c.tls.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    lax = any_sink(kind, tls={"verify": False}).tls.ssl_context()
    assert lax.verify_mode == ssl.CERT_NONE and not lax.check_hostname

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    assert "ca_file: no such file" in any_sink_error(kind, tls={"ca_file": str(tmp_path / "no")})
    assert "ca_file: cannot load" in any_sink_error(kind, tls={"ca_file": str(garbage)})
    assert "cert_file/key_file: cannot load" in any_sink_error(
        kind, tls={"cert_file": str(garbage)}
    )
    # A certificate without its key (none in cert_file, no key_file).
    assert "cert_file/key_file: cannot load" in any_sink_error(
        kind, tls={"cert_file": str(pki.client_cert)}
    )
    assert "key_file: set cert_file too" in any_sink_error(
        kind, tls={"key_file": str(pki.client_key)}
    )
    assert "verify" in any_sink_error(kind, tls={"verify": "sometimes"})


@pytest.mark.parametrize("kind", sorted(SINKS))
def test_encrypted_client_key_needs_the_right_password(kind: str, pki: Pki, tmp_path: Path) -> None:
    encrypted = pki.client_tls(key_file=str(pki.client_key_encrypted))
    assert "the key is encrypted: set key_password" in any_sink_error(kind, tls=encrypted)
    assert "is key_password right?" in any_sink_error(
        kind, tls={**encrypted, "key_password": "wrong"}
    )
    (tmp_path / "key-pw").write_text(KEY_PASSWORD + "\n")
    c = any_sink(kind, tls={**encrypted, "key_password_file": str(tmp_path / "key-pw")})
    assert c.tls.key_password.get_secret_value() == KEY_PASSWORD
    c.tls.ssl_context()
    shown = repr(c) + c.model_dump_json() + repr(c.build(SinkContext("n")))
    assert KEY_PASSWORD not in shown


def _secret_settings(kind: str, pki: Pki) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
    """Every secret of a sink: where its pair of settings sits, and what else it needs."""
    tls = pki.client_tls(key_file=str(pki.client_key_encrypted))
    return {
        "kafka": {
            "password": (("sasl",), {"sasl": {"username": "u"}}),
            "key_password": (("tls",), {"tls": tls}),
        },
        "mqtt": {
            "password": ((), {"username": "u"}),
            "key_password": (("tls",), {"tls": tls}),
        },
        "webhook": {
            "secret": ((), {}),
            "bearer_token": ((), {}),
            "key_password": (("tls",), {"tls": tls}),
        },
    }[kind]


SECRETS = [
    ("kafka", "password"),
    ("kafka", "key_password"),
    ("mqtt", "password"),
    ("mqtt", "key_password"),
    ("webhook", "secret"),
    ("webhook", "bearer_token"),
    ("webhook", "key_password"),
]


@pytest.mark.parametrize(("kind", "name"), SECRETS)
def test_every_secret_is_read_from_its_file_and_never_shown(
    kind: str, name: str, pki: Pki, tmp_path: Path
) -> None:
    where, needs = _secret_settings(kind, pki)[name]
    value = KEY_PASSWORD if name == "key_password" else f"zz-{name}-value"

    def config(**pair: Any) -> dict[str, Any]:
        values = {k: dict(v) if isinstance(v, dict) else v for k, v in needs.items()}
        target = values[where[0]] if where else values
        target.update(pair)
        return values

    (tmp_path / "secret").write_text(value + "\n")
    c = any_sink(kind, **config(**{f"{name}_file": str(tmp_path / "secret")}))
    model = getattr(c, where[0]) if where else c
    assert getattr(model, name).get_secret_value() == value
    assert getattr(model, f"{name}_file") is None  # one source of the secret once read
    shown = repr(c) + c.model_dump_json() + repr(c.build(SinkContext("n")))
    assert value not in shown

    both = config(**{name: value, f"{name}_file": str(tmp_path / "secret")})
    assert f"{name} and {name}_file: set only one" in any_sink_error(kind, **both)
    missing = config(**{f"{name}_file": str(tmp_path / "missing")})
    assert f"{name}_file: cannot read" in any_sink_error(kind, **missing)


def test_tls_error_through_settings_names_the_nested_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:

    monkeypatch.setenv(
        "RELAY_SINKS", json.dumps([{**SINKS["mqtt"], "tls": {"ca_file": str(tmp_path / "no")}}])
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.setting == "sinks[0].tls.ca_file"
    assert "no such file" in str(info.value)


async def test_a_tls_file_broken_after_the_config_check_is_retried(
    pki: Pki, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.read_bytes())
    sink = any_sink("webhook", tls={"ca_file": str(ca)}).build(SinkContext("n"))
    ca.write_text("no longer a certificate")
    with pytest.raises(RetryableSinkError, match=r"\[webhook\] tls: ca_file: cannot load"):
        await sink.start()
    await sink.aclose()
