"""Webhook sink: config validation, signing, header encoding, Retry-After and outcome rules."""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from relay.errors import PermanentSinkError, RetryableSinkError, SinkStoppedError
from relay.plugins import settings_model, sink_config_union
from relay.sink import SinkContext
from sinks.webhook import (
    WebhookSink,
    WebhookSinkConfig,
    binary_headers,
    chains,
    classify,
    encode_header_value,
    parse_retry_after,
    redact_url,
    sign,
)
from tests.contract import sample_events
from tests.harness.receiver import SignatureError, verify_signature

URL = "http://127.0.0.1:9/hook"


def make(**values: Any) -> WebhookSinkConfig:
    config = TypeAdapter(sink_config_union()).validate_python(
        {"type": "webhook", "url": URL, **values}
    )
    assert isinstance(config, WebhookSinkConfig)
    return config


def error_of(**values: Any) -> str:
    with pytest.raises(ValidationError) as info:
        make(**values)
    return str(info.value)


# -- config ----------------------------------------------------------------------------------


def test_defaults() -> None:
    c = make()
    assert (c.method, c.mode, c.max_batch, c.concurrency, c.timeout) == (
        "POST",
        "binary",
        100,
        1,
        10.0,
    )
    assert c.sink_name == "webhook"


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"url": "ftp://x/y"}, "url"),
        ({"url": "http://x/#frag"}, "url"),
        ({"mode": "streaming"}, "mode"),
        ({"method": "GET"}, "method"),
        ({"timeout": 0}, "timeout"),
        ({"concurrency": 0}, "concurrency"),
        ({"headers": {"Content-Type": "text/plain"}}, "headers"),
        ({"headers": {"ce-id": "x"}}, "headers"),
        ({"headers": {"bad name": "x"}}, "headers"),
        ({"headers": {"X-A": "a\r\nInjected: 1"}}, "headers"),
        ({"bearer_token": "t", "headers": {"authorization": "x"}}, "Authorization"),
        ({"secret": "s", "headers": {"X-Relay-Signature": "x"}}, "signature header"),
        ({"secret": ""}, "secret"),
        ({"tls": {"ca_file": "/nonexistent/ca.pem"}, "url": "https://x/"}, "ca_file"),
        ({"tls": {}}, "tls: set, but url is not https"),
        ({"tls": {"key_file": "/k"}, "url": "https://x/"}, "key_file"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_config_errors_name_the_setting(values: dict[str, Any], names: str) -> None:
    assert names in error_of(**values)


def test_config_error_through_settings_names_the_sink_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from relay.errors import ConfigError
    from relay.plugins import load as load_settings

    monkeypatch.setenv("RELAY_SINKS", '[{"type": "webhook", "url": "ftp://x"}]')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.setting == "sinks[0].url"


def test_secrets_from_files_never_shown(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok-123\n")
    (tmp_path / "secret").write_text("sec-456\n")
    c = make(bearer_token_file=str(tmp_path / "token"), secret_file=str(tmp_path / "secret"))
    assert c.bearer_token is not None and c.bearer_token.get_secret_value() == "tok-123"
    assert c.secret is not None and c.secret.get_secret_value() == "sec-456"
    sink = c.build(SinkContext("node"))
    shown = repr(c) + str(c) + repr(sink) + c.model_dump_json()
    assert "tok-123" not in shown and "sec-456" not in shown


def test_secret_and_secret_file_exclusive(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("x")
    assert "secret and secret_file" in error_of(secret="a", secret_file=str(tmp_path / "s"))
    assert "secret_file: cannot read" in error_of(secret_file=str(tmp_path / "missing"))


def test_errors_name_the_url_without_credentials_or_query() -> None:
    c = make(url="https://user:pw@example.com:8443/p/hook?token=abc", headers={"X-Key": "v9"})
    where = WebhookSink("w", c)._where
    assert where == "POST https://example.com:8443/p/hook"


def test_yaml_style_settings_accept_a_webhook(tmp_path: Path) -> None:
    s = settings_model()(
        state_dir=tmp_path,
        sinks=[
            {
                "type": "webhook",
                "url": URL,
                "mode": "batch",
                "max_batch": 50,
                "filter": {"actions": ["prune"], "min_reclaimed_bytes": 1024},
            }
        ],
    )
    sink = s.sinks[0]
    assert isinstance(sink, WebhookSinkConfig)
    assert sink.mode == "batch" and sink.max_batch == 50
    assert sink.filter.min_reclaimed_bytes == 1024


# -- signing ---------------------------------------------------------------------------------


def test_signature_format_and_value() -> None:
    header = sign(b"k", b'{"a":1}', 1700000000)
    mac = hmac.new(b"k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={mac}"
    assert verify_signature(b"k", header, b'{"a":1}', now=1700000010) == 1700000000


@pytest.mark.parametrize(
    ("secret", "body", "now", "why"),
    [
        (b"k", b'{"a":2}', 1700000000, "mismatch"),
        (b"other", b'{"a":1}', 1700000000, "mismatch"),
        (b"k", b'{"a":1}', 1700000000 + 301, "tolerance"),
        (b"k", b'{"a":1}', 1700000000 - 301, "tolerance"),
    ],
)
def test_verification_rejects_tampering_and_replay(
    secret: bytes, body: bytes, now: float, why: str
) -> None:
    header = sign(b"k", b'{"a":1}', 1700000000)
    with pytest.raises(SignatureError, match=why):
        verify_signature(secret, header, body, now=now)


# -- binary mode headers ---------------------------------------------------------------------


def test_header_values_percent_encoded_per_cloudevents_http_binding() -> None:
    assert encode_header_value("plain-ASCII_1.2") == "plain-ASCII_1.2"
    assert encode_header_value('a b"c%d') == "a%20b%22c%25d"
    assert encode_header_value("é€") == "%C3%A9%E2%82%AC"
    assert encode_header_value("a\nb") == "a%0Ab"


def test_binary_headers_carry_every_attribute() -> None:
    event = sample_events(1)[0]
    headers = binary_headers(event)
    assert headers["Content-Type"] == "application/json"
    assert {k[3:] for k in headers if k.startswith("ce-")} == set(event.attributes())
    assert headers["ce-id"] == event.id and headers["ce-specversion"] == "1.0"


# -- Retry-After and outcomes ----------------------------------------------------------------


def test_retry_after_seconds_date_and_garbage() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(" 0 ", now) == 0.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5e3"):
        assert parse_retry_after(bad, now) is None


def outcome(
    status: int, body: bytes = b"", retry_after: str | None = None, location: str | None = None
) -> Any:
    return classify(status, "Reason", "POST http://h/x", body, retry_after, location, "w")


def test_outcomes_follow_the_cloudevents_webhook_spec() -> None:
    for ok in (200, 201, 202, 204):
        assert outcome(ok) is None
    for status in (429, 503):
        err = outcome(status, retry_after="3")
        assert type(err) is RetryableSinkError and err.retry_after == 3.0
    assert outcome(503).retry_after is None
    for status in (500, 502, 504, 408):
        err = outcome(status, retry_after="3")
        assert type(err) is RetryableSinkError and err.retry_after is None
    assert type(outcome(410)) is SinkStoppedError
    for status in (400, 401, 403, 404, 413, 422):
        assert type(outcome(status)) is PermanentSinkError


def test_permanent_error_carries_status_and_body_excerpt() -> None:
    err = outcome(422, body=b"field   'x'\n is wrong" + b"!" * 500)
    text = str(err)
    assert "422" in text and "field 'x' is wrong" in text
    assert len(text) < 300


def test_redirect_is_permanent_and_says_so() -> None:
    err = outcome(302, location="https://u:p@elsewhere/x?sig=1")
    assert type(err) is PermanentSinkError
    assert "not followed" in str(err) and "https://elsewhere/x" in str(err)
    assert "sig=1" not in str(err) and "u:p" not in str(err)


def test_redact_url() -> None:
    assert redact_url("http://a:b@h:81/p?q=1#f") == "http://h:81/p"
    assert redact_url("https://[::1]/x") == "https://[::1]/x"


# -- ordering ---------------------------------------------------------------------------------


def test_chains_keep_each_actor_in_order() -> None:
    events = sample_events(60)
    groups = chains(events)
    assert sorted(i for g in groups for i in g) == list(range(60))
    for group in groups:
        assert group == sorted(group)
        keys = {(events[i].ce.data.type, events[i].ce.data.actor.id) for i in group}
        assert len(keys) == 1
    assert len(groups) > 1


async def test_send_before_start_and_after_close_raise() -> None:
    sink = make().build(SinkContext("n"))
    with pytest.raises(RetryableSinkError):
        await sink.send(sample_events(1))
    await sink.start()
    await sink.aclose()
    with pytest.raises(PermanentSinkError):
        await sink.send(sample_events(1))
    with pytest.raises(PermanentSinkError):
        await sink.start()


def test_nothing_logged_on_build(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    make(secret="zz-secret", bearer_token="zz-token").build(SinkContext("n"))
    assert "zz-" not in caplog.text
