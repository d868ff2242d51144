"""Prometheus export: one custom Collector over the daemon's live state, served by a tiny
HTTP endpoint inside the daemon's own event loop (no thread, no lock).

Each scrape builds the metric families fresh (prometheus client_python's custom-collector
pattern), so a removed sandbox's series vanish with it. Label values come from bounded
sets only: sandbox names (at most `max_sandboxes`), tool names (the first
`max_tool_labels` seen, then "other"), action kinds and reason keys (bounded likewise),
program names. No call id is ever a label.
"""
from __future__ import annotations

import bisect
import socket
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from agentcg.controller.daemon.engine_metrics import engine_families
from agentcg.controller.daemon.families import counter, counters, gauge
from agentcg.errors import AgentcgError
from agentcg.records import ToolCallRecord

DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
PEAK_BUCKETS_BYTES = tuple(float(1 << s) for s in range(20, 36, 2))   # 1 MiB .. 16 GiB, x4
WAIT_BUCKETS_S = (0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
REACTION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
MAX_REASON_LABELS = 32
OTHER = "other"
PSI_RESOURCES = ("memory", "cpu", "io")


class Histogram:
    """Bucket counts for one label set (cumulative at export)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


class BoundedLabels:
    """The first `limit` distinct values keep their name; later ones become "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


def reason_key(reason: str) -> str:
    """A bounded label from a free-text reason: its first word, lower case, 32 chars."""
    word = reason.strip().split(":", 1)[0].split(None, 1)[0] if reason.strip() else "unspecified"
    return "".join(c if c.isalnum() or c == "_" else "_" for c in word.lower())[:32] or "unspecified"


@dataclass
class DaemonStats:
    """Counters the daemon keeps between scrapes (the rest is read live at scrape time)."""

    max_tool_labels: int = 64
    tool_label: BoundedLabels = field(init=False)
    reason_label: BoundedLabels = field(init=False)
    calls: dict[tuple[str, str], int] = field(default_factory=dict)          # (tool, outcome)
    durations: dict[str, Histogram] = field(default_factory=dict)            # tool
    peaks: dict[str, Histogram] = field(default_factory=dict)                # tool
    actions: dict[tuple[str, str], int] = field(default_factory=dict)        # (kind, reason)
    reaction: Histogram = field(default_factory=lambda: Histogram(REACTION_BUCKETS_S))
    requests: dict[tuple[str, str], int] = field(default_factory=dict)       # (op, code)
    psi_triggers: dict[str, int] = field(default_factory=dict)               # scope
    bpf_events: dict[str, int] = field(default_factory=dict)                 # event type
    memcg_thresholds: dict[str, int] = field(default_factory=dict)           # scope
    admission_wait: Histogram = field(default_factory=lambda: Histogram(WAIT_BUCKETS_S))
    ticks: int = 0

    def __post_init__(self) -> None:
        self.tool_label = BoundedLabels(self.max_tool_labels)
        self.reason_label = BoundedLabels(MAX_REASON_LABELS)

    def observe_call(self, record: ToolCallRecord) -> None:
        tool = self.tool_label(record.tool)
        key = (tool, record.outcome)
        self.calls[key] = self.calls.get(key, 0) + 1
        if record.duration_s is not None:
            self.durations.setdefault(tool, Histogram(DURATION_BUCKETS_S)).observe(max(0.0, record.duration_s))
        peak = record.peak_memory_bytes if record.peak_memory_bytes is not None else record.peak_rss_bytes
        if peak is not None:
            self.peaks.setdefault(tool, Histogram(PEAK_BUCKETS_BYTES)).observe(float(peak))

    def observe_action(self, kind: str, reason: str, latency_s: float | None = None) -> None:
        key = (kind, self.reason_label(reason_key(reason)))
        self.actions[key] = self.actions.get(key, 0) + 1
        if latency_s is not None:
            self.reaction.observe(latency_s)

    def observe_admission(self, waited_s: float | None) -> None:
        """A call the policy admitted after weighing its need (None: admitted unweighed)."""
        if waited_s is not None:
            self.admission_wait.observe(max(0.0, waited_s))

    def observe_request(self, op: str, code: str) -> None:
        key = (op, code)
        self.requests[key] = self.requests.get(key, 0) + 1

    def bump(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


class MetricsView(Protocol):
    """What the exporter reads: live state, never the Daemon object itself."""

    stats: DaemonStats
    tree: Any
    calls: Any
    state: Any
    monitor: Any
    engines: Any

    def pending_calls(self) -> int: ...


class DaemonCollector(Collector):
    def __init__(self, daemon: MetricsView) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        d = self.daemon
        stats = d.stats
        yield from self._sandboxes()
        yield counters("agentcg_tool_calls", "Tool calls ended, by tool and outcome.", ["tool", "outcome"], stats.calls)
        yield gauge("agentcg_tool_calls_running", "Tool calls running now.",
                    len(d.calls.running()) if d.calls is not None else 0)
        yield gauge("agentcg_tool_calls_waiting", "Tool calls waiting for admission now.", d.pending_calls())
        yield _histogram("agentcg_admission_wait_seconds",
                         "How long admitted calls waited for room (calls with a known need).", stats.admission_wait)
        yield _histograms("agentcg_tool_call_duration_seconds", "Tool-call wall time, by tool.", stats.durations)
        yield _histograms("agentcg_tool_call_peak_memory_bytes", "Tool-call peak memory (cgroup), by tool.",
                          stats.peaks)
        yield counters("agentcg_actions", "Actions taken, by kind and reason.", ["kind", "reason"], stats.actions)
        yield _histogram("agentcg_reaction_latency_seconds",
                         "From the observation (the kernel's timestamp of an eBPF event, the read of a memcg "
                         "threshold or PSI trigger, the tick) to the action's write returning.", stats.reaction)
        yield counters("agentcg_api_requests", "Socket API requests, by op and result code.", ["op", "code"],
                       stats.requests)
        yield counters("agentcg_psi_triggers", "PSI memory triggers fired, by scope.", ["scope"], stats.psi_triggers)
        yield counters("agentcg_memcg_thresholds", "cgroup v1 memory usage thresholds crossed, by scope.", ["scope"],
                       stats.memcg_thresholds)
        yield counter("agentcg_policy_ticks", "Policy ticks run.", stats.ticks)
        yield from self._bpf()
        hub = getattr(d, "engines", None)
        if hub is not None:
            yield from engine_families(hub)

    def _sandboxes(self) -> Iterator[Any]:
        d = self.daemon
        memory = GaugeMetricFamily("agentcg_sandbox_memory_bytes", "Memory charged to the sandbox now.",
                                   labels=["sandbox"])
        budget = GaugeMetricFamily("agentcg_sandbox_memory_budget_bytes", "The sandbox's memory budget.",
                                   labels=["sandbox"])
        cpu = CounterMetricFamily("agentcg_sandbox_cpu_seconds", "CPU time used by the sandbox.", labels=["sandbox"])
        psi = CounterMetricFamily("agentcg_sandbox_pressure_stall_seconds",
                                  "PSI stall time of the sandbox (cumulative).", labels=["sandbox", "resource", "kind"])
        running = GaugeMetricFamily("agentcg_sandbox_tool_calls_running", "Tool calls running in the sandbox.",
                                    labels=["sandbox"])
        per_sandbox: dict[str, int] = {}
        for call in (d.calls.running() if d.calls is not None else []):
            per_sandbox[call.sandbox] = per_sandbox.get(call.sandbox, 0) + 1
        tree = d.tree
        for name, entry in sorted(d.state.sandboxes.items()):
            if tree is None or not tree.exists(name):
                continue
            running.add_metric([name], per_sandbox.get(name, 0))
            if entry.memory_budget_bytes is not None:
                budget.add_metric([name], entry.memory_budget_bytes)
            try:
                memory.add_metric([name], tree.memory_current(name))
            except AgentcgError:
                pass
            try:
                cpu.add_metric([name], tree.cpu_stat(name).usage_s)
            except AgentcgError:
                pass
            for resource in PSI_RESOURCES:
                try:
                    pressure = tree.pressure(name, resource)
                except AgentcgError:
                    continue
                psi.add_metric([name, resource, "some"], pressure.some.total_s)
                psi.add_metric([name, resource, "full"], pressure.full.total_s)
        yield from (memory, budget, cpu, psi, running)

    def _bpf(self) -> Iterator[Any]:
        d = self.daemon
        yield gauge("agentcg_bpf_loaded", "1 when the eBPF programs are loaded.", 1 if d.monitor is not None else 0)
        yield counters("agentcg_bpf_events", "Ring-buffer events consumed, by type.", ["type"], d.stats.bpf_events)
        if d.monitor is None:
            return
        try:
            s = d.monitor.stats()
        except AgentcgError:
            return
        yield counter("agentcg_bpf_ringbuf_drops", "Events lost because the ring buffer was full.", s.ringbuf_full)
        yield counters("agentcg_bpf_map_full", "Map inserts refused because the map was full.", ["map"], s.map_full)
        yield counter("agentcg_bpf_decode_errors", "Ring-buffer records that could not be decoded.", s.decode_errors)
        counted = [p for p in s.programs if p.run_count is not None]
        yield counters("agentcg_bpf_program_runs", "Runs of each BPF program (needs BPF stats enabled).", ["program"],
                       {p.name: p.run_count for p in counted})
        yield counters("agentcg_bpf_program_run_seconds", "Time spent in each BPF program.", ["program"],
                       {p.name: p.run_time_s or 0.0 for p in counted})


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], histogram.buckets(), sum_value=histogram.sum)
    return family


