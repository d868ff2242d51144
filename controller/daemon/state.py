"""The daemon's state (a snapshot plus an append-only journal), and the plan for adopting
what an earlier daemon left.

The cgroup tree is the truth about what exists; the state adds what the tree cannot hold:
sandbox settings, and per running call its tool, command, start times, hint and owner.
It lives in two files in the state directory:
- `state.json`, a snapshot, replaced whole with rename (agentcg.safefile.atomic_write,
  mode 0600), so a `kill -9` leaves the old or the new file, never half of one;
- `state.journal`, one JSON line per change since that snapshot (a sandbox or call set to
  a value, or removed), appended with one write(2) each. Only what changed is written, so
  a change costs the same with 10 or 10,000 running calls; when the journal is longer
  than `COMPACT_MIN_LINES` and twice the number of live entries, a new snapshot replaces
  both (amortised O(1) per change). Replaying a journal onto a snapshot that already holds
  its changes gives the same state (every line is a whole value or a removal), so a crash
  between writing the snapshot and truncating the journal loses nothing; a last line
  without its newline (a crash mid-write) is ignored.
No fsync: the state must survive a crash of the daemon, not of the host (the cgroups do
not survive a reboot either).

On start `plan_adoption` compares the state with the tree:
- a sandbox in both, or only in the tree (kept with default settings), is adopted;
- a sandbox only in the state is recreated (a restart loses no sandbox);
- a call in both is adopted and keeps being tracked; a call cgroup with no entry is
  adopted as tool "unknown" with no owner: it is recorded once its processes are gone;
- a call in the state whose cgroup vanished is "lost": it gets a record saying so.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.controller.cgroup import CgroupTree
from agentcg.controller.sandbox import TOOLS, tools_path, validate_name
from agentcg.errors import AgentcgError, CgroupGone, InvalidInput
from agentcg.safefile import atomic_write, ensure_private_dir, open_private, read_private

STATE_VERSION = 1
MAX_STATE_BYTES = 32 * 1024 * 1024
MAX_JOURNAL_BYTES = 256 * 1024 * 1024
COMPACT_MIN_LINES = 4096


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


class TrackedDict(dict):
    """A dict that remembers which keys were set or removed since `take_dirty()`."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.dirty: set[str] = set(self)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.dirty.add(key)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.dirty.add(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self.dirty.add(key)
        return super().pop(key, *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def clear(self) -> None:
        self.dirty |= set(self)
        super().clear()

    def popitem(self) -> tuple[str, Any]:
        key, value = super().popitem()
        self.dirty.add(key)
        return key, value

    def take_dirty(self) -> set[str]:
        dirty, self.dirty = self.dirty, set()
        return dirty


@dataclass
class DaemonState:
    """Change `sandboxes` / `calls` by assigning or removing keys (an entry changed in place
    must be assigned again to be saved): `save_state` writes only those keys."""

    sandboxes: dict[str, SandboxEntry] = field(default_factory=TrackedDict)
    calls: dict[str, CallEntry] = field(default_factory=TrackedDict)
    journal: "StateJournal | None" = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.sandboxes, TrackedDict):
            self.sandboxes = TrackedDict(self.sandboxes)
        if not isinstance(self.calls, TrackedDict):
            self.calls = TrackedDict(self.calls)

    def to_json(self) -> str:
        # the entries hold plain values only: vars() is what dataclasses.asdict gives, at a
        # fraction of its cost (a compaction with 10,000 calls runs inside one loop turn)
        return json.dumps({"version": STATE_VERSION,
                           "sandboxes": [dict(vars(s)) for s in self.sandboxes.values()],
                           "calls": [dict(vars(c)) for c in self.calls.values()]}, sort_keys=True,
                          separators=(",", ":"))


def journal_path(path: Path) -> Path:
    return path.with_name(path.stem + ".journal")


