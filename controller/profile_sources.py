"""What `agentcg profile` records besides tool calls and cgroup samples: the `events` and
`llm_requests` tables and the GPU columns of `samples`. Each source is polled from the
session's one loop (no threads) and writes through the TraceRecorder:

- EventTee: the eBPF monitor's OOM-victim and reclaim-stall events of the sandbox's
  cgroups (the exec detector reads the same poll; the tee passes every event on);
- LlmRecordTail: the LLM record file the agent appends to (agentcg.profiler.llm_records);
- DaemonEvents (controller/profile_daemon.py): the daemon's event log for this sandbox:
  policy actions (freeze, thaw, throttle, kill, admit_wait, admit), KV directives and the
  LLM requests of an engine attached to the daemon;
- GpuAttribution: NVML per-process GPU memory mapped through /proc/<pid>/cgroup to the
  sandbox and to each tool call (`tools/<call-id>` below it).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from agentcg.controller.profile_daemon import DaemonEvents, wall_of
from agentcg.profiler import trace as tr

GPU_MAX_FAILURES = 5             # consecutive failed NVML samples before GPU sampling stops
LLM_TAIL_MAX_BYTES = 4 * 1024**2  # read per turn, so one huge write cannot stall the loop
MAX_EVENTS_PER_KIND = 10_000     # per session; a reclaim storm beyond it is counted, not recorded




class EventTee:
    """Stands in for the BpfMonitor in front of the exec detector: poll() hands every event
    on and records the memory events of the cgroups `call_of` knows."""

    def __init__(self, monitor: Any, record: Callable[..., None], call_of: Callable[[int], str | None | bool]):
        self._monitor = monitor
        self._record = record
        self._call_of = call_of          # cgroup id -> call id, None (the agent), False (not ours)
        self.counts = {tr.EVENT_OOM_KILL: 0, tr.EVENT_RECLAIM_STALL: 0}
        self.not_recorded = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._monitor, name)

    def poll(self, timeout_s: float = 0.0) -> list[Any]:
        from agentcg.bpf.events import OomVictimEvent, ReclaimStallEvent

        events = self._monitor.poll(timeout_s)
        for event in events:
            if isinstance(event, (OomVictimEvent, ReclaimStallEvent)):
                call_id = self._call_of(event.cgroup_id)
                if call_id is False:
                    continue
                if isinstance(event, OomVictimEvent):
                    kind, extra = tr.EVENT_OOM_KILL, {"amount_bytes": event.rss_bytes, "action": "oom_kill"}
                    detail = {"pid": event.pid, "comm": event.comm, "rss_bytes": event.rss_bytes, "source": "ebpf"}
                else:
                    kind, extra = tr.EVENT_RECLAIM_STALL, {}
                    detail = {"pid": event.pid, "comm": event.comm, "stall_s": event.stall_s, "source": "ebpf"}
                self.counts[kind] += 1
                if self.counts[kind] > MAX_EVENTS_PER_KIND:
                    self.not_recorded += 1
                    continue
                self._record(wall_of(event.monotonic_s), kind, call_id=call_id,
                             detail=json.dumps(detail, sort_keys=True), **extra)
        return events


class LlmRecordTail:
    """Reads the complete lines appended to the LLM record file since the last turn."""

    def __init__(self, path: Path, add: Callable[[dict[str, Any]], None]) -> None:
        from agentcg.profiler.llm_records import RecordErrors

        self.path = path
        self._add = add
        self._offset = 0
        self._partial = b""
        self._line = 0
        self.rows = 0
        self.errors = RecordErrors()

    def skip_existing(self) -> None:
        """Read only what is appended from now on; line numbers stay the file's."""
        try:
            with open(self.path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    self._offset += len(chunk)
                    self._line += chunk.count(b"\n")
        except OSError:
            pass

    def step(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read(LLM_TAIL_MAX_BYTES)
        except FileNotFoundError:
            return
        except OSError as exc:
            self.errors.add(f"{self.path}: unreadable ({exc.strerror})")
            return
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()      # an incomplete last line waits for its newline
        for raw in lines:
            self._parse(raw)

    def close(self) -> None:
        self.step()
        tail, self._partial = self._partial, b""
        if tail.strip():                 # the agent's last line, written without a newline
            self._parse(tail)

    def _parse(self, raw: bytes) -> None:
        from agentcg.profiler.llm_records import BadRecord, parse_record

        self._line += 1
        if not raw.strip():
            return
        try:
            self._add(parse_record(raw, self._line, time.time()))
            self.rows += 1
        except BadRecord as exc:
            self.errors.add(str(exc))


class GpuAttribution:
    """Per sample: GPU memory of the sandbox's processes and of each call's, from NVML."""

    def __init__(self, sampler: Any, sandbox: str) -> None:
        self._sampler = sampler
        self.sandbox = sandbox
        self.samples = 0
        self.failures = 0
        self.error: str | None = None

    def columns(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """({sandbox gpu columns}, {call_id: gpu columns}); empty when NVML failed."""
        if self.failures >= GPU_MAX_FAILURES:
            return {}, {}
        try:
            gpus = self._sampler.sample()
        except Exception as exc:     # NVML raises its module's own error types: a GPU problem never ends a recording
            self.failures += 1
            self.error = f"NVML sample failed ({type(exc).__name__}: {exc})" + (
                "; no more GPU samples" if self.failures >= GPU_MAX_FAILURES else "")
            return {}, {}
        self.failures = 0
        total, util, calls = None, None, {}
        for gpu in gpus:
            mine = [p for p in gpu.processes if p.owner == f"sandbox:{self.sandbox}"]
            if not mine:
                continue
            used = [p.used_memory_bytes for p in mine if p.used_memory_bytes is not None]
            if used:
                total = (total or 0) + sum(used)
            if gpu.utilization_gpu_ratio is not None:   # NVML has utilisation per device, not per process
                util = max(util or 0.0, 100.0 * gpu.utilization_gpu_ratio)
            for proc in mine:
                call_id = _call_of_path(proc.cgroup)
                if call_id is not None and proc.used_memory_bytes is not None:
                    entry = calls.setdefault(call_id, {"gpu_memory_bytes": 0, "gpu_util_pct": util})
                    entry["gpu_memory_bytes"] += proc.used_memory_bytes
        self.samples += 1
        whole = {"gpu_memory_bytes": total, "gpu_util_pct": util} if total is not None or util is not None else {}
        return whole, calls

    def close(self) -> None:
        self._sampler.close()


def _call_of_path(cgroup: str | None) -> str | None:
    """`.../<sandbox>/tools/<call-id>[/...]` -> call-id."""
    if not cgroup:
        return None
    parts = [p for p in cgroup.split("/") if p]
    if "tools" in parts and parts.index("tools") + 1 < len(parts):
        return parts[parts.index("tools") + 1]
    return None


def open_gpu(sandbox: str, root: str, nvml: Any = None, proc_root: str | os.PathLike = "/proc"
             ) -> tuple[GpuAttribution | None, str]:
    """The GPU source, or None and why not (no NVML, no GPU)."""
    from agentcg.gpu.nvml import NvmlMissing, NvmlSampler
    from agentcg.gpu.proc_cgroup import CgroupOwners

    top = [p for p in root.split("/") if p]
    sampler = NvmlSampler(nvml, proc_root=proc_root, owners=CgroupOwners(root=top[-1] if top else "agentcg"))
    try:
        sampler.open()
    except NvmlMissing as exc:
        return None, str(exc)
    return GpuAttribution(sampler, sandbox), "nvml"


class SessionSources:
    """The sources of one profiled session, opened together, stepped from its loop and
    closed once. `session` has add_event(time_s, kind, **columns), add_llm(row), sandbox,
    session_id and root; `options` is profile_session.SourceOptions."""

    def __init__(self, session: Any, options: Any) -> None:
        self.session = session
        self.options = options
        self.tee_source: EventTee | None = None
        self.llm: LlmRecordTail | None = None
        self.daemon: DaemonEvents | None = None
        self.daemon_socket: Path | None = None
        self.gpu: GpuAttribution | None = None
        self.gpu_status = "not sampled"
        self._tmpdir: str | None = None

    @classmethod
    def open(cls, session: Any, options: Any) -> "SessionSources":
        import tempfile

        self = cls(session, options)
        path = options.llm_record
        if path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="agentcg-profile-")
            path = Path(self._tmpdir) / "llm-record.jsonl"
            path.touch(mode=0o600)
        self.llm = LlmRecordTail(Path(path), session.add_llm)
        self.llm.skip_existing()
        link = session.daemon_link
        if link is not None:
            self.daemon_socket = link.socket
            self.daemon = DaemonEvents(link.client, session.sandbox, session.add_event, session.add_llm)
        self.gpu, self.gpu_status = open_gpu(session.sandbox, session.root, options.nvml, options.proc_root)
        return self

    def tee(self, monitor: Any, call_of: Callable[[int], str | None | bool]) -> EventTee:
        self.tee_source = EventTee(monitor, self.session.add_event, call_of)
        return self.tee_source

    def agent_env(self) -> dict[str, str]:
        """The agent's environment: where to append its LLM records, which sandbox it is."""
        return {**os.environ, "AGENTCG_LLM_RECORD": str(self.llm.path), "AGENTCG_SANDBOX": self.session.sandbox,
                "AGENTCG_SESSION_ID": self.session.session_id}

    def step(self) -> None:
        self.llm.step()
        if self.daemon is not None:
            self.daemon.step()

    def gpu_columns(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        return self.gpu.columns() if self.gpu is not None else ({}, {})

    def close(self) -> list[str]:
        """Read what is left; the warnings for the summary line."""
        import shutil

        warnings = []
        self.llm.close()
        if self.llm.errors.count:
            warnings.append(f"LLM record {self.llm.path}: left out {self.llm.errors.count} line(s): "
                            + "; ".join(self.llm.errors.first[:3]))
        if self.tee_source is not None and self.tee_source.not_recorded:
            warnings.append(f"eBPF events: {self.tee_source.not_recorded} beyond {MAX_EVENTS_PER_KIND} per kind "
                            "counted in the session's metadata, not recorded as rows")
        if self.daemon is not None:
            if self.session.daemon_link.error:
                warnings.append(f"daemon: {self.session.daemon_link.error}; its policy does not see this sandbox")
            self.daemon.step(force=True)     # the thaw that followed the last freeze, the last requests
            if self.daemon.error:
                warnings.append(f"daemon events: {self.daemon.error}")
            if self.daemon.dropped:
                warnings.append(f"daemon events: the daemon's ring dropped {self.daemon.dropped} event(s)")
        if self.gpu is not None:
            if self.gpu.error:
                warnings.append(f"GPU samples: {self.gpu.error}")
            self.gpu.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        return warnings

    def metadata(self) -> dict[str, Any]:
        return {
            "llm_record": None if self._tmpdir else str(self.llm.path), "llm_record_rows": self.llm.rows,
            "llm_record_errors": self.llm.errors.first, "bpf_events": dict(self.tee_source.counts)
            if self.tee_source else {},
            "daemon": None if self.daemon is None else {
                "socket": str(self.daemon_socket), "events": self.daemon.events, "kinds": self.daemon.kinds,
                "llm_requests": self.daemon.llm_requests, "dropped": self.daemon.dropped, "error": self.daemon.error,
                "registered": self.session.daemon_link.registered, "register_error": self.session.daemon_link.error},
            "gpu": self.gpu_status if self.gpu is None else {"source": "nvml", "samples": self.gpu.samples,
                                                            "error": self.gpu.error},
        }