def _histograms(name: str, documentation: str, table: dict[str, Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["tool"])
    for tool, histogram in sorted(table.items()):
        family.add_metric([tool], histogram.buckets(), sum_value=histogram.sum)
    return family


def make_registry(daemon: MetricsView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return registry


# ---- the HTTP endpoint -------------------------------------------------------------------
MAX_HTTP_REQUEST_BYTES = 8192
HTTP_TIMEOUT_S = 5.0


class HttpConnection:
    """One scrape: read a request head (bounded, with a deadline), answer once, close."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.started = now
        self.answered = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> bytes | None:
        """The request head once complete; None while incomplete. OSError/ValueError: drop."""
        data = self.sock.recv(4096)
        if not data:
            raise ValueError("peer closed")
        self.inbuf += data
        end = self.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.inbuf) > MAX_HTTP_REQUEST_BYTES:
                raise ValueError("request head too large")
            return None
        return bytes(self.inbuf[:end])

    def answer(self, status: str, body: bytes, content_type: str) -> None:
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        self.outbuf += head + body
        self.answered = True

    def flush(self) -> bool:
        """True when everything is written (or the peer is gone): then close."""
        while self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True
            del self.outbuf[:sent]
        return True

    def close(self) -> None:
        self.sock.close()


def http_response(head: bytes, registry: CollectorRegistry) -> tuple[str, bytes, str]:
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "400 Bad Request", b"malformed request line\n", "text/plain"
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", b"only GET\n", "text/plain"
    if target == "/metrics":
        return "200 OK", generate_latest(registry), CONTENT_TYPE_LATEST
    if target == "/":
        return "200 OK", b"agentcg daemon: see /metrics\n", "text/plain"
    return "404 Not Found", b"not found; try /metrics\n", "text/plain"