def load_state(path: Path) -> DaemonState:
    """The saved state (snapshot + journal); empty when there is none. InvalidInput when
    either is unreadable or not ours (the daemon then moves both aside)."""
    raw = _read_bounded(path, MAX_STATE_BYTES)
    journal = _read_bounded(journal_path(path), MAX_JOURNAL_BYTES) or b""
    state = DaemonState()
    try:
        if raw is not None:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                version = data.get("version") if isinstance(data, dict) else None
                raise ValueError(f"version {version!r}, this daemon reads {STATE_VERSION}")
            for item in data["sandboxes"]:
                _set(state, "sandbox", item)
            for item in data["calls"]:
                _set(state, "call", item)
        for number, line in enumerate(journal.split(b"\n")[:-1], 1):   # no newline at the end: ignored
            op = json.loads(line)
            kind, value = op["op"], op["value"]
            if kind in ("sandbox", "call"):
                _set(state, kind, value)
            elif kind == "-sandbox":
                state.sandboxes.pop(validate_name(value), None)
            elif kind == "-call":
                state.calls.pop(validate_name(value, "call id"), None)
            else:
                raise ValueError(f"journal line {number}: unknown op {kind!r}")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, AgentcgError) as exc:
        raise InvalidInput(f"state file {path} is not a valid agentcg daemon state ({str(exc)[:300]})") from None
    state.sandboxes.take_dirty()
    state.calls.take_dirty()
    return state


def _set(state: DaemonState, kind: str, item: Any) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"a {kind} entry must be an object, got {type(item).__name__}")
    if kind == "sandbox":
        entry = SandboxEntry(**item)
        state.sandboxes[validate_name(entry.name)] = entry
    else:
        call = CallEntry(**item)
        state.calls[validate_name(call.call_id, "call id")] = call


def _read_bounded(path: Path, limit: int) -> bytes | None:
    try:
        return read_private(path, limit)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidInput(f"state file {path}: cannot read it ({exc.strerror})") from None


class StateJournal:
    """The open journal of one state file (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path, self.journal = path, journal_path(path)
        self.lines = 0
        self.fd = -1

    def compact(self, state: DaemonState) -> None:
        state.sandboxes.take_dirty()
        state.calls.take_dirty()
        atomic_write(self.path, state.to_json(), 0o600, fsync=False)
        if self.fd < 0:
            self.fd = open_private(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, 0)
        self.lines = 0

    def append(self, state: DaemonState) -> None:
        lines = []
        for name in sorted(state.sandboxes.take_dirty()):
            entry = state.sandboxes.get(name)
            lines.append({"op": "sandbox", "value": dict(vars(entry))} if entry is not None
                         else {"op": "-sandbox", "value": name})
        for call_id in sorted(state.calls.take_dirty()):
            call = state.calls.get(call_id)
            lines.append({"op": "call", "value": dict(vars(call))} if call is not None
                         else {"op": "-call", "value": call_id})
        if lines:
            data = "".join(json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n" for line in lines)
            view = memoryview(data.encode())
            while view:          # O_APPEND: each write lands at the end
                view = view[os.write(self.fd, view):]
            self.lines += len(lines)
        if self.lines > max(COMPACT_MIN_LINES, 2 * (len(state.calls) + len(state.sandboxes))):
            self.compact(state)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def save_state(path: Path, state: DaemonState) -> None:
    """Persist what changed in `state` since the last call: the first call on a state
    writes a fresh snapshot (and empties the journal), later ones append to the journal."""
    if state.journal is None or state.journal.path != path:
        ensure_private_dir(path.parent, 0o755)
        state.journal = StateJournal(path)
        state.journal.compact(state)
    else:
        state.journal.append(state)


def move_aside(path: Path, suffix: str) -> list[Path]:
    """Rename the snapshot and the journal to `<name><suffix>` (kept for a post-mortem)."""
    moved = []
    for source in (path, journal_path(path)):
        target = source.with_name(source.name + suffix)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            continue
        moved.append(target)
    return moved


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
