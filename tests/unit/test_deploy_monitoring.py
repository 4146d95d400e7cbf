"""Static checks of the monitoring files: the alert rules (promtool check rules, promtool test
rules), the PrometheusRule generated from them, and the Grafana dashboard. Every metric and label
they name is one the relay declares. tests/integration/test_monitoring.py evaluates the same
expressions in a real Prometheus scraping a real relay."""

from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.monitoring import (
    GENERATOR,
    PROMETHEUS_RULE,
    REPO,
    RULES,
    RULES_TEST,
    TARGET_LABELS,
    alert_rules,
    dashboard_panels,
    exposed_metrics,
    grafana_to_promql,
    grouping_labels,
    load_dashboard,
    matcher_labels,
    metric_names,
    panel_queries,
    promtool,
)

K8S = REPO / "deploy" / "kubernetes"
SEVERITIES = {"warning", "critical"}


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the plain rules file ----------------------------------------------------------------------


def test_promtool_checks_the_rules_file() -> None:
    result = run_promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_rule_tests_pass() -> None:
    # promtool resolves rule_files relative to the test file.
    result = run_promtool("test", "rules", RULES_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rule_tests_see_every_alert_fire_and_stay_silent() -> None:
    """Each alert has an evaluation where it fires and one where it stays silent (the healthy
    series beside the faulty ones are silent in the firing evaluations too)."""
    fired: set[str] = set()
    silent: set[str] = set()
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in test.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - fired == set(), "alerts never seen firing"
    assert alerts - silent == set(), "alerts never seen silent"


def test_the_group_and_its_alerts() -> None:
    document = yaml.safe_load(RULES.read_text())
    assert [group["name"] for group in document["groups"]] == ["docker-event-relay"]
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    read = {name for rule in rules for name in metric_names(rule["expr"])}
    # The issue's list: gap, drops, dead letters, lag, spool near full, disk errors, not ready;
    # and the engine and sink states the README recommended alerting on.
    assert {
        "relay_replay_gaps_total",
        "relay_events_dropped_total",
        "relay_reader_lines_dropped_total",
        "relay_events_dead_lettered_total",
        "relay_delivery_lag_seconds",
        "relay_spool_bytes",
        "relay_spool_max_bytes",
        "relay_disk_errors_total",
        "relay_disk_ok",
        "relay_ready",
        "relay_engine_connected",
        "relay_sink_up",
        "relay_sink_stopped",
    } <= read


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_names_where_and_what_to_check(rule: dict[str, Any]) -> None:
    """A severity; a summary naming the instance and every label that tells series of the
    alerted metric apart (sink, reason, what); a description with what to check."""
    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
    assert rule["labels"]["severity"] in SEVERITIES
    assert set(rule["annotations"]) == {"summary", "description"}
    summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
    exposed = exposed_metrics()
    distinguishing = set().union(*(exposed[name] for name in metric_names(rule["expr"])))
    for label in {"instance"} | distinguishing:
        assert f"$labels.{label}" in summary, f"the summary does not name the {label}"
    assert "$labels.instance" in description
    assert "Check" in description, "no hint of what to check"
    if "for" in rule:
        assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_every_metric_and_label_the_rules_use_is_declared() -> None:
    exposed = exposed_metrics()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exposed.keys(), f"{rule['alert']}: {sorted(names - exposed.keys())}"
        known = TARGET_LABELS.union(*(exposed[name] for name in names))
        used = grouping_labels(rule["expr"]) | matcher_labels(rule["expr"])
        assert used <= known, f"{rule['alert']}: unknown labels {sorted(used - known)}"


# -- the PrometheusRule ------------------------------------------------------------------------


def test_prometheusrule_is_generated_from_the_rules_file() -> None:
    expected = generator().render(RULES.read_text())
    assert PROMETHEUS_RULE.read_text() == expected, (
        "deploy/kubernetes/prometheusrule.yaml differs from the rules file: "
        ".venv/bin/python scripts/gen-prometheusrule.py"
    )


def test_a_changed_rules_file_is_a_drift() -> None:
    """The comparison above can fail: a one-character change in the rules makes another file."""
    text = RULES.read_text()
    assert "for: 10m" in text
    changed = generator().render(text.replace("for: 10m", "for: 15m", 1))
    assert changed != PROMETHEUS_RULE.read_text()
    with pytest.raises(ValueError, match="groups"):
        generator().render("rule_files: []\n")


def test_generator_check_mode_agrees() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_prometheusrule_structure() -> None:
    """kubernetes-validate knows no CRD, so the shape the operator expects is checked here:
    the kind, where it goes, and the rules file's groups, unchanged, as its spec."""
    manifest = yaml.safe_load(PROMETHEUS_RULE.read_text())
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    metadata = manifest["metadata"]
    assert metadata["name"] == "docker-event-relay"
    # Applied on its own, so it names the namespace the kustomization puts the relay in.
    assert metadata["namespace"] == kustomization["namespace"]
    assert metadata["labels"]["app.kubernetes.io/name"] == "docker-event-relay"
    assert set(manifest["spec"]) == {"groups"}
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    for group in manifest["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert isinstance(rule["expr"], str)
            for field in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(field, {}).values())


def test_promtool_checks_the_prometheusrule_spec(tmp_path: Path) -> None:
    spec = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    rules = tmp_path / "spec.yaml"
    rules.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_promtool("check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_prometheusrule_is_not_in_the_default_kustomization() -> None:
    """Without the operator's CRDs `kubectl apply -k` would fail on the kind: users add it."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert PROMETHEUS_RULE.parent == K8S and PROMETHEUS_RULE.exists()
    assert PROMETHEUS_RULE.name not in kustomization["resources"]


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The promtool checks above can fail."""
    document = yaml.safe_load(RULES.read_text())
    broken = copy.deepcopy(document)
    broken["groups"][0]["rules"][0]["expr"] = "increase(relay_replay_gaps_total[1h] > 0"
    rules = tmp_path / "broken.yaml"
    rules.write_text(yaml.safe_dump(broken))
    assert run_promtool("check", "rules", rules).returncode != 0


# -- the Grafana dashboard ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "docker-event-relay"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    sink = variables["sink"]
    assert sink["type"] == "query"
    assert sink["query"]["query"] == "label_values(relay_events_delivered_total, sink)"
    for name in ("sink", "instance"):
        variable = variables[name]
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".+"
        assert metric_names(variable["query"]["query"]) <= exposed_metrics().keys()


def test_dashboard_panels_query_the_chosen_datasource(dashboard: dict[str, Any]) -> None:
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip()


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_dashboard_shows_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    read = {name for q in panel_queries(dashboard) for name in metric_names(q.expr)}
    assert {
        "relay_events_read_total",
        "relay_events_delivered_total",
        "relay_delivery_lag_seconds",
        "relay_spool_bytes",
        "relay_spool_max_bytes",
        "relay_spool_events",
        "relay_events_retried_total",
        "relay_events_dead_lettered_total",
        "relay_replay_gaps_total",
        "relay_reclaimed_bytes_total",
        "relay_delivery_latency_seconds_bucket",
        "relay_engine_connected",
        "relay_ready",
        "relay_disk_ok",
        "relay_disk_errors_total",
        "relay_spool_commit_seconds_bucket",
        "relay_spool_commits_total",
    } <= read


def test_every_metric_and_label_the_dashboard_uses_is_declared(dashboard: dict[str, Any]) -> None:
    exposed = exposed_metrics()
    for q in panel_queries(dashboard):
        where = f"{q.panel} {q.ref_id}"
        names = metric_names(q.expr)
        assert names and names <= exposed.keys(), f"{where}: {sorted(names - exposed.keys())}"
        known = TARGET_LABELS.union(*(exposed[name] for name in names))
        used = grouping_labels(q.expr) | matcher_labels(q.expr)
        assert used <= known, f"{where}: unknown labels {sorted(used - known)}"
        # The legend names labels the query's result keeps.
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", q.legend))
        kept = grouping_labels(q.expr) - {"le"} if "by (" in q.expr else known
        assert legend <= kept, f"{where}: legend uses {sorted(legend - kept)}"


def test_promtool_parses_every_dashboard_query(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each query, as Grafana sends it, as a recording rule: promtool parses its PromQL."""
    queries = panel_queries(dashboard)
    rules = [{"record": f"dashboard:query_{i}", "expr": q.promql} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_grafana_substitution() -> None:
    expr = 'sum(rate(relay_x_total{sink=~"$sink", instance=~"${instance}"}[$__rate_interval]))'
    assert grafana_to_promql(expr) == 'sum(rate(relay_x_total{sink=~".+", instance=~".+"}[1m]))'
    with pytest.raises(KeyError):
        grafana_to_promql('relay_x{node="$node"}')
    assert metric_names('relay_a_total{job="relay_b"} / on (sink) relay_c[5m]') == {
        "relay_a_total",
        "relay_c",
    }
