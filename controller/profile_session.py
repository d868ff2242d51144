"""`agentcg profile`: run a whole agent as one sandbox session and record it as a trace.

    summary = profile_command(["bash", "-c", "ls; python3 x.py"], Path("t"), interval_s=0.1)

The command runs in `<root>/<sandbox>/agent`; the exec detector of `sandbox exec`
(agentcg.controller.autodetect) moves each command it starts into its own tool-call
cgroup. One loop, on the main thread, polls the detector's eBPF events and, every
`interval_s`, samples the sandbox and each running call (agentcg.controller.sampler) into
the trace. A call's row is written when it starts and again when it ends (the last row
wins), so a recording cut short still shows it. SIGINT and SIGTERM only set a flag: the
loop passes the signal to the agent, gives it `STOP_GRACE_S` to exit, then kills the
sandbox, ends every call and closes the trace; nothing recorded is lost. The sandbox's
cgroups are removed on every path out.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TextIO

from agentcg.errors import CgroupExists, InvalidInput, TraceError
from agentcg.controller.sampler import SCOPE_SANDBOX, CgroupSample, SandboxSampler
from agentcg.records import ToolCallRecord, shell_exit_code, truncate_command
from agentcg.units import format_bytes

if TYPE_CHECKING:
    from agentcg.controller.autodetect import ExecDetector
    from agentcg.controller.cgroup import CgroupTree
    from agentcg.controller.toolcall import ToolCall

INTERVAL_RANGE_S = (0.01, 60.0)
BPF_CONCERNS = ("process", "exit_codes", "memory", "sched", "block")
STOP_GRACE_S = 2.0            # after SIGINT/SIGTERM, the agent's time to exit before the kill
END_GRACE_S = 1.0             # after the agent exits, its calls' background processes' time
STATUS_EVERY_S = 0.25
POLL_MAX_S = 0.05             # longest wait for eBPF events in one turn
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ProfileSummary:
    trace: Path
    session_id: str
    sandbox: str
    returncode: int               # the agent's exit code; 128+N when a signal ended it or us
    stopped_by: int | None        # the signal that stopped the recording, None when the agent ended
    wall_s: float
    tool_calls: int
    samples: int
    peak_memory_bytes: int | None  # the sandbox's highest sampled memory
    events: int = 0                # rows of the events table
    llm_requests: int = 0
    warnings: tuple[str, ...] = ()  # sources that failed or lines left out (also in the session's metadata)

    def line(self) -> str:
        peak = "-" if self.peak_memory_bytes is None else format_bytes(self.peak_memory_bytes)
        how = f"stopped by signal {self.stopped_by}" if self.stopped_by else f"exit {self.returncode}"
        warn = "".join(f"\nagentcg profile: {w}" for w in self.warnings)
        return (f"agentcg profile: {how}, {self.wall_s:.1f} s, {self.tool_calls} tool call(s), "
                f"{self.samples} samples, {self.events} event(s), {self.llm_requests} LLM request(s), "
                f"sandbox peak {peak}; wrote {self.trace}{warn}")


@dataclass(frozen=True)
class SourceOptions:
    """What `agentcg profile` records besides calls and cgroup samples (controller/profile_sources.py)."""

    memory_max_bytes: int | None = None   # memory.max of the sandbox (None: no limit)
    memory_budget_bytes: int | None = None  # the budget registered with the daemon (its policy acts on it)
    llm_record: Path | None = None        # the agent's LLM record file (None: a private temporary one)
    daemon_socket: Path | None | bool = None   # None: the daemon's socket if it exists; False: never
    nvml: Any = None                      # a pynvml-like module (tests); None: pynvml if installed
    proc_root: str = "/proc"


def default_sandbox_name(argv: Sequence[str], pid: int | None = None) -> str:
    """`profile-<program>-<pid>`, reduced to the characters a cgroup name may hold."""
    program = _NAME_RE.sub("_", os.path.basename(argv[0]) if argv else "cmd").strip("._") or "cmd"
    return f"profile-{program[:40]}-{os.getpid() if pid is None else pid}"


def default_trace_path(now_s: float | None = None) -> Path:
    return Path(time.strftime("agentcg-profile-%Y%m%d-%H%M%S", time.localtime(now_s)))


def check_interval(interval_s: float) -> float:
    low, high = INTERVAL_RANGE_S
    if not low <= interval_s <= high:
        raise InvalidInput(f"--interval must be {low * 1000:.0f} ms .. {high:.0f} s, got {interval_s:g} s")
    return interval_s


class _StopFlag:
    """SIGINT/SIGTERM set `signum` (the loop acts on it); the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = self.signum or signum
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Progress:
    """What the status line and the summary show."""

    started_mono_s: float
    samples: int = 0
    ended_calls: int = 0
    running: list[str] = field(default_factory=list)
    last: CgroupSample | None = None
    peak_memory_bytes: int | None = None

    def note(self, sample: CgroupSample) -> None:
        self.samples += 1
        if sample.scope == SCOPE_SANDBOX:
            self.last = sample
            if sample.memory_bytes is not None:
                self.peak_memory_bytes = max(self.peak_memory_bytes or 0, sample.memory_bytes)

    def line(self, now_mono_s: float) -> str:
        s = self.last
        mem = "-" if s is None or s.memory_bytes is None else format_bytes(s.memory_bytes)
        peak = "-" if self.peak_memory_bytes is None else format_bytes(self.peak_memory_bytes)
        cpu = "-" if s is None or s.cpu_cores is None else f"{s.cpu_cores:.2f}"
        psi = "-" if s is None or s.psi_memory_some_avg10_pct is None else (
            f"{s.psi_memory_some_avg10_pct:.1f}/{s.psi_memory_full_avg10_pct:.1f}%")
        running = ",".join(self.running[-3:]) or "-"
        return (f"profile {now_mono_s - self.started_mono_s:.1f}s  calls {self.ended_calls} done, running {running}"
                f"  mem {mem} peak {peak}  cpu {cpu}  psi mem {psi}  {self.samples} samples")


