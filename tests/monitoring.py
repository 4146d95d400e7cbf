"""What the monitoring files ship (alert rules, the PrometheusRule, the Grafana dashboard) as the
tests read them: their PromQL expressions, the metric names those reference, and the metrics the
relay declares. Shared by the unit checks and the test against a real Prometheus."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from relay.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "relay-alerts.yaml"
RULES_TEST = REPO / "deploy" / "prometheus" / "relay-alerts.test.yaml"
PROMETHEUS_RULE = REPO / "deploy" / "kubernetes" / "prometheusrule.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "docker-event-relay.json"
GENERATOR = REPO / "scripts" / "gen-prometheusrule.py"

# What Grafana puts in place of its built-in intervals before it sends a query, at values that
# suit a Prometheus scraping every second: enough samples in every window.
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
# The dashboard's variables as "All" selects them (its allValue).
GRAFANA_VARIABLES = {"instance": ".+", "sink": ".+"}
# Labels Prometheus adds to every scraped series; `le` is a histogram bucket's.
TARGET_LABELS = frozenset({"instance", "job"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_METRIC = re.compile(r"(?<![\w:])relay_[A-Za-z0-9_:]*")
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: Debian's prometheus package (scripts/setup.sh installs it)"
    return path


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of the plain rules file, in order."""
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str  # as written in the dashboard, with Grafana variables
    legend: str

    @property
    def promql(self) -> str:
        return grafana_to_promql(self.expr)


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows included, rows excluded."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def grafana_to_promql(expr: str) -> str:
    """The query Grafana sends for `expr`: built-in intervals and variables substituted. An
    unknown variable raises KeyError: the dashboard would send it unresolved."""
    for name, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(name, value)
    return _VARIABLE.sub(lambda m: GRAFANA_VARIABLES[m.group(1) or m.group(2)], expr)


def metric_names(expr: str) -> set[str]:
    """The relay_* metric names an expression reads (label values in quotes are not names)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def grouping_labels(expr: str) -> set[str]:
    """Label names in `by (...)` / `without (...)` / `on (...)` / `ignoring (...)` clauses."""
    found: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        found.update(name.strip() for name in clause.split(",") if name.strip())
    return found


def matcher_labels(expr: str) -> set[str]:
    """Label names used in selectors' matchers: `{name=~"..."}`."""
    found: set[str] = set()
    for selector in re.findall(r"\{([^}]*)\}", _STRING.sub('""', expr)):
        found.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    return found


def exposed_metrics() -> dict[str, frozenset[str]]:
    """Every series name the relay's /metrics can carry, with its label names, derived from the
    metrics relay/metrics.py declares: a counter `x` is exposed as `x_total`, a histogram as
    `x_bucket` (with `le`), `x_sum` and `x_count`."""
    names: dict[str, frozenset[str]] = {}
    for value in vars(Metrics()).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        # prometheus_client keeps the declared name and label names only in these attributes.
        name, labels, kind = value._name, frozenset(value._labelnames), value._type
        if kind == "counter":
            names[f"{name}_total"] = labels
        elif kind == "histogram":
            names[f"{name}_bucket"] = labels | {"le"}
            names[f"{name}_sum"] = labels
            names[f"{name}_count"] = labels
        else:
            names[name] = labels
    return names
