"""Replay recorded sessions on the real kernel under a sandbox policy.

    result = Replay(tree, plans, ReplayConfig(policy="agentcg", budget_bytes=3 << 30)).run()

Layout below the tree's root (`base`, default "replay"): the host budget is memory.max of
`base`; each session is a sandbox `base/<sandbox>` with its agent process in `agent` and
each tool call a process in `tools/<cNNNN>` (see controller/replay_workload.py).

Timeline. A session's call j starts at its recorded offset / speed + the session's delay,
and only after the calls that had ended before it began (the agent waited for them).
When a call ends late (frozen, throttled, starved), the delay grows by its lateness, so a
stalled call delays the rest of its session, as it would delay the agent. Call processes
are started ahead of time and told "go", so start-up does not count. Exits are seen at
once through pidfds; the policy runs every `tick_s`, through the same control core
(controller/core) as the daemon: one snapshot builder, one policy loop.

Outcomes. A call killed by the policy (a kill action that landed) is `policy_killed`; one
that died of SIGKILL otherwise was killed by the kernel's OOM killer (`oom_killed`: nothing
else here sends SIGKILL). A session whose agent process dies is lost: its remaining calls
are not run. Completion is the time from the start until the agent has followed the
whole recorded curve and every call is done.
"""
from __future__ import annotations

import math
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.core import CallInput, ControlCore, Inputs, SandboxInput
from agentcg.controller.enforce import Applied, Layout
from agentcg.controller.replay_result import CallResult, ReplayResult, SessionResult
from agentcg.controller.replay_session import CallPlan, SessionPlan
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput
from agentcg.policies.sandbox import GraduatedConfig

WORKLOAD = Path(__file__).with_name("replay_workload.py")
MAX_APPLIED_KEPT = 5000
# Under `agentcg`, the kernel's last resort takes low-priority calls first and agents last.
# Only raised, never lowered: lowering needs CAP_SYS_RESOURCE.
OOM_SCORE_ADJ = {"agent": 0, "high": 100, "normal": 400, "low": 800}


@dataclass(frozen=True)
class ReplayConfig:
    policy: str = "agentcg"
    budget_bytes: int | None = None
    tick_s: float = 0.05
    grace_s: float = 2.0
    hints: bool = False            # give each call its recorded peak as --mem-hint (an oracle)
    dry_run: bool = False
    timeout_s: float | None = None  # default: 3x the longest compressed session + 30 s

    def __post_init__(self) -> None:
        if self.budget_bytes is not None and self.budget_bytes < 16 << 20:
            raise InvalidInput(f"budget must be at least 16 MiB, got {self.budget_bytes} bytes")
        if not 0.005 <= self.tick_s <= 5:
            raise InvalidInput(f"tick must be 5 ms .. 5 s, got {self.tick_s} s")
        if not self.grace_s > 0:
            raise InvalidInput(f"grace must be positive, got {self.grace_s} s")


@dataclass
class _Call:
    plan: CallPlan
    proc: subprocess.Popen
    pidfd: int
    path: str
    go_s: float | None = None
    nominal_end_s: float = 0.0   # when it would end if it ran at recorded speed
    peak_bytes: int = 0


@dataclass
class _Session:
    plan: SessionPlan
    agent: subprocess.Popen | None = None
    agent_pidfd: int = -1
    agent_sent: tuple[int, float] | None = None
    delay_s: float = 0.0
    next_index: int = 0
    ready: dict[int, _Call] = field(default_factory=dict)      # started ahead, waiting for "go"
    pending: dict[int, float] = field(default_factory=dict)    # due, waiting for admission: since
    running: dict[int, _Call] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    results: list[CallResult] = field(default_factory=list)
    lost: bool = False
    finished_s: float | None = None
    peak_bytes: int = 0

    @property
    def over(self) -> bool:
        return self.lost or self.finished_s is not None


