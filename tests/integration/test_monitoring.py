"""The alert rules and the Grafana dashboard against a real Prometheus scraping a real relay.

A relay on a private engine, with a webhook sink (an in-test receiver) and the stdout sink,
sees volumes created and pruned; a Prometheus (Debian's, the binary operators run) scrapes it
every second with the rules file loaded. Every alert expression and every dashboard query must
evaluate, and every metric name in them must have series in that Prometheus: a name the relay
does not expose (a typo, a renamed metric) fails here. Then the rules themselves, evaluated by
Prometheus: silent for the healthy relay, firing when the destination stops the webhook sink.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from relay.router import RouteFilter
from relay.sink import SinkContext
from sinks.stdout import StdoutSink
from sinks.webhook import WebhookSinkConfig
from tests.harness import BrokerProcess, PrivateEngine, async_wait_for, wait_for
from tests.harness.receiver import Receiver
from tests.monitoring import (
    RULES,
    alert_rules,
    grouping_labels,
    load_dashboard,
    metric_names,
    panel_queries,
)
from tests.relay_harness import relay_settings, running_relay

HTTP = {"enabled": True, "host": "127.0.0.1", "port": 0}
# Dashboard panels that may legitimately show nothing on this relay: the fill ratio exists only
# for sinks with a spool limit (relay_spool_max_bytes > 0).
MAY_BE_EMPTY = {"Spool fill per sink"}


class Prometheus(BrokerProcess):
    """A real Prometheus server scraping `targets` every second, evaluating `rule_files` every
    second, its data in its working directory."""

    name = "prometheus"

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]) -> None:
        super().__init__(workdir)
        self.targets = targets
        self.rule_files = rule_files

    @property
    def url(self) -> str:
        return f"http://{self.bootstrap}"

    def prepare(self) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": "relay",
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))

    def start(self) -> None:
        """Start, and return once it serves queries: it listens before its storage is open,
        answering 503 until then."""
        super().start()
        try:
            wait_for(
                self._ready,
                self.start_timeout,
                message=f"{self.url}/-/ready (log: {self.log_path})",
            )
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:  # refused, or an HTTPError (503) while it opens its storage
            return False

    def command(self) -> list[str]:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: Debian's prometheus package (scripts/setup.sh)"
        return [
            binary,
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={self.bootstrap}",
        ]


async def api(session: aiohttp.ClientSession, prom: Prometheus, path: str, **params: str) -> Any:
    """GET a Prometheus API path; asserts the API's own status and returns its `data`."""
    async with session.get(f"{prom.url}/api/v1/{path}", params=params) as response:
        body = await response.json()
    assert body.get("status") == "success", f"{path} {params}: {body}"
    return body["data"]


async def query(session: aiohttp.ClientSession, prom: Prometheus, expr: str) -> list[Any]:
    data = await api(session, prom, "query", query=expr)
    assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
    result: list[Any] = data["result"]
    return result


async def assert_series_exist(
    session: aiohttp.ClientSession, prom: Prometheus, names: set[str], where: str
) -> None:
    assert names, f"{where}: reads no relay_* metric"
    for name in sorted(names):
        series = await api(session, prom, "series", **{"match[]": name})
        assert series, f"{where}: no series named {name} in Prometheus (not what the relay exposes)"


async def active_alerts(session: aiohttp.ClientSession, prom: Prometheus) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = (await api(session, prom, "alerts"))["alerts"]
    return alerts


async def test_every_alert_and_dashboard_query_evaluates_against_a_real_relay(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    label = f"relay-monitoring={tag}"
    async with Receiver() as receiver:
        settings = relay_settings(engine.docker_host, tmp_path / "state", http=HTTP)
        hook = WebhookSinkConfig(name="hook", url=receiver.url(), mode="batch")
        with (tmp_path / "stdout.jsonl").open("wb") as stream:
            sinks = [
                (StdoutSink("stdout", 500, stream=stream), RouteFilter()),
                (hook.build(SinkContext()), RouteFilter()),
            ]
            async with running_relay(settings, sinks) as relay:
                assert relay.http is not None and relay.http.bound_port
                port = relay.http.bound_port

                # Series for every label the queries group by: volume events, and a prune.
                for i in range(3):
                    await asyncio.to_thread(
                        engine.cli, "volume", "create", "--label", label, f"mon-{tag}-{i}"
                    )
                await asyncio.to_thread(
                    engine.cli, "volume", "prune", "--force", "--filter", f"label={label}"
                )
                await receiver.wait_for_events(
                    1, where=lambda e: e["type"].endswith("volume.prune")
                )

                # Started and stopped off the event loop: the receiver keeps answering.
                prom = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}"], [RULES])
                await asyncio.to_thread(prom.start)
                try:
                    async with aiohttp.ClientSession() as session:
                        await check_queries(session, prom)
                        await check_rules_live(session, prom, receiver, engine, tag, port)
                finally:
                    await asyncio.to_thread(prom.stop)


