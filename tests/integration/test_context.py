"""`data.context` from a real engine: containers created with the labels Docker Compose and the
kubelet (through cri-dockerd) set, a hostile project name and a container number that is no
number among them. Their events reach a real Mosquitto through a topic template of the context
fields, a second MQTT sink routes only one Compose project, and the opt-in metrics count them.
`docker compose` cannot run here (no registry): the labels are Compose's own, set with
`docker create --label` / `docker run --label`."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay import plugins
from relay.names import mqtt_topic_level
from relay.router import RouteFilter
from relay.schema import Event
from tests.harness import Mosquitto, PrivateEngine, async_wait_for
from tests.integration.test_mqtt_sink import Received, Subscriber
from tests.relay_harness import Recorder, relay_settings, running_relay
from tests.scenarios import ensure_busybox

pytestmark = pytest.mark.integration

COMPOSE = "com.docker.compose"
K8S = "io.kubernetes"


@dataclass
class Container:
    name: str
    labels: dict[str, str]
    context: dict[str, Any] | None  # what data.context must be; None: no context at all
    levels: tuple[str, ...]  # the context levels of the ctx sink's topic, as escaped
    run: bool = False  # `docker run` (create, attach, start, die...) rather than `create`


@dataclass
class Scenario:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        t = self.tag
        self.project_a = f"shop{t}"
        # Hostile: MQTT's separator and wildcards in the project, a newline in the service.
        self.project_b = f"b/{t}+#"
        self.namespace = f"ns-{t}"
        compose_a = {
            f"{COMPOSE}.project": self.project_a,
            f"{COMPOSE}.service": "web",
            f"{COMPOSE}.oneoff": "False",
            f"{COMPOSE}.version": "2.29.1",
            f"{COMPOSE}.config-hash": "9f1c",
        }
        pod = {
            f"{K8S}.pod.name": "web-0",
            f"{K8S}.pod.namespace": self.namespace,
            f"{K8S}.pod.uid": "1f2e3d4c-0000-4000-8000-000000000001",
        }
        self.containers = [
            Container(
                f"{t}-a1",
                {**compose_a, f"{COMPOSE}.container-number": "1"},
                {
                    "compose": {
                        "project": self.project_a,
                        "service": "web",
                        "number": 1,
                        "oneoff": False,
                    }
                },
                (self.project_a, "web", "1", "-", "-", "-"),
                run=True,
            ),
            Container(
                f"{t}-a2",
                {**compose_a, f"{COMPOSE}.container-number": "2"},
                {
                    "compose": {
                        "project": self.project_a,
                        "service": "web",
                        "number": 2,
                        "oneoff": False,
                    }
                },
                (self.project_a, "web", "2", "-", "-", "-"),
            ),
            Container(
                f"{t}-b1",
                {
                    f"{COMPOSE}.project": self.project_b,
                    f"{COMPOSE}.service": "new\nline",
                    f"{COMPOSE}.container-number": "x",
                    f"{COMPOSE}.oneoff": "True",
                },
                {"compose": {"project": self.project_b, "service": "new\nline", "oneoff": True}},
                (f"b_{t}__", "new%0Aline", "-", "-", "-", "-"),
            ),
            Container(
                f"{t}-k1",
                {**pod, f"{K8S}.container.name": "app", f"{K8S}.docker.type": "container"},
                {"kubernetes": {"namespace": self.namespace, "pod": "web-0", "container": "app"}},
                ("-", "-", "-", self.namespace, "web-0", "app"),
            ),
            Container(
                f"{t}-k0",
                {**pod, f"{K8S}.container.name": "POD", f"{K8S}.docker.type": "podsandbox"},
                {"kubernetes": {"namespace": self.namespace, "pod": "web-0", "container": "POD"}},
                ("-", "-", "-", self.namespace, "web-0", "POD"),
            ),
            Container(f"{t}-plain", {"app": "web"}, None, ("-",) * 6),
        ]
        self.by_name = {c.name: c for c in self.containers}

    def create(self, engine: PrivateEngine) -> None:
        for c in self.containers:
            args = [a for k, v in c.labels.items() for a in ("--label", f"{k}={v}")]
            verb = ("run",) if c.run else ("create",)
            engine.cli(
                *verb, "--name", c.name, *args, "--network", "none", "busybox:latest", "true"
            )
        engine.cli("rm", *(c.name for c in self.containers))

    def clean(self, engine: PrivateEngine) -> None:
        engine.cli("rm", "-f", *(c.name for c in self.containers), check=False)

    def ours(self, events: list[Event]) -> list[Event]:
        """Events whose subject is one of our containers, in the order read."""
        return [e for e in events if e.ce.subject in self.by_name]

    def read_all(self, events: list[Event]) -> bool:
        destroyed = {e.ce.subject for e in self.ours(events) if e.ce.data.action == "destroy"}
        return destroyed == set(self.by_name)


def _user(message: Received) -> dict[str, str]:
    return dict(message.user_properties)


async def test_context_through_templates_routes_and_metrics(
    engine: PrivateEngine, mosquitto_fresh: Mosquitto, tmp_path: Path
) -> None:
    await asyncio.to_thread(ensure_busybox, engine)
    sc = Scenario()
    ctx_root, only_root = f"ctx-{sc.tag}", f"only-{sc.tag}"
    mqtt = {"type": "mqtt", "host": "127.0.0.1", "port": mosquitto_fresh.port, "status_topic": ""}
    settings = relay_settings(
        engine.docker_host,
        tmp_path,
        sinks=[
            {
                **mqtt,
                "name": "ctx",
                "topic": ctx_root + "/{compose_project}/{compose_service}/{compose_number}"
                "/{k8s_namespace}/{k8s_pod}/{k8s_container}/{action}",
            },
            {
                **mqtt,
                "name": "only-a",
                "topic": only_root + "/{actor_name}/{action}",
                "filter": {"compose_projects": [sc.project_a]},
            },
        ],
        metrics={"context": ["compose_project", "k8s_namespace"]},
    )
    recorder = Recorder()
    sinks = [*plugins.build_sinks(settings), (recorder, RouteFilter())]
    ctx_sub = Subscriber(mosquitto_fresh.port, f"{ctx_root}/#")
    only_sub = Subscriber(mosquitto_fresh.port, f"{only_root}/#")
    try:
        async with running_relay(settings, sinks) as relay:
            await asyncio.to_thread(sc.create, engine)
            await async_wait_for(
                lambda: sc.read_all(recorder.events), 60, message="every destroy read"
            )
            ours = sc.ours(recorder.events)

            def ctx_ours() -> list[Received]:
                return [m for m in ctx_sub.snapshot() if _user(m).get("subject") in sc.by_name]

            await async_wait_for(
                lambda: [_user(m)["id"] for m in ctx_ours()] == [e.id for e in ours],
                60,
                message="the ctx sink delivered every event of our containers, in order",
            )
            project_a = [
                e
                for e in recorder.events
                if e.ce.data.context is not None
                and e.ce.data.context.compose is not None
                and e.ce.data.context.compose.project == sc.project_a
            ]
            await async_wait_for(
                lambda: [_user(m)["id"] for m in only_sub.snapshot()] == [e.id for e in project_a],
                60,
                message="the only-a sink delivered project A's events and nothing else",
            )
            metrics = relay.metrics.registry
            compose_counts = {
                (s.labels["project"], s.labels["type"], s.labels["action"]): s.value
                for f in metrics.collect()
                for s in f.samples
                if s.name == "relay_compose_events_total"
            }
            kube_counts = {
                (s.labels["namespace"], s.labels["type"], s.labels["action"]): s.value
                for f in metrics.collect()
                for s in f.samples
                if s.name == "relay_kubernetes_events_total"
            }
    finally:
        ctx_sub.close()
        only_sub.close()
        await asyncio.to_thread(sc.clean, engine)

    # -- data.context, exactly, on every event of every container, as the sink's payload -------
    by_container: dict[str, list[str]] = {name: [] for name in sc.by_name}
    for event, message in zip(ours, ctx_ours(), strict=True):
        c = sc.by_name[event.ce.subject or ""]
        by_container[c.name].append(event.ce.data.action)
        doc = message.structured()
        assert doc["id"] == event.id
        assert doc["data"].get("context") == c.context, c.name
        assert doc["data"]["actor"]["labels"] == c.labels, c.name
        # The template's levels: the context as escaped, then the action.
        assert message.topic == "/".join(
            (ctx_root, *c.levels, mqtt_topic_level(doc["data"]["action"]))
        )
        assert json.loads(event.data_json()) == doc["data"]
        if c.context is None:
            assert b'"context"' not in event.json()
    for name, actions in by_container.items():
        c = sc.by_name[name]
        assert actions[0] == "create" and actions[-1] == "destroy", (name, actions)
        assert ("start" in actions and "die" in actions) == c.run, (name, actions)
    assert sc.by_name[f"{sc.tag}-b1"].levels[0] == mqtt_topic_level(sc.project_b)

    # -- the route kept project A's events, and only those ----------------------------------
    only = only_sub.snapshot()
    assert [m.topic for m in only] == [
        f"{only_root}/{e.ce.subject}/{e.ce.data.action}" for e in project_a
    ]
    assert {e.ce.subject for e in project_a} == {f"{sc.tag}-a1", f"{sc.tag}-a2"}
    assert [e.ce.data.action for e in project_a if e.ce.subject == f"{sc.tag}-a2"] == [
        "create",
        "destroy",
    ]
    # a1 ran: its network events (no labels, so no context) stayed out.
    assert all(e.ce.data.type == "container" for e in project_a)
    assert any(e.ce.data.type == "network" for e in recorder.events)

    # -- the opt-in metrics counted each project and namespace by action --------------------
    def expected(key: str) -> dict[tuple[str, str, str], float]:
        counts: dict[tuple[str, str, str], float] = {}
        for e in recorder.events:
            ctx = e.ce.data.context
            part = None if ctx is None else getattr(ctx, key)
            if part is None:
                continue
            name = part.project if key == "compose" else part.namespace
            k = (name, e.ce.data.type, e.ce.data.action)
            counts[k] = counts.get(k, 0) + 1
        return counts

    assert compose_counts == expected("compose")
    assert compose_counts[(sc.project_a, "container", "create")] == 2
    assert compose_counts[(sc.project_b, "container", "destroy")] == 1
    assert kube_counts == expected("kubernetes")
    assert kube_counts == {
        (sc.namespace, "container", "create"): 2,
        (sc.namespace, "container", "destroy"): 2,
    }
