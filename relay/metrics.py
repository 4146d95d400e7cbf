"""Prometheus metrics. One `Metrics` object per relay, on its own registry (tests run several)."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relay.schema import Context

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


# The label value of projects and namespaces beyond metrics.context_max_values. A Compose
# project name starts with a letter or digit and a namespace is a DNS label: none is `_other`.
OTHER: Final = "_other"
# Longer is no Compose project or namespace name (a namespace has at most 63), and a label
# value of any length would be in every scrape: counted under OTHER, as is an empty name
# (Prometheus reads an empty label value as no label).
MAX_NAME_CHARS: Final = 253


class _ByName:
    """One counter by name, type and action, for at most `max_names` names: the names are
    labels that whoever creates a container chooses, unbounded, and each would be series."""

    __slots__ = ("_children", "_counter", "_max", "_names")

    def __init__(self, counter: Counter, max_names: int) -> None:
        self._counter = counter
        self._max = max_names
        self._names: set[str] = set()
        self._children: dict[tuple[str, str, str], Counter] = {}

    def inc(self, name: str, type_: str, action: str) -> None:
        key = (name, type_, action)
        child = self._children.get(key)
        if child is None:
            names = self._names
            if name not in names:
                if len(names) >= self._max or not 0 < len(name) <= MAX_NAME_CHARS:
                    # Not remembered: the relay's memory stays bounded as well.
                    key = (OTHER, type_, action)
                    child = self._children.get(key)
                else:
                    names.add(name)
            if child is None:
                child = self._children[key] = self._counter.labels(*key)
        child.inc()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.events_read = Counter(
            "relay_events_read",
            "Engine events read, by type and action.",
            ["type", "action"],
            registry=r,
        )
        self.events_malformed = Counter(
            "relay_events_malformed", "Lines from the engine that were not events.", registry=r
        )
        self.engine_lines_oversized = Counter(
            "relay_engine_lines_oversized",
            "Lines from the engine longer than engine.max_line_bytes: dropped, their first "
            "bytes dead-lettered (also counted in relay_events_malformed).",
            registry=r,
        )
        self.events_duplicate = Counter(
            "relay_events_duplicate",
            "Events the engine replayed after a reconnect that had been read already (dropped).",
            registry=r,
        )
        self.reader_lines_dropped = Counter(
            "relay_reader_lines_dropped",
            "Lines dropped because the reader's queue was full (a last-resort memory bound).",
            registry=r,
        )
        self.replay_gaps = Counter(
            "relay_replay_gaps",
            "Gaps reported with a relay.gap event (events may be missing): a replay that did "
            "not reach back to the last event, a corrupt state, a cursor ahead of the engine.",
            registry=r,
        )
        self.snapshots = Counter(
            "relay_snapshots",
            "Snapshots of the engine's objects for sinks with reconcile, by outcome: taken, or "
            "failed (the engine did not answer; retried).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("taken", "failed"):
            self.snapshots.labels(outcome)
        self.events_delivered = Counter(
            "relay_events_delivered", "Events acknowledged by the sink.", ["sink"], registry=r
        )
        self.events_retried = Counter(
            "relay_events_retried",
            "Events in delivery attempts that were retried.",
            ["sink"],
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "relay_events_dead_lettered",
            "Events written to the dead-letter file.",
            ["sink", "reason"],
            registry=r,
        )
        self.events_dropped = Counter(
            "relay_events_dropped",
            "Events dropped by an outbox overflow policy.",
            ["sink"],
            registry=r,
        )
        self.events_suppressed = Counter(
            "relay_events_suppressed",
            "Events a sink's flap suppression held back, by base action: each is summarised "
            "in a ...suppressed event to that sink when its window closes.",
            ["sink", "action"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "relay_outbox_depth", "Events waiting in the sink's outbox.", ["sink"], registry=r
        )
        self.sink_up = Gauge(
            "relay_sink_up",
            "1 once the sink started and while its last attempt succeeded; 0 until it starts, "
            "while failing, or stopped.",
            ["sink"],
            registry=r,
        )
        self.sink_stopped = Gauge(
            "relay_sink_stopped",
            "1 when the destination told the sink to stop (HTTP 410).",
            ["sink"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "relay_delivery_latency_seconds",
            "From the engine's timeNano to the sink's acknowledgement.",
            ["sink"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_connected = Gauge(
            "relay_engine_connected", "1 while the event stream is open.", registry=r
        )
        self.engine_reconnects = Counter(
            "relay_engine_reconnects", "Times the event stream was opened again.", registry=r
        )
        self.last_event = Gauge(
            "relay_last_event_timestamp_seconds", "Unix time of the last event read.", registry=r
        )
        self.seconds_since_last_event = Gauge(
            "relay_seconds_since_last_event",
            "Seconds since the last event was read (since start while none).",
            registry=r,
        )
        self._started = time.time()
        self._last_event_at: float | None = None
        self.seconds_since_last_event.set_function(self._since_last)
        self.reclaimed_bytes = Counter(
            "relay_reclaimed_bytes",
            "Bytes reclaimed by prune events, by resource type.",
            ["type"],
            registry=r,
        )
        self._read_children: dict[tuple[str, str], Counter] = {}
        self.compose_events = Counter(
            "relay_compose_events",
            "Events read of the objects of a Compose project, by project, type and action "
            "(with metrics.context: [compose_project]).",
            ["project", "type", "action"],
            registry=r,
        )
        self.kubernetes_events = Counter(
            "relay_kubernetes_events",
            "Events read of the containers of Kubernetes pods, by namespace, type and action "
            "(with metrics.context: [k8s_namespace]).",
            ["namespace", "type", "action"],
            registry=r,
        )
        # Off unless metrics.context asks (count_context): not one series by default.
        self._by_project: _ByName | None = None
        self._by_namespace: _ByName | None = None
        # The durable spool (STATE_DIR/spool.db): what each sink still owes, and the disk.
        self.spool_events = Gauge(
            "relay_spool_events",
            "Events held for the sink (spooled on disk or waiting in memory), not yet "
            "delivered or dead-lettered.",
            ["sink"],
            registry=r,
        )
        self.spool_bytes = Gauge(
            "relay_spool_bytes", "Bytes of the events held for the sink.", ["sink"], registry=r
        )
        self.spool_max_bytes = Gauge(
            "relay_spool_max_bytes",
            "The sink's spool limit (spool.max_bytes); beyond it the overflow policy applies.",
            ["sink"],
            registry=r,
        )
        self.delivery_lag = Gauge(
            "relay_delivery_lag_seconds",
            "Age (from the engine's timeNano) of the oldest event the sink has not finished "
            "with; 0 when it holds none.",
            ["sink"],
            registry=r,
        )
        self.spool_commits = Counter(
            "relay_spool_commits", "Group commits written to the spool.", registry=r
        )
        self.spool_commit_seconds = Histogram(
            "relay_spool_commit_seconds",
            "Time one group commit took (write and fsync).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.disk_errors = Counter(
            "relay_disk_errors",
            "Failed writes to the state directory (spool commit, dead-letter file), by what.",
            ["what"],
            registry=r,
        )
        self.disk_ok = Gauge(
            "relay_disk_ok",
            "1 while the last write to the state directory succeeded, 0 while it fails.",
            registry=r,
        )
        self.disk_ok.set(1)
        for what in ("spool", "dead_letter"):
            self.disk_errors.labels(what)
        self.ready = Gauge("relay_ready", "1 when /readyz answers ready, 0 otherwise.", registry=r)

    def _since_last(self) -> float:
        return time.time() - (self._last_event_at or self._started)

    def count_context(self, kinds: Collection[str], max_names: int) -> None:
        """Count events per Compose project (`compose_project` in `kinds`) and Kubernetes
        namespace (`k8s_namespace`), at most `max_names` of each by name (metrics.context)."""
        self._by_project = (
            _ByName(self.compose_events, max_names) if "compose_project" in kinds else None
        )
        self._by_namespace = (
            _ByName(self.kubernetes_events, max_names) if "k8s_namespace" in kinds else None
        )

    def read(
        self, type_: str, action: str, reclaimed: int | None, context: Context | None = None
    ) -> None:
        key = (type_, action)
        child = self._read_children.get(key)
        if child is None:
            child = self._read_children[key] = self.events_read.labels(type_, action)
        child.inc()
        if context is not None:
            compose, kubernetes = context.compose, context.kubernetes
            if compose is not None and self._by_project is not None:
                self._by_project.inc(compose.project, type_, action)
            if kubernetes is not None and self._by_namespace is not None:
                namespace = kubernetes.namespace
                if namespace is not None:
                    self._by_namespace.inc(namespace, type_, action)
        now = time.time()
        self._last_event_at = now
        self.last_event.set(now)
        if reclaimed is None or reclaimed < 0:
            # A counter refuses to go down (the normalizer lets no negative count through).
            return
        # The series exists for every pruned type, at 0 too, for dashboards.
        child = self.reclaimed_bytes.labels(type_)
        if reclaimed:
            # Clamped to the engine's uint64: a huge int would not convert to the counter's float.
            child.inc(min(reclaimed, 2**64))