class StatusLine:
    """One line on a TTY, rewritten in place; nothing on anything else."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._last_s = 0.0

    def update(self, text: str, now_s: float) -> None:
        if self.live and now_s - self._last_s >= STATUS_EVERY_S:
            self._last_s = now_s
            self.stream.write("\r\x1b[K" + text[: _columns() - 1])
            self.stream.flush()

    def finish(self, summary: str) -> None:
        self.stream.write(("\r\x1b[K" if self.live else "") + summary + "\n")
        self.stream.flush()


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 120


def profile_command(argv: Sequence[str], output: Path, *, sandbox: str | None = None, interval_s: float = 0.1,
                    root: str = "agentcg", state: Path | None = None, status: TextIO | None = None,
                    tree: "CgroupTree | None" = None, monitor_factory: Callable[[], Any] | None = None,
                    sources: SourceOptions = SourceOptions()) -> ProfileSummary:
    """Run `argv` as a sandbox session with automatic tool-call detection and record it
    into the new trace `output`. Returns when the command (and its calls) ended, or after a
    SIGINT/SIGTERM stopped it; the trace is complete either way."""
    from agentcg.controller.cgroup import open_tree
    from agentcg.controller.sandbox import validate_name
    from agentcg.controller.toolcall import ToolCallManager
    from agentcg.profiler.recorder import TraceRecorder

    argv = list(argv)
    if not argv:
        raise InvalidInput("agentcg profile: no command given; usage: agentcg profile -o TRACE -- CMD ...")
    check_interval(interval_s)
    sandbox = validate_name(sandbox if sandbox is not None else default_sandbox_name(argv))
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise TraceError(f"{output}: already exists; pass a new trace path with -o")
    # a .zip is written at the end from the directory the recorder fills meanwhile
    recording = output.with_name(output.name + ".recording") if output.suffix == ".zip" else output
    if recording != output and recording.exists():
        raise TraceError(f"{recording}: left by an earlier recording; read it with `agentcg report`, then remove it")
    setup_start = time.time()
    tree = open_tree(root=root) if tree is None else tree
    if tree.exists(sandbox):
        raise CgroupExists(f"sandbox {sandbox!r} already exists below {tree.root}; pick another --sandbox, "
                           f"or remove it with `agentcg sandbox rm {sandbox}`")
    from agentcg.controller.profile_daemon import open_daemon

    daemon = open_daemon(sources.daemon_socket)
    if daemon is None and sources.memory_budget_bytes is not None:
        raise InvalidInput("--memory-budget: no agentcg daemon socket to register the sandbox with; "
                           "start `agentcg daemon` or pass --daemon-socket")
    monitor = _open_monitor() if monitor_factory is None else monitor_factory()
    status_line = StatusLine(sys.stderr if status is None else status)
    try:
        mgr = ToolCallManager(tree, monitor=monitor, state=state)
        recorder = TraceRecorder(recording, source="agentcg")
        try:
            if daemon is not None:       # before our own set-up: the daemon creates it as it does any sandbox
                daemon.register(sandbox, sources.memory_budget_bytes)
            try:
                mgr.ensure_sandbox(sandbox)
                if sources.memory_max_bytes is not None:
                    tree.set_memory(sandbox, max=sources.memory_max_bytes)
                summary = _Session(argv, sandbox, interval_s, mgr, recorder, status_line, setup_start,
                                   sources, root, daemon).run()
            finally:
                mgr.close(kill=True)
                if daemon is not None:
                    daemon.unregister()
                _remove_sandbox(tree, sandbox)
        finally:
            recorder.close()
    finally:
        if daemon is not None:
            daemon.close()
        monitor.close()
    if recording != output:
        _pack(recording, output)
        summary = dataclasses.replace(summary, trace=output)
    status_line.finish(summary.line())
    return summary


def _pack(directory: Path, archive: Path) -> None:
    import shutil

    from agentcg.profiler.trace import read_trace, write_trace

    write_trace(read_trace(directory), archive)
    shutil.rmtree(directory)


def _open_monitor() -> Any:
    from agentcg.bpf.monitor import BpfMonitor
    from agentcg.errors import BpfError

    try:
        return BpfMonitor(concerns=BPF_CONCERNS)
    except BpfError as exc:
        raise BpfError(f"agentcg profile detects tool calls from eBPF exec events, which failed to load: {exc}; "
                       "`agentcg doctor` says what the host lacks") from None


def _remove_sandbox(tree: "CgroupTree", sandbox: str) -> None:
    from agentcg.errors import CgroupGone

    try:
        tree.remove(sandbox)
    except CgroupGone:
        pass
    # the root is shared with other sandboxes: remove it only when nothing else is below it
    if tree.exists("") and not tree.children("") and not tree.is_populated(""):
        try:
            tree.remove("")
        except CgroupGone:
            pass


class _Session:
    def __init__(self, argv: list[str], sandbox: str, interval_s: float, mgr: Any, recorder: Any,
                 status: StatusLine, setup_start_s: float, options: SourceOptions = SourceOptions(),
                 root: str = "agentcg", daemon_link: Any = None) -> None:
        self.argv = argv
        self.sandbox = sandbox
        self.interval_s = interval_s
        self.mgr = mgr
        self.tree = mgr.tree
        self.recorder = recorder
        self.status = status
        self.setup_start_s = setup_start_s
        self.session_id = f"{sandbox}-{int(setup_start_s)}"
        self.sampler = SandboxSampler(self.tree, sandbox)
        self.announced: set[str] = set()
        self.progress = _Progress(time.monotonic())
        self.options = options
        self.root = root
        self.daemon_link = daemon_link
        self.events = 0
        self.llm_requests = 0

    def run(self) -> ProfileSummary:
        from agentcg.controller.autodetect import ExecDetector
        from agentcg.controller.sandbox import agent_path

        from agentcg.controller.profile_sources import SessionSources

        self.sources = SessionSources.open(self, self.options)
        tee = self.sources.tee(self.mgr.monitor, lambda cgroup_id: self._call_of_cgroup(detector, cgroup_id))
        detector = ExecDetector(self.mgr, tee, self.sandbox, agent_pid=0, on_record=self._ended)
        detector.prepare()
        start_s = time.time()
        self.recorder.add_session(self.session_id, self.sandbox, start_s, **self._session_columns(start_s))
        proc = None
        stopped_by = None
        returncode = 127
        try:
            with _StopFlag() as stop:
                try:
                    proc = self.tree.spawn(agent_path(self.sandbox), self.argv, env=self.sources.agent_env())
                except FileNotFoundError:
                    self.status.finish(f"agentcg: {self.argv[0]}: command not found")
                except PermissionError as exc:
                    self.status.finish(f"agentcg: {self.argv[0]}: {exc.strerror}")
                    returncode = 126
                if proc is not None:
                    detector.agent_pid = proc.pid
                    returncode = self._loop(proc, detector, stop)
                    stopped_by = stop.signum
                self._sample(detector)
                detector.close(grace_s=END_GRACE_S)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            end_s = time.time()
            warnings = self.sources.close()
            self.recorder.add_session(self.session_id, self.sandbox, start_s,
                                      **self._session_columns(start_s, self.sources.metadata()))
            self.recorder.end_session(self.session_id, end_s)
        return ProfileSummary(
            trace=self.recorder.path, session_id=self.session_id, sandbox=self.sandbox, returncode=returncode,
            stopped_by=stopped_by, wall_s=end_s - start_s, tool_calls=self.progress.ended_calls,
            samples=self.progress.samples, peak_memory_bytes=self.progress.peak_memory_bytes,
            events=self.events, llm_requests=self.llm_requests, warnings=tuple(warnings))

    def _call_of_cgroup(self, detector: "ExecDetector", cgroup_id: int) -> str | None | bool:
        """The call whose cgroup this is; None for the agent's own cgroup; False: not ours."""
        if cgroup_id == detector.agent_cgroup_id:
            return None
        for tracked in list(detector._by_pid.values()):
            if tracked.call.cgroup_id == cgroup_id:
                return tracked.call.call_id
        return False

    def add_event(self, time_s: float, kind: str, **columns: Any) -> None:
        self.events += 1
        self.recorder.add_event(self.session_id, time_s, kind, **columns)

    def add_llm(self, row: dict[str, Any]) -> None:
        self.llm_requests += 1
        row = dict(row)
        self.recorder.add_llm_request(self.session_id, row.pop("time_s"), **row)

    def _loop(self, proc: Any, detector: "ExecDetector", stop: _StopFlag) -> int:
        next_sample = time.monotonic()
        stop_deadline = None
        while True:
            now = time.monotonic()
            if now >= next_sample:
                self._sample(detector)
                next_sample = max(next_sample + self.interval_s, now)
                self.status.update(self.progress.line(now), now)
            detector.step(min(POLL_MAX_S, max(0.0, next_sample - time.monotonic())))
            self.sources.step()
            rc = proc.poll()
            if rc is not None:
                detector.agent_exited(rc)
                return shell_exit_code(rc)
            if stop.signum is not None and stop_deadline is None:
                stop_deadline = time.monotonic() + STOP_GRACE_S
                _signal(proc.pid, stop.signum)   # a Ctrl-C on a terminal reached it already; SIGTERM did not
            if stop_deadline is not None and (time.monotonic() >= stop_deadline or stop.count > 1):
                self.tree.kill(self.sandbox)     # the agent and every call: bash may have become one
                proc.wait()
                detector.agent_exited(proc.returncode)
                return 128 + stop.signum

    def _sample(self, detector: "ExecDetector") -> None:
        calls = _active_calls(detector)
        self.progress.running = [c.tool for c in calls]
        for call in calls:
            if call.call_id not in self.announced:
                self.announced.add(call.call_id)
                self.recorder.add_toolcall(self.session_id, _started_record(call))
        whole, per_call = self.sources.gpu_columns()
        for sample in self.sampler.sample(calls):
            gpu = whole if sample.scope == SCOPE_SANDBOX else per_call.get(sample.call_id or "", {})
            self.recorder.add_sample(self.session_id, self.sandbox, sample.time_s, **sample.trace_columns(), **gpu)
            self.progress.note(sample)

    def _ended(self, record: ToolCallRecord) -> None:
        self.announced.discard(record.call_id)
        self.progress.ended_calls += 1
        self.recorder.add_toolcall(self.session_id, record)

    def _session_columns(self, start_s: float, sources: dict[str, Any] | None = None) -> dict[str, Any]:
        metadata = {"command": truncate_command(self.argv), "host": socket.gethostname(),
                    "kernel": platform.release(), "cgroup_layout": self.tree.kind, "interval_s": self.interval_s,
                    "bpf_concerns": list(getattr(self.mgr.monitor, "concerns", ())), **(sources or {})}
        limit = self.options.memory_max_bytes
        return {"memory_limit_bytes": limit, "source": "agentcg", "agent": os.path.basename(self.argv[0]),
                "setup_s": max(0.0, start_s - self.setup_start_s), "untraced_s": 0.0,
                "metadata": json.dumps(metadata, sort_keys=True)}


def _active_calls(detector: "ExecDetector") -> list["ToolCall"]:
    """The calls the detector moved a process into (not its spare cgroups, not commands that
    exited before they could be moved: their cgroups hold nothing to sample)."""
    return [t.call for t in list(detector._by_pid.values()) if t.moved]


def _started_record(call: "ToolCall") -> ToolCallRecord:
    return ToolCallRecord(sandbox=call.sandbox, call_id=call.call_id, tool=call.tool, command=call.command,
                          start_monotonic_s=call.start_monotonic_s, start_wall_s=call.start_wall_s,
                          priority=call.priority, mem_hint_bytes=call.mem_hint_bytes)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
