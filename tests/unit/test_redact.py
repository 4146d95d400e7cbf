"""Redaction (relay.redact): the selectors and their globs, the keyed hash, the config errors,
the exec command rule per sink, and where it is applied: the sink port's send, which hands a
sink without a rule the very objects it was given."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from relay import plugins
from relay.errors import ConfigError, PermanentSinkError
from relay.normalize import Normalizer, exec_detail
from relay.redact import (
    HASH_PREFIX,
    MIN_KEY_BYTES,
    Redaction,
    _MapRule,
    hash_value,
)
from relay.schema import Engine, Event
from relay.settings import Settings
from relay.sink import Sink
from tests.contract import fixture_lines, sample_events
from tests.unit.test_pipeline import dead_letters, drain, feed, make_worker, owes_nothing

KEY = b"k" * MIN_KEY_BYTES
OTHER_KEY = b"o" * MIN_KEY_BYTES
ENGINE = Engine(id="3VLZ:4UVA", name="vm", version="28.5.2", api_version="1.51")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("RELAY_"):
            monkeypatch.delenv(key)
    yield


def event(
    labels: dict[str, str] | None = None,
    attributes: dict[str, str] | None = None,
    action: str = "start",
    seq: int = 7,
) -> Event:
    raw = {"image": "busybox:latest", "name": "web1", **(attributes or {}), **(labels or {})}
    ce = Normalizer(ENGINE, exec_command="full").build(
        "container", action, "a502038c", raw, "local", 1796010764873861950
    )
    return Event(ce, seq)


def load(tmp_path: Path, sinks: list[dict[str, Any]], **more: Any) -> Settings:
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump({"sinks": sinks, **more}))
    return plugins.load(config)


# -- selectors and globs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "name", "matches"),
    [
        ("com.example.secret*", "com.example.secret", True),
        ("com.example.secret*", "com.example.secret.db.password", True),  # `*` crosses dots
        ("com.example.secret*", "com.example.Secret", False),  # case-sensitive
        ("com.example.secret*", "x.com.example.secret", False),  # the whole name
        ("*password*", "db_password_file", True),
        ("env", "env", True),
        ("env", "environment", False),
        ("tok?n", "token", True),
        ("tok?n", "tokn", False),
        ("[ab]*", "b.x", True),
        ("[!ab]*", "b.x", False),
        ("[]x]", "]", True),
        ("a.b", "aXb", False),  # a dot is a dot, not a regex
    ],
)
def test_globs_match_whole_names_like_fnmatchcase(glob: str, name: str, matches: bool) -> None:
    rule = _MapRule([glob], [])
    assert (rule.apply({name: "v"}, None) == {}) is matches


def test_drop_and_hash_per_map_and_drop_wins() -> None:
    redaction = Redaction(
        drop=["labels.com.example.secret*", "attributes.image"],
        hash=["labels.*owner", "labels.com.example.secret.hashed"],
        key=KEY,
    )
    original = event(
        labels={
            "com.example.secret.db": "hunter2",
            "com.example.secret.hashed": "dropped anyway",
            "com.example.owner": "ops",
            "app": "web",
        },
        attributes={"exitCode": "137"},
        action="die",
    )
    actor = redaction.event(original).ce.data.actor
    assert actor.labels == {"com.example.owner": hash_value(KEY, "ops"), "app": "web"}
    # attributes.image goes; labels.* rules never touch attributes.
    assert actor.attributes == {"name": "web1", "exitCode": "137"}
    assert actor.name == "web1"


def test_the_context_follows_the_labels_the_rule_kept() -> None:
    # data.context repeats Compose and Kubernetes labels: dropping or hashing them must not
    # leave their values there.
    labels = {
        "com.docker.compose.project": "payments",
        "com.docker.compose.service": "db",
        "io.kubernetes.pod.name": "db-0",
        "io.kubernetes.pod.namespace": "secret-team",
    }
    original = event(labels=labels)
    assert original.ce.data.context is not None
    dropped = Redaction(drop=["labels.io.kubernetes.*", "labels.com.docker.compose.service"])
    context = dropped.event(original).ce.data.context
    assert context is not None and context.kubernetes is None
    assert context.compose is not None and context.compose.project == "payments"
    assert context.compose.service is None
    hashed = Redaction(hash=["labels.com.docker.compose.project"], key=KEY)
    context = hashed.event(original).ce.data.context
    assert context is not None and context.compose is not None
    assert context.compose.project == hash_value(KEY, "payments")
    body = Redaction(drop=["labels.*"]).event(original).json()
    for value in ("payments", "secret-team", "db-0"):
        assert value.encode() not in body


def test_the_name_and_subject_are_not_redacted() -> None:
    # The actor's name is the object's identity (subject, topics, routing), not a label.
    redacted = Redaction(drop=["attributes.name", "labels.*"]).event(event(labels={"a": "b"}))
    assert redacted.ce.subject == "web1"
    assert redacted.ce.data.actor.name == "web1"
    assert "name" not in redacted.ce.data.actor.attributes
    assert redacted.ce.data.actor.labels == {}


def test_a_copy_with_its_own_encodings_and_the_original_untouched() -> None:
    original = event(labels={"com.example.secret": "hunter2", "app": "web"})
    before = original.json()
    redacted = Redaction(drop=["labels.com.example.secret"]).event(original)
    assert redacted is not original
    assert (redacted.seq, redacted.id, redacted.ce.type) == (7, original.id, original.ce.type)
    for encoded in (redacted.json(), redacted.data_json(), json.dumps(redacted.attributes())):
        assert b"hunter2" not in (encoded if isinstance(encoded, bytes) else encoded.encode())
    assert original.json() == before and b"hunter2" in original.json()
    assert msgspec.json.decode(redacted.json())["data"]["actor"]["labels"] == {"app": "web"}


def test_an_event_the_rule_does_not_touch_is_the_same_object() -> None:
    redaction = Redaction(drop=["labels.com.example.secret*"], exec_command="program")
    plain = event(labels={"app": "web"})
    assert redaction.event(plain) is plain
    prune = Event(
        Normalizer(ENGINE).build("volume", "prune", "", {"reclaimed": "5"}, "local", 1),
        1,
    )
    assert redaction.event(prune) is prune


def test_the_decision_cache_is_bounded() -> None:
    rule = _MapRule(["secret*"], [])
    for n in range(20_000):
        rule.decide(f"label-{n}")
    assert len(rule._cache) <= 4096
    assert rule.decide("secret.x") == 1


# -- the keyed hash ----------------------------------------------------------------------------


def test_the_hash_is_the_documented_hmac() -> None:
    expected = hmac.new(KEY, b"hunter2", hashlib.sha256).hexdigest()[:32]
    assert hash_value(KEY, "hunter2") == HASH_PREFIX + expected == "hmac-sha256:" + expected
    assert len(hash_value(KEY, "")) == len("hmac-sha256:") + 32
    # Non-ASCII values hash their UTF-8 bytes.
    assert (
        hash_value(KEY, "ü") == "hmac-sha256:" + hmac.digest(KEY, b"\xc3\xbc", "sha256").hex()[:32]
    )


def test_the_hash_is_stable_and_keyed() -> None:
    # Stable: across rules and runs (a literal, computed once outside the relay), and equal
    # values under different names hash alike, so destinations can correlate.
    a = Redaction(hash=["labels.owner", "labels.team_owner"], key=KEY)
    out = a.event(event(labels={"owner": "ops", "team_owner": "ops"})).ce.data.actor.labels
    assert out["owner"] == out["team_owner"] == hash_value(KEY, "ops")
    assert (
        hash_value(b"0" * 32, "ops")
        == "hmac-sha256:" + (hmac.new(b"0" * 32, b"ops", hashlib.sha256).hexdigest()[:32])
    )
    # Keyed: another key, another hash; and not the unkeyed SHA-256 anyone can recompute.
    assert hash_value(OTHER_KEY, "ops") != hash_value(KEY, "ops")
    assert hash_value(KEY, "ops")[12:] != hashlib.sha256(b"ops").hexdigest()[:32]


async def test_hash_values_are_not_hashed_twice_by_a_subclass_calling_super() -> None:
    class Base(Recording):
        pass

    class Child(Base):
        async def send(self, batch: Sequence[Event]) -> None:
            await super().send(batch)

    sink = Child()
    sink.redaction = Redaction(hash=["labels.owner"], key=KEY)
    await sink.start()
    await sink.send([event(labels={"owner": "ops"})])
    assert sink.received[0].ce.data.actor.labels == {"owner": hash_value(KEY, "ops")}


# -- configuration -----------------------------------------------------------------------------


GOOD_KEY = "0123456789abcdef" * 2


@pytest.mark.parametrize(
    ("redact", "setting", "says"),
    [
        ({"drop": ["label.x"]}, "sinks[0].redact.drop[0]", "labels.<name or glob>"),
        ({"drop": ["labels.a", "env"]}, "sinks[0].redact.drop[1]", "a selector is"),
        ({"hash": ["data.x"], "key": GOOD_KEY}, "sinks[0].redact.hash[0]", "a selector is"),
        ({"drop": ["labels."]}, "sinks[0].redact.drop[0]", "no name or glob"),
        ({"drop": ["labels.secret[0-9"]}, "sinks[0].redact.drop[0]", "unclosed '['"),
        ({"drop": ["attributes.[!]"]}, "sinks[0].redact.drop[0]", "unclosed '['"),
        ({"hash": ["labels.owner"]}, "sinks[0].redact", "hash: needs key or key_file"),
        ({"hash": ["labels.owner"], "key": "short"}, "sinks[0].redact", "key: 5 bytes"),
        (
            {"drop": ["labels.a"], "hash": ["labels.a"], "key": GOOD_KEY},
            "sinks[0].redact",
            "'labels.a' is in both",
        ),
        ({"exec_command": "args"}, "sinks[0].redact.exec_command", "'full', 'program' or 'none'"),
        ({"dropp": ["labels.a"]}, "sinks[0].redact.dropp", "Extra inputs"),
    ],
)
def test_bad_rules_are_config_errors_naming_the_setting(
    tmp_path: Path, redact: dict[str, Any], setting: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, [{"type": "stdout", "redact": redact}])
    assert caught.value.setting == setting
    assert says in caught.value.message


def test_key_and_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(GOOD_KEY + "\n")
    key_file.chmod(0o400)
    sink = {"type": "stdout", "redact": {"hash": ["labels.owner"], "key_file": str(key_file)}}
    settings = load(tmp_path, [sink])
    [(built, _)] = plugins.build_sinks(settings)
    assert built.redaction is not None
    labels = built.redaction.event(event(labels={"owner": "ops"})).ce.data.actor.labels
    assert labels == {"owner": hash_value(GOOD_KEY.encode(), "ops")}  # without the newline
    both = {**sink, "redact": {**sink["redact"], "key": GOOD_KEY}}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="key and key_file: set only one"):
        load(tmp_path, [both])
    key_file.chmod(0o600)
    key_file.write_text("\n")
    with pytest.raises(ConfigError, match=r"key_file: .* is empty"):
        load(tmp_path, [sink])


def test_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "RELAY_SINKS",
        json.dumps([{"type": "stdout", "redact": {"drop": ["labels.com.example.secret*"]}}]),
    )
    settings = plugins.load()
    [(built, _)] = plugins.build_sinks(settings)
    assert built.redaction is not None
    secret = event(labels={"com.example.secret": "hunter2"})
    assert built.redaction.event(secret).ce.data.actor.labels == {}


def test_the_key_is_a_secret(tmp_path: Path) -> None:
    settings = load(
        tmp_path, [{"type": "stdout", "redact": {"hash": ["labels.a"], "key": GOOD_KEY}}]
    )
    assert GOOD_KEY not in repr(settings) and GOOD_KEY not in str(settings.model_dump())


# -- the exec command rule, per sink -----------------------------------------------------------


EXEC_LINE = next(line for line in fixture_lines() if b'"exec_start: /bin/sh -c true"' in line)


def relay_view(settings: Settings) -> tuple[Normalizer, list[Sink]]:
    """The normalizer as the relay builds it (relay.app) and the sinks (relay.plugins)."""
    normalizer = Normalizer(ENGINE, exec_command=settings.kept_exec_command())
    return normalizer, [sink for sink, _ in plugins.build_sinks(settings)]


async def delivered(sink: Sink, event: Event) -> Event:
    recording = Recording()
    recording.redaction = sink.redaction
    await recording.start()
    await recording.send([event])
    return recording.received[0]


@pytest.mark.parametrize(
    ("schema", "rules", "kept", "details"),
    [
        # The global setting alone behaves as before: the normalizer keeps it, nobody redacts.
        (None, [None], "program", ["/bin/sh"]),
        ("full", [None, None], "full", ["/bin/sh -c true"] * 2),
        ("none", [None], "none", [None]),
        # Per sink: the normalizer keeps the most any sink gets; the others narrow it.
        (None, ["full", None, "none"], "full", ["/bin/sh -c true", "/bin/sh", None]),
        ("full", ["program", None], "full", ["/bin/sh", "/bin/sh -c true"]),
        ("none", [None, "program"], "program", [None, "/bin/sh"]),
    ],
)
async def test_the_exec_command_rule_per_sink(
    tmp_path: Path,
    schema: str | None,
    rules: list[str | None],
    kept: str,
    details: list[str | None],
) -> None:
    sinks = [
        {"type": "stdout", "name": f"s{n}", **({"redact": {"exec_command": r}} if r else {})}
        for n, r in enumerate(rules)
    ]
    settings = load(tmp_path, sinks, **({"schema": {"exec_command": schema}} if schema else {}))
    assert settings.kept_exec_command() == kept
    normalizer, built = relay_view(settings)
    original = Event(normalizer.normalize(EXEC_LINE), 1)
    assert original.ce.data.action_detail == exec_detail("/bin/sh -c true", kept)  # type: ignore[arg-type]
    got = [(await delivered(sink, original)).ce.data.action_detail for sink in built]
    assert got == details
    # A sink that gets what the normalizer kept has no rule at all (nothing to do per event).
    for sink, detail in zip(built, details, strict=True):
        if detail == original.ce.data.action_detail:
            assert sink.redaction is None
    # The id always hashes the engine's full action, whatever a sink receives.
    assert {(await delivered(s, original)).id for s in built} == {original.id}


def test_no_sinks_configured_uses_the_global_setting(tmp_path: Path) -> None:
    settings = load(tmp_path, [], schema={"exec_command": "none"})
    assert settings.kept_exec_command() == "none"
    [(built, _)] = plugins.build_sinks(settings)  # the default stdout sink
    assert built.redaction is None


# -- where it is applied: the sink port's send -------------------------------------------------


class Recording(Sink):
    def __init__(self) -> None:
        super().__init__("recording")
        self.received: list[Event] = []

    async def start(self) -> None:
        pass

    async def send(self, batch: Sequence[Event]) -> None:
        self.received.extend(batch)

    async def aclose(self) -> None:
        pass


async def test_a_sink_without_a_rule_gets_the_very_same_objects() -> None:
    events = sample_events(20)
    sink = Recording()
    assert sink.redaction is None
    await sink.start()
    await sink.send(events)
    assert len(sink.received) == 20
    assert all(got is sent for got, sent in zip(sink.received, events, strict=True))


async def test_a_sink_with_a_rule_gets_copies_only_of_what_it_changes() -> None:
    events = sample_events(20)  # the recording's containers carry com.example.owner
    sink = Recording()
    sink.redaction = Redaction(drop=["labels.com.example.owner"])
    await sink.start()
    await sink.send(events)
    assert [e.seq for e in sink.received] == [e.seq for e in events]
    assert [e.id for e in sink.received] == [e.id for e in events]
    touched = [e for e in events if "com.example.owner" in e.ce.data.actor.labels]
    assert touched and len(touched) < len(events)
    for got, sent in zip(sink.received, events, strict=True):
        assert b"com.example.owner" not in got.json()
        assert (got is sent) is (sent not in touched)
    # The relay's own copies (the spool's, the dead letters') keep the label.
    assert all("com.example.owner" in e.ce.data.actor.labels for e in touched)


async def test_events_read_back_from_the_spool_are_redacted_too(tmp_path: Path) -> None:
    # Beyond its window a sink's events wait in the spool, which keeps one unredacted copy for
    # every sink: redaction happens at the send, so those are redacted like the others.
    sink = Recording()
    sink.redaction = Redaction(drop=["labels.com.example.owner"])
    worker, spool, _, _ = make_worker(sink, tmp_path, window=2)
    events = sample_events(30)
    feed(worker, spool, events)
    assert worker.outbox.on_disk
    await drain(worker)
    assert [e.id for e in sink.received] == [e.id for e in events]
    assert not any(b"com.example.owner" in e.json() for e in sink.received)
    # The worker's accounting is of what the spool holds, not of the copies.
    assert owes_nothing(worker, spool) and worker.held_bytes == 0


async def test_dead_letters_keep_the_event_as_the_relay_read_it(tmp_path: Path) -> None:
    # The dead-letter file is the relay's own (0600), like the spool, and a replay goes
    # through the sink's redaction again.
    class Refusing(Recording):
        async def send(self, batch: Sequence[Event]) -> None:
            raise PermanentSinkError("no", sink=self.name)

    sink = Refusing()
    sink.redaction = Redaction(drop=["labels.com.example.owner"])
    worker, spool, dead_letter, _ = make_worker(sink, tmp_path)
    [labelled] = [e for e in sample_events(5) if "com.example.owner" in e.ce.data.actor.labels][:1]
    feed(worker, spool, [labelled])
    await drain(worker)
    dead_letter.close()
    [record] = dead_letters(tmp_path / "dl.jsonl")
    assert record["event"]["data"]["actor"]["labels"]["com.example.owner"] == "ops"


README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("value", ["ops", "", "pässword with spaces", "-n", "50%"])
def test_the_readme_command_computes_the_same_hash(value: str) -> None:
    text = README.read_text()
    marker = "<!-- snippet: redact-hash"
    assert text.count(marker) == 1
    match = re.match(r"<!--[^\n]*-->\n```sh\n(.*?)\n```\n", text[text.index(marker) :], re.DOTALL)
    assert match, "the marker must be followed by a ```sh block"
    key = "0123456789abcdef" * 2
    out = subprocess.run(
        ["bash", "-c", match.group(1)],
        env={"PATH": os.environ["PATH"], "VALUE": value, "KEY": key},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == hash_value(key.encode(), value) + "\n"