class Replay:
    def __init__(self, tree: CgroupTree, plans: list[SessionPlan], config: ReplayConfig, *,
                 base: str = "replay") -> None:
        if not plans:
            raise InvalidInput("nothing to replay: no sessions")
        self.tree, self.config, self.layout = tree, config, Layout(base)
        self.base = base
        self.speed = plans[0].speed
        self.core = ControlCore(tree, config.policy, config=GraduatedConfig(grace_s=config.grace_s),
                                dry_run=config.dry_run, locate=self.layout.locate)
        self.sessions = [_Session(plan) for plan in plans]
        self.applied: list[Applied] = []
        self.action_counts: Counter[str] = Counter()
        self.degraded: set[str] = set()
        self.samples: list[tuple[float, int]] = []
        longest = max(p.duration_s for p in plans) / self.speed
        self.timeout_s = config.timeout_s if config.timeout_s is not None else 3 * longest + 30
        self.t0 = 0.0
        self._admitted: set[tuple[str, str]] = set()

    # ---- the run ----------------------------------------------------------------------
    def run(self) -> ReplayResult:
        started = time.monotonic()
        timed_out = False
        try:
            self._setup()
            self.t0 = time.monotonic()
            next_tick = self.t0
            while not all(s.over for s in self.sessions):
                now = time.monotonic()
                if now - self.t0 > self.timeout_s:
                    timed_out = True
                    break
                for session in self.sessions:
                    self._advance(session, now)
                want_tick = any(s.pending for s in self.sessions)
                if now >= next_tick or want_tick:
                    self._tick(now)
                    next_tick = max(next_tick + self.config.tick_s, now)
                    self._start_admitted(time.monotonic())
                self._wait(min(next_tick, self._next_due()) - time.monotonic())
            host_peak = self._host_peak()
        finally:
            self._teardown()
        return self._result(time.monotonic() - started, host_peak, timed_out)

    def _setup(self) -> None:
        tree = self.tree
        tree.create(self.base)
        if self.config.budget_bytes is not None:
            tree.set_memory(self.base, max=self.config.budget_bytes)
        for session in self.sessions:
            plan = session.plan
            tree.create(self.layout.agent(plan.sandbox))
            tree.create(self.layout.tools(plan.sandbox))
        self._tick(time.monotonic())     # protections and static limits before anything runs
        for session in self.sessions:
            plan = session.plan
            session.agent = tree.spawn(self.layout.agent(plan.sandbox), [sys.executable, "-S", str(WORKLOAD), "agent"],
                                       stdin=subprocess.PIPE, preexec_fn=self._oom_adj("agent"))
            session.agent_pidfd = os.pidfd_open(session.agent.pid)
            self._prepare(session, 0)

    def _oom_adj(self, who: str):
        if self.config.policy != "agentcg" or who == "agent":
            return None
        value = str(OOM_SCORE_ADJ[who]).encode()

        def adjust() -> None:   # in the child before exec; a refusal leaves the kernel default
            try:
                fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
                try:
                    os.write(fd, value)
                finally:
                    os.close(fd)
            except OSError:
                pass
        return adjust

    def _prepare(self, session: _Session, index: int) -> _Call | None:
        """Start call `index`'s process ahead of time; it waits for "go"."""
        plan = session.plan
        if index >= len(plan.calls) or index in session.ready or session.lost:
            return session.ready.get(index)
        call = plan.calls[index]
        path = self.layout.call(plan.sandbox, call.name)
        self.tree.create(path)
        proc = self.tree.spawn(path, [sys.executable, "-S", str(WORKLOAD), "call"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, preexec_fn=self._oom_adj(plan.priority))
        spec = '{"steps": [%s]}\n' % ", ".join(f"[{w!r}, {b}, {c!r}]" for w, b, c in call.steps)
        proc.stdin.write(spec.encode())
        proc.stdin.flush()
        session.ready[index] = _Call(call, proc, os.pidfd_open(proc.pid), path)
        return session.ready[index]

    def _advance(self, session: _Session, now: float) -> None:
        if session.over:
            return
        plan = session.plan
        self._reap(session, now)
        if session.lost:
            return
        offset_s = (now - self.t0 - session.delay_s) * self.speed
        level = plan.agent_at(offset_s)
        if level != session.agent_sent and session.agent is not None:
            self._tell_agent(session, level)
        while session.next_index < len(plan.calls):
            call = plan.calls[session.next_index]
            due = self.t0 + call.start_s / self.speed + session.delay_s
            if now < due or any(i not in session.done for i in call.wait_for):
                break
            session.pending[session.next_index] = now
            self._prepare(session, session.next_index)   # its cgroup exists before admission writes to it
            if self.config.hints:
                self.core.add_pending(plan.sandbox, call.name, call.tool, self._hint(call), now)
            session.next_index += 1
        if not self.config.hints:
            self._start_admitted_session(session, now, list(session.pending))
        if (session.next_index >= len(plan.calls) and not session.running and not session.pending
                and offset_s >= plan.duration_s):
            self._finish_agent(session)
            session.finished_s = time.monotonic() - self.t0

    def _tell_agent(self, session: _Session, level: tuple[int, float]) -> None:
        try:
            session.agent.stdin.write(f"{level[0]} {level[1]:.3f}\n".encode())
            session.agent.stdin.flush()
            session.agent_sent = level
        except BrokenPipeError:
            pass   # it died: _reap sees it

    def _finish_agent(self, session: _Session) -> None:
        if session.agent is None:
            return
        try:
            session.agent.stdin.close()
        except BrokenPipeError:
            pass
        try:
            session.agent.wait(timeout=5)
        except subprocess.TimeoutExpired:
            session.agent.kill()
            session.agent.wait()

    def _reap(self, session: _Session, now: float) -> None:
        for index, call in list(session.running.items()):
            if call.proc.poll() is None:
                continue
            del session.running[index]
            session.done.add(index)
            self._close_call(session, call, now)
        agent = session.agent
        if agent is not None and agent.poll() is not None and session.finished_s is None:
            session.lost = True
            self._abandon(session, now)

    def _close_call(self, session: _Session, call: _Call, now: float) -> None:
        rc = call.proc.returncode
        try:
            call.peak_bytes = max(call.peak_bytes, self.tree.memory_peak(call.path))
        except AgentcgError:
            pass
        os.close(call.pidfd)
        self._remove(call.path)
        key = (session.plan.sandbox, call.plan.name)
        call.peak_bytes = max(call.peak_bytes, self.core.peaks.get(key, 0))
        killed = key in self.core.killed
        message = self.core.killed.get(key)
        if killed:
            outcome = "policy_killed"
        elif rc == -signal.SIGKILL:
            outcome = "oom_killed"
        else:
            outcome = "ok" if rc == 0 else "failed"
        duration = now - call.go_s if call.go_s is not None else None
        alloc = _alloc_samples(call.proc) if outcome == "ok" else ()
        _close_stream(call.proc.stdout)
        if call.go_s is not None:
            session.delay_s = max(session.delay_s, now - call.nominal_end_s)
        self.core.call_ended(session.plan.sandbox, call.plan.name, call.plan.tool, call.peak_bytes or None,
                             oom_killed=outcome == "oom_killed", now=now - self.t0)
        self.core.killed.pop(key, None)
        session.results.append(CallResult(session.plan.session_id, call.plan.name, call.plan.record_id,
                                          call.plan.tool, outcome, duration, call.plan.duration_s / self.speed,
                                          call.peak_bytes or None, message, alloc))

    def _abandon(self, session: _Session, now: float) -> None:
        """The agent died: the session is lost; kill and count what is left."""
        for index, call in list(session.running.items()) + list(session.ready.items()):
            try:
                self.tree.kill(call.path)
            except AgentcgError:
                pass
            call.proc.wait()
            os.close(call.pidfd)
            _close_stream(call.proc.stdout)
            self._remove(call.path)
            if index in session.running:
                session.results.append(CallResult(session.plan.session_id, call.plan.name, call.plan.record_id,
                                                  call.plan.tool, "failed", now - (call.go_s or now),
                                                  call.plan.duration_s / self.speed, None, "its agent died"))
        session.running.clear()
        session.ready.clear()
        session.pending.clear()
        _close_quiet(session.agent_pidfd)
        session.agent_pidfd = -1
        _close_stream(session.agent.stdin)
        session.agent = None

    # ---- admission and start ----------------------------------------------------------
    def _start_admitted(self, now: float) -> None:
        for session in self.sessions:
            admitted = [i for i in session.pending if (session.plan.sandbox,
                                                       session.plan.calls[i].name) in self._admitted]
            self._start_admitted_session(session, now, admitted)

    def _start_admitted_session(self, session: _Session, now: float, indices: list[int]) -> None:
        for index in indices:
            session.pending.pop(index, None)
            call = self._prepare(session, index)
            if call is None:
                continue
            del session.ready[index]
            call.go_s = now
            call.nominal_end_s = now + call.plan.duration_s / self.speed
            try:
                call.proc.stdin.write(b"go\n")
                call.proc.stdin.close()
            except BrokenPipeError:
                pass
            session.running[index] = call
            self._prepare(session, index + 1)

    # ---- policy: the control core's step --------------------------------------------
    def _tick(self, now: float) -> None:
        sandboxes = tuple(SandboxInput(s.plan.sandbox, self.layout.sandbox(s.plan.sandbox), s.plan.priority)
                          for s in self.sessions)
        calls = tuple(CallInput(s.plan.sandbox, c.plan.name, c.plan.tool, c.path, c.go_s or now, self._hint(c.plan))
                      for s in self.sessions for c in s.running.values())
        inputs = Inputs(sandboxes, calls, host_path=self.base, host_budget_bytes=self.config.budget_bytes,
                        missing_as_zero=True, read_psi=False)
        step = self.core.step(inputs, now, time_s=now - self.t0 if self.t0 else 0.0)
        self.samples.append((now, step.readings.host_bytes))
        for session in self.sessions:
            session.peak_bytes = max(session.peak_bytes, step.readings.sandbox_bytes.get(session.plan.sandbox, 0))
        self._admitted = {key for key, _, _ in step.admitted}
        for _, action in step.deferred:
            self.action_counts[action.kind] += 1
        for key, action, _ in step.admitted:
            if action.value_bytes is None:
                self.action_counts[action.kind] += 1
        for applied in step.applied:
            action = applied.action
            self.action_counts[action.kind] += 1
            if len(self.applied) < MAX_APPLIED_KEPT:
                self.applied.append(applied)
            if applied.degraded:
                note = applied.detail
                self.degraded.add(f"{action.kind}: {note[note.find('(') + 1:note.rfind(')')] if '(' in note else note}")

    def _hint(self, call: CallPlan) -> int | None:
        return call.peak_bytes if self.config.hints else None

    # ---- waiting, results, clean-up ---------------------------------------------------
    def _next_due(self) -> float:
        due = math.inf
        for session in self.sessions:
            if not session.over and session.next_index < len(session.plan.calls):
                call = session.plan.calls[session.next_index]
                due = min(due, self.t0 + call.start_s / self.speed + session.delay_s)
        return due

    def _wait(self, timeout_s: float) -> None:
        fds = [c.pidfd for s in self.sessions for c in s.running.values()]
        fds += [s.agent_pidfd for s in self.sessions if s.agent_pidfd >= 0 and not s.over]
        timeout_s = min(max(0.0, timeout_s), self.config.tick_s)
        if fds:
            select.select(fds, [], [], timeout_s)
        else:
            time.sleep(timeout_s)

    def _host_peak(self) -> int:
        peak = max((usage for _, usage in self.samples), default=0)
        try:
            peak = max(peak, self.tree.memory_peak(self.base))
        except AgentcgError:
            pass
        return peak

    def _remove(self, path: str) -> None:
        try:
            self.tree.remove(path)
        except CgroupGone:
            pass

    def _teardown(self) -> None:
        for session in self.sessions:
            for call in list(session.running.values()) + list(session.ready.values()):
                call.proc.kill()
            if session.agent is not None:
                session.agent.kill()
        try:
            if self.tree.exists(self.base):
                self.tree.remove(self.base, timeout_s=10.0)
        finally:
            for session in self.sessions:
                for call in list(session.running.values()) + list(session.ready.values()):
                    call.proc.wait()
                    _close_quiet(call.pidfd)
                    if call.proc.stdin and not call.proc.stdin.closed:
                        _close_stream(call.proc.stdin)
                    if call.proc.stdout and not call.proc.stdout.closed:
                        _close_stream(call.proc.stdout)
                if session.agent is not None:
                    session.agent.wait()
                    _close_stream(session.agent.stdin)
                if session.agent_pidfd >= 0:
                    _close_quiet(session.agent_pidfd)
                    session.agent_pidfd = -1

    def _result(self, wall_s: float, host_peak: int, timed_out: bool) -> ReplayResult:
        sessions, calls = [], []
        for session in self.sessions:
            plan = session.plan
            ran = {r.call for r in session.results}
            results = session.results + [
                CallResult(plan.session_id, c.name, c.record_id, c.tool, "not_run", None, c.duration_s / self.speed,
                           None, "its session was lost" if session.lost else "the replay timed out")
                for c in plan.calls if c.name not in ran]
            calls.extend(results)
            count = Counter(r.outcome for r in results)
            survived = not session.lost and session.finished_s is not None
            alloc = sorted(x for r in results for x in r.alloc_s)
            sessions.append(SessionResult(plan.session_id, plan.priority, survived,
                                          session.finished_s if survived else None, plan.duration_s / self.speed,
                                          len(plan.calls), count["ok"], count["oom_killed"], count["policy_killed"],
                                          count["not_run"], session.peak_bytes,
                                          alloc[min(len(alloc) - 1, int(0.95 * len(alloc)))] if alloc else None))
        return ReplayResult(self.config.policy, self.config.budget_bytes, self.speed, self.tree.kind, sessions,
                            calls, host_peak, _time_mean(self.samples), dict(self.action_counts),
                            self.applied, sorted(self.degraded), wall_s, timed_out)


def _alloc_samples(proc: subprocess.Popen) -> tuple[float, ...]:
    """The chunk latencies a finished call wrote (replay_workload.py); () if it wrote none."""
    import json

    try:
        line = proc.stdout.readline() if proc.stdout is not None else b""
        return tuple(float(x) for x in json.loads(line)["alloc_s"])
    except (ValueError, KeyError, TypeError, OSError):
        return ()


def _time_mean(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 2:
        return float(samples[0][1]) if samples else 0.0
    area = sum((t1 - t0) * u0 for (t0, u0), (t1, _) in zip(samples, samples[1:]))
    return area / (samples[-1][0] - samples[0][0])


def _close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _close_stream(stream) -> None:
    try:
        stream.close()
    except (BrokenPipeError, OSError):
        pass