async def check_queries(session: aiohttp.ClientSession, prom: Prometheus) -> None:
    # Scraped after the prune, often enough for rate() over the shortest window used.
    async def scraped() -> bool:
        enough = 'count_over_time(relay_reclaimed_bytes_total{type="volume"}[1m]) >= 3'
        return bool(await query(session, prom, enough))

    await async_wait_for(scraped, 60, interval=0.2, message="Prometheus scraped the relay")

    for rule in alert_rules():
        where = f"alert {rule['alert']}"
        await query(session, prom, rule["expr"])
        await assert_series_exist(session, prom, metric_names(rule["expr"]), where)

    for q in panel_queries(load_dashboard()):
        where = f"panel {q.panel!r} {q.ref_id}"
        result = await query(session, prom, q.promql)
        await assert_series_exist(session, prom, metric_names(q.expr), where)
        if q.panel not in MAY_BE_EMPTY:
            assert result, f"{where}: no data: {q.promql}"
        # What the panel groups by and names in its legend is on every series it gets back.
        wanted = grouping_labels(q.expr) - {"le"}
        wanted |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", q.legend))
        for series in result:
            assert wanted <= series["metric"].keys(), f"{where}: {series['metric']}"

    # The sink variable's query, label_values(..., sink), offers both sinks.
    sinks = await api(session, prom, "label/sink/values")
    assert {"hook", "stdout"} <= set(sinks)


async def check_rules_live(
    session: aiohttp.ClientSession,
    prom: Prometheus,
    receiver: Receiver,
    engine: PrivateEngine,
    tag: str,
    port: int,
) -> None:
    """Prometheus evaluates every rule without error; none is active for the healthy relay;
    a sink stopped by its destination fires its alerts, with the sink and instance named."""

    async def evaluated() -> list[dict[str, Any]] | None:
        groups = (await api(session, prom, "rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = await async_wait_for(evaluated, 30, interval=0.2, message="every rule evaluated")
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [
        (r["name"], r["lastError"]) for r in rules if r["health"] != "ok"
    ]
    # Evaluated again after the scrapes the queries above saw: a healthy relay, nothing active.
    alerts = await active_alerts(session, prom)
    assert alerts == [], alerts

    receiver.fail(410)
    await asyncio.to_thread(engine.cli, "volume", "create", f"mon-{tag}-stop")

    def key(alert: dict[str, Any]) -> tuple[str, str, str, str]:
        labels = alert["labels"]
        return (
            labels["alertname"],
            labels.get("sink", ""),
            labels.get("reason", ""),
            alert["state"],
        )

    expected = {
        ("RelaySinkStopped", "hook", "", "firing"),
        ("RelayEventsDeadLettered", "hook", "sink_stopped", "firing"),
        ("RelayNotReady", "", "", "pending"),  # for: 10m
    }

    async def fired() -> list[dict[str, Any]] | None:
        alerts = await active_alerts(session, prom)
        return alerts if expected <= {key(a) for a in alerts} else None

    alerts = await async_wait_for(fired, 30, interval=0.2, message=f"alerts {sorted(expected)}")
    # Nothing else: the stop is not also a failing sink, the stdout sink is fine.
    assert {key(a) for a in alerts} == expected
    instance = f"127.0.0.1:{port}"
    stopped = next(a for a in alerts if a["labels"]["alertname"] == "RelaySinkStopped")
    assert stopped["labels"]["severity"] == "critical"
    assert stopped["annotations"]["summary"] == f"Relay {instance}: sink hook is stopped"
    assert "HTTP 410" in stopped["annotations"]["description"]
    dead = next(a for a in alerts if a["labels"]["alertname"] == "RelayEventsDeadLettered")
    assert dead["annotations"]["description"].startswith(
        f"1 event(s) for sink hook on {instance} went to the dead-letter file"
    )
