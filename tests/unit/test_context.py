"""`data.context` from Compose and Kubernetes labels: the normalizer, hostile values, the
schema, templates, routes and the opt-in metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from relay.errors import ConfigError
from relay.metrics import MAX_NAME_CHARS, OTHER, Metrics
from relay.names import kafka_topic, kafka_topic_part, mqtt_topic_level
from relay.normalize import Normalizer
from relay.plugins import load as load_settings
from relay.router import RouteFilter
from relay.schema import MAX_COMPOSE_NUMBER, Compose, Context, Engine, Event, Kubernetes
from relay.template import CONTEXT_FIELDS, EVENT_FIELDS, Template, event_fields
from tests.contract import fixture_lines

ENGINE = Engine(id="E:1", name="node-a", version="28.5.2", api_version="1.51")
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "event-v1.schema.json"
RECORDINGS = ("engine-20.10.24-events.jsonl", "engine-28.5.2-events.jsonl")
PODMAN = "podman-4.3.1-events.jsonl"

# What Compose v2 puts on a service's container (compose 2.29), beside labels of its own.
COMPOSE_LABELS = {
    "com.docker.compose.config-hash": "9f1c",
    "com.docker.compose.container-number": "2",
    "com.docker.compose.depends_on": "",
    "com.docker.compose.image": "sha256:3f57",
    "com.docker.compose.oneoff": "False",
    "com.docker.compose.project": "shop",
    "com.docker.compose.project.config_files": "/srv/shop/compose.yaml",
    "com.docker.compose.project.working_dir": "/srv/shop",
    "com.docker.compose.service": "web",
    "com.docker.compose.version": "2.29.1",
}
# What the kubelet puts on a pod's container through cri-dockerd.
K8S_LABELS = {
    "annotation.io.kubernetes.container.restartCount": "0",
    "io.kubernetes.container.logpath": "/var/log/pods/prod_web-0_1f/app/0.log",
    "io.kubernetes.container.name": "app",
    "io.kubernetes.docker.type": "container",
    "io.kubernetes.pod.name": "web-0",
    "io.kubernetes.pod.namespace": "prod",
    "io.kubernetes.pod.uid": "1f2e3d4c-0000-4000-8000-000000000001",
    "io.kubernetes.sandbox.id": "5a6b",
}


def message(labels: dict[str, Any], type_: str = "container", action: str = "start") -> bytes:
    attributes = {"image": "busybox:latest", "name": "shop-web-2", **labels}
    return json.dumps(
        {
            "Type": type_,
            "Action": action,
            "Actor": {"ID": "c" * 64, "Attributes": attributes},
            "scope": "local",
            "time": 1796010769,
            "timeNano": 1796010769185213078,
        }
    ).encode()


def event(labels: dict[str, Any], **kw: str) -> Event:
    return Event(Normalizer(ENGINE).normalize(message(labels, **kw)))


def data_of(labels: dict[str, Any], **kw: str) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.json.decode(event(labels, **kw).json())
    return doc["data"]  # type: ignore[no-any-return]


# -- the normalizer ---------------------------------------------------------------------------


def test_compose_labels_give_the_compose_context() -> None:
    data = data_of({**COMPOSE_LABELS, "app": "web"})
    assert data["context"] == {
        "compose": {"project": "shop", "service": "web", "number": 2, "oneoff": False}
    }
    # The labels stay as they were, every one of them.
    assert data["actor"]["labels"] == {**COMPOSE_LABELS, "app": "web"}


def test_a_compose_run_container_is_a_oneoff() -> None:
    labels = {**COMPOSE_LABELS, "com.docker.compose.oneoff": "True"}
    labels["com.docker.compose.container-number"] = "1"
    assert data_of(labels)["context"]["compose"] == {
        "project": "shop",
        "service": "web",
        "number": 1,
        "oneoff": True,
    }


def test_cri_dockerd_labels_give_the_kubernetes_context() -> None:
    data = data_of(K8S_LABELS)
    assert data["context"] == {
        "kubernetes": {"namespace": "prod", "pod": "web-0", "container": "app"}
    }
    assert data["actor"]["labels"] == K8S_LABELS


def test_a_pod_sandbox_is_the_container_POD() -> None:
    labels = {
        "io.kubernetes.container.name": "POD",
        "io.kubernetes.docker.type": "podsandbox",
        "io.kubernetes.pod.name": "web-0",
        "io.kubernetes.pod.namespace": "prod",
    }
    assert data_of(labels)["context"] == {
        "kubernetes": {"namespace": "prod", "pod": "web-0", "container": "POD"}
    }


def test_both_contexts_at_once_and_the_context_is_last() -> None:
    ev = event({**COMPOSE_LABELS, **K8S_LABELS})
    ctx = ev.ce.data.context
    assert ctx == Context(
        compose=Compose(project="shop", service="web", number=2, oneoff=False),
        kubernetes=Kubernetes(namespace="prod", pod="web-0", container="app"),
    )
    body = ev.json()
    assert body.endswith(
        b',"context":{"compose":{"project":"shop","service":"web","number":2,"oneoff":false},'
        b'"kubernetes":{"namespace":"prod","pod":"web-0","container":"app"}}}}'
    )


def test_only_the_labels_that_are_there() -> None:
    assert data_of({"com.docker.compose.project": "p"})["context"] == {"compose": {"project": "p"}}
    assert data_of({"io.kubernetes.pod.name": "w"})["context"] == {"kubernetes": {"pod": "w"}}
    # Without the project (or the pod), the other labels make no context.
    rest = {k: v for k, v in COMPOSE_LABELS.items() if k != "com.docker.compose.project"}
    rest |= {k: v for k, v in K8S_LABELS.items() if k != "io.kubernetes.pod.name"}
    data = data_of(rest)
    assert "context" not in data and data["actor"]["labels"] == rest


def test_the_context_comes_from_labels_only() -> None:
    # On a volume or network event every key is the engine's attribute, not a label; a prune
    # has no actor.
    keys = {"com.docker.compose.project": "shop", "io.kubernetes.pod.name": "w", "driver": "local"}
    for type_, action in (("volume", "create"), ("network", "create"), ("container", "prune")):
        data = data_of(keys, type_=type_, action=action)
        assert "context" not in data and data["actor"]["labels"] == {}, type_


def test_image_labels_give_a_context_too() -> None:
    data = data_of({"com.docker.compose.project": "shop"}, type_="image", action="tag")
    assert data["context"] == {"compose": {"project": "shop"}}


@pytest.mark.parametrize("recording", [*RECORDINGS, PODMAN])
def test_recorded_events_have_no_context(recording: str) -> None:
    n = Normalizer(ENGINE, flavour="podman" if recording == PODMAN else "docker")
    lines = fixture_lines(recording)
    assert lines
    for line in lines:
        ev = Event(n.normalize(line))
        assert ev.ce.data.context is None
        assert b'"context"' not in ev.json() and b'"context"' not in ev.data_json()


def test_an_event_without_context_encodes_as_before_byte_for_byte() -> None:
    # The README's example as version 1 encoded it before `context` existed (what a spool or a
    # consumer holds): read back and encoded again, it is the same bytes.
    before = (
        b'{"specversion":"1.0","id":"5b096341f5ca8e296aa78a002ab031d8",'
        b'"source":"urn:docker:engine:E:1","type":"dev.docker-event-relay.container.die",'
        b'"subject":"web2","time":"2026-11-30T03:52:49.185213078Z",'
        b'"datacontenttype":"application/json","dataschema":"urn:docker-event-relay:schema:v1",'
        b'"data":{"type":"container","action":"die","scope":"local",'
        b'"time":"2026-11-30T03:52:49.185213078Z","time_nano":1796010769185213078,'
        b'"actor":{"id":"a502","name":"web2","attributes":{"exitCode":"137","image":"busybox",'
        b'"name":"web2"},"labels":{"app":"web"}},"engine":{"id":"E:1","name":"node-a",'
        b'"version":"28.5.2","api_version":"1.51","node_name":"node-a"}}}'
    )
    ev = Event.from_json(before, 1)
    assert ev.ce.data.context is None
    assert Event(ev.ce).json() == before


def test_a_context_survives_the_spools_round_trip() -> None:
    labels = {**COMPOSE_LABELS, **K8S_LABELS}
    labels["com.docker.compose.container-number"] = str(MAX_COMPOSE_NUMBER)
    ev = event(labels)
    back = Event.from_json(ev.json(), 7)
    assert back.ce == ev.ce and back.ce.data.context is not None
    assert back.ce.data.context.compose == Compose(
        project="shop", service="web", number=MAX_COMPOSE_NUMBER, oneoff=False
    )


# -- hostile labels ---------------------------------------------------------------------------

HOSTILE_TEXT = [
    "",
    "ctl\x01name",
    "new\nline",
    "$SYS",
    "+/#",
    "../..",
    "{type}",
    '"quoted"\\',
    "\u202eevil",
    "w\U0001f600b",
    "x" * 100_000,
]


@pytest.mark.parametrize("text", HOSTILE_TEXT, ids=range(len(HOSTILE_TEXT)))
def test_hostile_values_are_kept_exactly_and_escaped_in_topics(text: str) -> None:
    labels = {
        "com.docker.compose.project": text,
        "com.docker.compose.service": text,
        "io.kubernetes.pod.name": text,
        "io.kubernetes.pod.namespace": text,
        "io.kubernetes.container.name": text,
    }
    ev = event(labels)
    assert ev.ce.data.context == Context(
        compose=Compose(project=text, service=text),
        kubernetes=Kubernetes(namespace=text, pod=text, container=text),
    )
    doc = msgspec.json.decode(ev.json())
    jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).validate(doc)
    mqtt = Template(
        "docker/{compose_project}/{k8s_namespace}/{k8s_pod}/{action}", escape=mqtt_topic_level
    )
    levels = mqtt.render(ev).split("/")
    assert len(levels) == 5 and levels[0] == "docker" and levels[-1] == "start"
    assert levels[1:4] == [mqtt_topic_level(text)] * 3
    kafka = Template(
        "docker.{compose_project}.{k8s_namespace}", escape=kafka_topic_part, finish=kafka_topic
    )
    topic = kafka.render(ev)
    assert topic.startswith("docker.") and len(topic) <= 249
    assert set(topic) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("1", 1),
        ("0", 0),
        ("007", 7),
        (str(MAX_COMPOSE_NUMBER), MAX_COMPOSE_NUMBER),
        (str(MAX_COMPOSE_NUMBER + 1), None),
        ("", None),
        ("x", None),
        ("-1", None),
        (" 1", None),
        ("1 ", None),
        ("1_0", None),
        ("1e3", None),
        ("1.0", None),
        ("\u0661", None),  # ARABIC-INDIC DIGIT ONE: int() would take it
        ("\uff11", None),  # FULLWIDTH DIGIT ONE
        ("9" * 5000, None),
        (3, 3),  # not a string: kept as its JSON text "3", which is a number
        (True, None),
    ],
)
def test_a_container_number_that_is_no_number_is_left_out(
    number: object, expected: int | None
) -> None:
    labels = {"com.docker.compose.project": "p", "com.docker.compose.container-number": number}
    data = data_of(labels)
    compose = data["context"]["compose"]
    assert compose.get("number") == expected
    assert ("number" in compose) == (expected is not None)
    # The label keeps the text whatever it is.
    kept = number if isinstance(number, str) else json.dumps(number)
    assert data["actor"]["labels"]["com.docker.compose.container-number"] == kept
    assert event_fields(event(labels))["compose_number"] == (
        "" if expected is None else str(expected)
    )


@pytest.mark.parametrize(
    ("oneoff", "expected"),
    [
        ("True", True),
        ("true", True),
        ("False", False),
        ("false", False),
        ("TRUE", None),
        ("yes", None),
        ("1", None),
        ("", None),
        (" True", None),
    ],
)
def test_oneoff_is_a_flag_only_as_compose_writes_it(oneoff: str, expected: bool | None) -> None:
    data = data_of({"com.docker.compose.project": "p", "com.docker.compose.oneoff": oneoff})
    assert data["context"]["compose"].get("oneoff", None) is expected


def test_the_schema_says_what_number_and_oneoff_are() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    defs = schema["$defs"]
    assert "context" in defs["EventData"]["properties"]
    assert "context" not in defs["EventData"]["required"]
    assert defs["Context"].get("required", []) == []
    assert defs["Compose"]["required"] == ["project"]
    assert defs["Kubernetes"]["required"] == ["pod"]
    number = defs["Compose"]["properties"]["number"]["anyOf"][0]
    assert number["type"] == "integer"
    assert number["minimum"] == 0 and number["maximum"] == MAX_COMPOSE_NUMBER
    assert "not 1 to 9 ASCII digits" in number["description"]
    assert "True/true or False/false" in defs["Compose"]["properties"]["oneoff"]["description"]
    validator = jsonschema.Draft202012Validator(schema)
    doc = msgspec.json.decode(event({**COMPOSE_LABELS, **K8S_LABELS}).json())
    validator.validate(doc)
    doc["data"]["context"]["compose"]["number"] = "2"
    assert not validator.is_valid(doc)
    del doc["data"]["context"]["compose"]["number"]
    del doc["data"]["context"]["kubernetes"]["pod"]
    assert not validator.is_valid(doc)


# -- templates --------------------------------------------------------------------------------


def test_template_fields_from_the_context() -> None:
    values = event_fields(event({**COMPOSE_LABELS, **K8S_LABELS}))
    assert {f: values[f] for f in CONTEXT_FIELDS} == {
        "compose_project": "shop",
        "compose_service": "web",
        "compose_number": "2",
        "k8s_namespace": "prod",
        "k8s_pod": "web-0",
        "k8s_container": "app",
    }
    assert set(values) == EVENT_FIELDS


def test_template_fields_are_empty_without_context() -> None:
    for labels in ({}, {"app": "web"}, {"com.docker.compose.service": "web"}):
        ev = event(labels)
        assert set(event_fields(ev)) == EVENT_FIELDS
        assert {f: event_fields(ev)[f] for f in CONTEXT_FIELDS} == dict.fromkeys(CONTEXT_FIELDS, "")
        # A template of some fields gets exactly those.
        some = frozenset({"action", "compose_project", "k8s_pod"})
        assert event_fields(ev, some) == {"action": "start", "compose_project": "", "k8s_pod": ""}
    partial = event({"io.kubernetes.pod.name": "w"})
    assert event_fields(partial, frozenset({"k8s_namespace", "k8s_pod", "k8s_container"})) == {
        "k8s_namespace": "",
        "k8s_pod": "w",
        "k8s_container": "",
    }


def test_mqtt_levels_of_absent_context_are_a_dash() -> None:
    t = Template(
        "docker/{compose_project}/{compose_service}/{k8s_namespace}/{action}",
        escape=mqtt_topic_level,
    )
    assert t.render(event(COMPOSE_LABELS)) == "docker/shop/web/-/start"
    assert t.render(event({})) == "docker/-/-/-/start"
    assert t.render(event(K8S_LABELS)) == "docker/-/-/prod/start"


def test_kafka_topic_from_the_context() -> None:
    t = Template(
        "docker.{compose_project}.{compose_service}", escape=kafka_topic_part, finish=kafka_topic
    )
    assert t.render(event(COMPOSE_LABELS)) == "docker.shop.web"
    assert t.render(event({})) == "docker.."


# -- routes -----------------------------------------------------------------------------------


def _route(**filter_: Any) -> list[str]:
    f = RouteFilter(**filter_)
    cases = {
        "shop": event({"com.docker.compose.project": "shop"}),
        "blog": event({"com.docker.compose.project": "blog"}),
        "prod": event({"io.kubernetes.pod.name": "w", "io.kubernetes.pod.namespace": "prod"}),
        "dev": event({"io.kubernetes.pod.name": "w", "io.kubernetes.pod.namespace": "dev"}),
        "pod-no-ns": event({"io.kubernetes.pod.name": "w"}),
        "both": event(
            {
                "com.docker.compose.project": "shop",
                "io.kubernetes.pod.namespace": "prod",
                "io.kubernetes.pod.name": "w",
            }
        ),
        "none": event({"app": "web"}),
        "volume": event({"com.docker.compose.project": "shop"}, type_="volume", action="create"),
    }
    return [name for name, ev in cases.items() if f.matches(ev)]


def test_route_by_compose_project() -> None:
    assert _route(compose_projects={"shop"}) == ["shop", "both"]
    assert _route(compose_projects={"shop", "blog"}) == ["shop", "blog", "both"]
    assert _route(exclude_compose_projects={"shop"}) == [
        "blog",
        "prod",
        "dev",
        "pod-no-ns",
        "none",
        "volume",
    ]


def test_route_by_kubernetes_namespace() -> None:
    assert _route(k8s_namespaces={"prod"}) == ["prod", "both"]
    assert _route(exclude_k8s_namespaces={"prod"}) == [
        "shop",
        "blog",
        "dev",
        "pod-no-ns",
        "none",
        "volume",
    ]


def test_context_conditions_combine_with_the_others() -> None:
    assert _route(compose_projects={"shop"}, k8s_namespaces={"prod"}) == ["both"]
    assert _route(compose_projects={"shop"}, exclude_k8s_namespaces={"prod"}) == ["shop"]
    assert _route(compose_projects={"shop"}, types={"volume"}) == []
    assert _route(compose_projects={"shop"}, labels={"com.docker.compose.project": "shop"}) == [
        "shop",
        "both",
    ]
    assert not RouteFilter(compose_projects={"shop"}).is_catch_all
    assert RouteFilter(compose_projects=[]).is_catch_all


def test_route_filter_options_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "sinks:\n  - type: stdout\n    filter:\n      compose_projects: [shop]\n"
        "      exclude_k8s_namespaces: [kube-system]\n"
    )
    s = load_settings(path)
    f = s.sinks[0].filter
    assert f.compose_projects == {"shop"} and f.exclude_k8s_namespaces == {"kube-system"}
    path.write_text("sinks:\n  - type: stdout\n    filter:\n      compose_project: [shop]\n")
    with pytest.raises(ConfigError, match="compose_project"):
        load_settings(path)


# -- metrics ----------------------------------------------------------------------------------


def _read(metrics: Metrics, *events: Event) -> None:
    for ev in events:
        data = ev.ce.data
        metrics.read(data.type, data.action, data.reclaimed_bytes, data.context)


def _samples(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sample.labels.values())] = sample.value
    return out


def test_context_metrics_are_off_by_default() -> None:
    metrics = Metrics()
    _read(metrics, event({**COMPOSE_LABELS, **K8S_LABELS}))
    assert _samples(metrics, "relay_compose_events_total") == {}
    assert _samples(metrics, "relay_kubernetes_events_total") == {}
    assert _samples(metrics, "relay_events_read_total") == {("container", "start"): 1}


def test_context_metrics_count_per_project_and_namespace() -> None:
    metrics = Metrics()
    metrics.count_context({"compose_project", "k8s_namespace"}, 100)
    _read(
        metrics,
        event({**COMPOSE_LABELS, **K8S_LABELS}),
        event(COMPOSE_LABELS, action="die"),
        event(COMPOSE_LABELS, action="die"),
        event({"io.kubernetes.pod.name": "w"}),  # no namespace: not counted by one
        event({"app": "web"}),
    )
    assert _samples(metrics, "relay_compose_events_total") == {
        ("shop", "container", "start"): 1,
        ("shop", "container", "die"): 2,
    }
    assert _samples(metrics, "relay_kubernetes_events_total") == {("prod", "container", "start"): 1}
    only = Metrics()
    only.count_context({"k8s_namespace"}, 100)
    _read(only, event({**COMPOSE_LABELS, **K8S_LABELS}))
    assert _samples(only, "relay_compose_events_total") == {}
    assert _samples(only, "relay_kubernetes_events_total") == {("prod", "container", "start"): 1}


def test_context_metrics_keep_at_most_the_configured_names() -> None:
    metrics = Metrics()
    metrics.count_context({"compose_project"}, 3)
    projects = [f"p{i}" for i in range(50)] + [
        "p0",
        "",
        "x" * (MAX_NAME_CHARS + 1),
        "y" * MAX_NAME_CHARS,
    ]
    _read(metrics, *(event({"com.docker.compose.project": p}) for p in projects))
    samples = _samples(metrics, "relay_compose_events_total")
    assert samples == {
        ("p0", "container", "start"): 2,
        ("p1", "container", "start"): 1,
        ("p2", "container", "start"): 1,
        (OTHER, "container", "start"): len(projects) - 4,
    }
    big = Metrics()
    big.count_context({"compose_project"}, 10)
    _read(big, *(event({"com.docker.compose.project": p}) for p in ["", "x" * 254, "y" * 253]))
    assert _samples(big, "relay_compose_events_total") == {
        (OTHER, "container", "start"): 2,
        ("y" * 253, "container", "start"): 1,
    }


def test_metrics_context_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in [k for k in os.environ if k.startswith("RELAY_")]:
        monkeypatch.delenv(key)
    assert load_settings().metrics.context == frozenset()
    monkeypatch.setenv("RELAY_METRICS__CONTEXT", '["compose_project", "k8s_namespace"]')
    monkeypatch.setenv("RELAY_METRICS__CONTEXT_MAX_VALUES", "20")
    s = load_settings()
    assert s.metrics.context == {"compose_project", "k8s_namespace"}
    assert s.metrics.context_max_values == 20
    monkeypatch.setenv("RELAY_METRICS__CONTEXT", '["compose_service"]')
    with pytest.raises(ConfigError, match=r"metrics\.context"):
        load_settings()
