"""The daemon's state file, and the plan for adopting what an earlier daemon left.

The cgroup tree is the truth about what exists; the state file (JSON, rewritten whole
with rename after each change, so a `kill -9` leaves the old or the new file, never
half of one) adds what the tree cannot hold: sandbox settings, and per running call its
tool, command, start times, hint and owner. No fsync: the file must survive a crash of
the daemon, not of the host (the cgroups do not survive a reboot either).

On start `plan_adoption` compares the two:
- a sandbox in both, or only in the tree (kept with default settings), is adopted;
- a sandbox only in the file is recreated (a restart loses no sandbox);
- a call in both is adopted and keeps being tracked; a call cgroup with no entry is
  adopted as tool "unknown" with no owner, so it is ended once its processes are gone;
- a call in the file whose cgroup vanished is "lost": it gets a record saying so.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.sandbox import TOOLS, tools_path, validate_name
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput

STATE_VERSION = 1
MAX_STATE_BYTES = 32 * 1024 * 1024


@dataclass
class SandboxEntry:
    name: str
    priority: str = "normal"
    memory_budget_bytes: int | None = None
    cpu_weight: int | None = None
    pids_max: int | None = None
    ephemeral: bool = False       # created by a toolcall.begin; removed when no longer used

    def set_fields(self) -> set[str]:
        """The settings a new sandbox must write: its priority and every limit given."""
        return {"priority"} | {k for k in ("memory_budget_bytes", "cpu_weight", "pids_max")
                               if getattr(self, k) is not None}


@dataclass
class CallEntry:
    call_id: str
    sandbox: str
    tool: str
    command: str
    start_monotonic_s: float
    start_wall_s: float
    priority: str = "normal"
    mem_hint_bytes: int | None = None
    grace_s: float = 5.0
    created_sandbox: bool = False
    owner_pid: int = 0            # the peer that began the call; 0: none (adopted unknown)
    owner_start_ticks: int = 0
    owner_uid: int = 0
    request_key: str | None = None    # the client's idempotency key (daemon/begin_keys.py)
    returned_monotonic_s: float | None = None
    returned_wall_s: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    adopted: int = 0              # how many daemon restarts this call lived through


@dataclass
class DaemonState:
    sandboxes: dict[str, SandboxEntry] = field(default_factory=dict)
    calls: dict[str, CallEntry] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"version": STATE_VERSION,
                           "sandboxes": [dataclasses.asdict(s) for s in self.sandboxes.values()],
                           "calls": [dataclasses.asdict(c) for c in self.calls.values()]}, sort_keys=True)


def load_state(path: Path) -> DaemonState:
    """The saved state; empty when there is no file. InvalidInput when it is unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return DaemonState()
    except OSError as exc:
        raise InvalidInput(f"state file {path}: cannot read it ({exc.strerror})") from None
    if len(raw) > MAX_STATE_BYTES:
        raise InvalidInput(f"state file {path} is larger than {MAX_STATE_BYTES} bytes; move it away")
    try:
        data = json.loads(raw)
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, this daemon reads {STATE_VERSION}")
        state = DaemonState()
        for item in data["sandboxes"]:
            entry = SandboxEntry(**item)
            state.sandboxes[validate_name(entry.name)] = entry
        for item in data["calls"]:
            entry = CallEntry(**item)
            state.calls[validate_name(entry.call_id, "call id")] = entry
        return state
    except (ValueError, TypeError, KeyError, AttributeError, AgentcgError) as exc:
        raise InvalidInput(f"state file {path} is not a valid agentcg daemon state ({exc})") from None


def save_state(path: Path, state: DaemonState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, state.to_json().encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass
class Adoption:
    sandboxes: list[SandboxEntry] = field(default_factory=list)   # exist in the tree
    recreate: list[SandboxEntry] = field(default_factory=list)    # only in the state file
    calls: list[CallEntry] = field(default_factory=list)          # cgroup present: keep tracking
    lost: list[CallEntry] = field(default_factory=list)           # cgroup gone while we were down

    def summary(self) -> dict[str, Any]:
        return {"sandboxes": len(self.sandboxes), "recreated": len(self.recreate),
                "calls": len(self.calls), "unknown_calls": sum(1 for c in self.calls if c.owner_pid == 0),
                "lost_calls": len(self.lost)}


def plan_adoption(tree: CgroupTree, state: DaemonState, now_monotonic_s: float, now_wall_s: float,
                  grace_s: float) -> Adoption:
    plan = Adoption()
    present = _tree_sandboxes(tree)
    for name, call_ids in present.items():
        entry = state.sandboxes.get(name) or SandboxEntry(name)
        plan.sandboxes.append(entry)
        for call_id in call_ids:
            call = state.calls.get(call_id)
            if call is None or call.sandbox != name:
                call = CallEntry(call_id=call_id, sandbox=name, tool="unknown", command="",
                                 start_monotonic_s=now_monotonic_s, start_wall_s=now_wall_s, grace_s=grace_s)
            call.adopted += 1
            plan.calls.append(call)
    plan.recreate = [entry for name, entry in state.sandboxes.items() if name not in present and not entry.ephemeral]
    adopted = {c.call_id for c in plan.calls}
    plan.lost = [c for call_id, c in state.calls.items() if call_id not in adopted]
    return plan


def _tree_sandboxes(tree: CgroupTree) -> dict[str, list[str]]:
    """sandbox -> call ids, from the cgroup tree (names that are not ours are skipped)."""
    out: dict[str, list[str]] = {}
    if not tree.exists(""):
        return out
    for name in tree.children(""):
        try:
            validate_name(name)
            calls = tree.children(tools_path(name)) if tree.exists(tools_path(name)) else []
        except (InvalidInput, CgroupGone):
            continue
        out[name] = [c for c in calls if _valid_call_id(c)]
    return out


def _valid_call_id(name: str) -> bool:
    try:
        validate_name(name, "call id")
    except InvalidInput:
        return False
    return name != TOOLS
