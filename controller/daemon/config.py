"""The daemon's configuration: TOML parsed into frozen dataclasses, validated before
anything runs. Every field has a default, so `agentcg daemon` works with no file.

    [daemon]    socket_path, socket_mode, socket_group, cgroup_root, state_dir,
                records_path, records_mode, oom_score_adj
    [limits]    max_sandboxes, max_running_calls, max_running_calls_per_sandbox,
                call_pids_max, grace_s
    [protocol]  line_timeout_s, idle_timeout_s, max_connections, max_connections_per_uid,
                root_connections
    [metrics]   address ("host:port", "" disables), max_tool_labels
    [ebpf]      mode ("auto" | "on" | "off"), concerns, program_stats
    [psi]       enabled, stall_s, window_s
    [policy]    name ("agentcg" (default), "static", "none"), tick_s, dry_run, host_budget (a size),
                the agentcg policy's fractions of a budget (throttle_at, freeze_at, kill_at,
                relax_below, admit_at), grace_s, step_s, lookahead_s, max_wait_s (admission),
                kernel_thresholds (arm eBPF/memcg thresholds at those fractions; default true)
    [engine]    kv_policy, uids, group, max_links, max_requests, host_reserve, kv_floor

An unknown section or key is an error (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import grp
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.controller.cgroup.base import validate_path
from agentcg.controller.daemon.engine_policy import check_policy_name
from agentcg.daemon_protocol import MAX_MESSAGE_BYTES  # noqa: F401  one request line, shared with clients
from agentcg.daemon_protocol import REQUEST_TIMEOUT_S
from agentcg.errors import HostUnsupported, InvalidInput
from agentcg.policies.sandbox import GraduatedConfig
from agentcg.units import parse_duration, parse_size

DEFAULT_SOCKET = "/run/agentcg/agentcg.sock"
DEFAULT_STATE_DIR = "/run/agentcg"          # shared with `agentcg run` (owner files, locks)
DEFAULT_RECORDS = "/var/lib/agentcg/toolcalls.jsonl"
BPF_CONCERNS = ("process", "memory", "sched", "block")
BPF_OPTIONAL_CONCERNS = ("faults", "switches", "exit_codes")   # opt-in: cost every page fault / switch / syscall


@dataclass(frozen=True)
class DaemonSection:
    socket_path: Path = Path(DEFAULT_SOCKET)
    socket_mode: int = 0o660
    socket_group: str | None = None       # group name or numeric gid; None keeps root's group
    cgroup_root: str = "agentcg"
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    records_path: Path = Path(DEFAULT_RECORDS)
    oom_score_adj: int = -1000            # the OOM killer never picks the daemon
    realtime_priority: int = 0            # 1..99: run as SCHED_FIFO at that priority (0: as is)
    records_mode: int = 0o600             # 0640 lets socket_group read the records (commands!)


@dataclass(frozen=True)
class LimitsSection:
    max_sandboxes: int = 256
    max_running_calls: int = 4096
    max_running_calls_per_sandbox: int = 1024   # one sandbox cannot take every call slot
    call_pids_max: int = 4096            # pids.max of each tool call: a fork bomb stops here
    grace_s: float = 5.0                 # how long toolcall.end waits for leftovers before killing


@dataclass(frozen=True)
class ProtocolSection:
    line_timeout_s: float = 10.0         # a started line must complete within this
    idle_timeout_s: float = 300.0        # a connection with nothing pending is closed after this
    max_connections: int = 256
    max_connections_per_uid: int = 64    # one non-root uid cannot hold every slot
    root_connections: int = 16           # of max_connections, only root may use these


@dataclass(frozen=True)
class MetricsSection:
    address: str = "127.0.0.1:9464"      # "" disables /metrics; port 0 picks a free port
    max_tool_labels: int = 64            # more distinct tool names are counted as "other"


@dataclass(frozen=True)
class EbpfSection:
    mode: str = "auto"                   # auto: load if possible, run without eBPF otherwise
    concerns: tuple[str, ...] = BPF_CONCERNS
    program_stats: bool = False          # BPF_ENABLE_STATS while the daemon runs: +40-55 ns every BPF run on the host


@dataclass(frozen=True)
class PsiSection:
    enabled: bool = True
    stall_s: float = 0.2
    window_s: float = 2.0                # multiples of 2 s work without CAP_SYS_RESOURCE (6.5+)


@dataclass(frozen=True)
class PolicySection:
    name: str = "agentcg"                # none | static | agentcg (agentcg.policies.sandbox);
                                         # agentcg acts only on sandboxes with a budget
    tick_s: float = 0.5
    dry_run: bool = False                # decide and count, write nothing
    host_budget_bytes: int | None = None  # the budget all sandboxes share (None: only their own)
    graduated: GraduatedConfig = field(default_factory=GraduatedConfig)   # the agentcg policy's settings
    kernel_thresholds: bool = True        # arm eBPF RSS and memcg usage thresholds (False: PSI and tick only)


@dataclass(frozen=True)
class EngineSection:
    kv_policy: str = "agentcg"           # agentcg.policies.kv name, or "package.module:factory"
    uids: tuple[int, ...] = ()           # besides root, these uids may attach an engine
    group: str | None = None             # ... and members of this group (name or gid)
    max_links: int = 8
    max_requests: int = 4096             # live requests per engine link
    host_reserve_bytes: int = 0          # of [policy] host_budget, never for sandboxes or KV
    kv_floor_bytes: int = 0              # the host KV pool never shrinks below this


@dataclass(frozen=True)
class DaemonConfig:
    daemon: DaemonSection = field(default_factory=DaemonSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    protocol: ProtocolSection = field(default_factory=ProtocolSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    ebpf: EbpfSection = field(default_factory=EbpfSection)
    psi: PsiSection = field(default_factory=PsiSection)
    policy: PolicySection = field(default_factory=PolicySection)
    engine: EngineSection = field(default_factory=EngineSection)

    @property
    def records_path(self) -> Path:
        return self.daemon.records_path

    @property
    def state_path(self) -> Path:
        return self.daemon.state_dir / "state.json"

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return list(value)
            if isinstance(value, GraduatedConfig):
                return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
            return value
        data = {s.name: {f.name: plain(getattr(getattr(self, s.name), f.name))
                         for f in dataclasses.fields(getattr(self, s.name))}
                for s in dataclasses.fields(self)}
        data["daemon"]["socket_mode"] = f"0{self.daemon.socket_mode:o}"
        data["daemon"]["records_mode"] = f"0{self.daemon.records_mode:o}"
        return data


def load_config(path: str | os.PathLike | None = None) -> DaemonConfig:
    """The configuration in `path` (TOML), or the defaults when `path` is None."""
    if path is None:
        return parse_config({})
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise HostUnsupported("reading a TOML config needs Python 3.11+ (tomllib); "
                              "run without --config, or upgrade Python") from None
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise InvalidInput(f"config {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"config {path}: not a TOML text file (byte {exc.start} is not UTF-8); "
                           "give the daemon's agentcg.toml") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"config {path}: not valid TOML ({exc})") from None
    return parse_config(data, source=str(path))


def parse_config(data: dict[str, Any], source: str = "config") -> DaemonConfig:
    sections = {f.name: f.type for f in dataclasses.fields(DaemonConfig)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise InvalidInput(f"{source}: unknown section(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sections)}")
    built: dict[str, Any] = {}
    for name in sections:
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise InvalidInput(f"{source}: [{name}] must be a table")
        fields = _Fields(raw, f"{source} [{name}]")
        built[name] = _SECTION_PARSERS[name](fields)
        fields.done()
    return DaemonConfig(**built)


class _Fields:
    """Typed reads of one TOML table; complains about keys nobody read."""

    def __init__(self, raw: dict[str, Any], where: str) -> None:
        self.raw, self.where, self.read = raw, where, set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.read.add(key)
        if key not in self.raw:
            return default
        value = self.raw[key]
        if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise InvalidInput(f"{self.where}: {key} must be {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise InvalidInput(f"{self.where}: {key} must be {_kind_name(kind)}, got {value!r}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.get(key, (int, float, str), default)
        seconds = parse_duration(value, what=f"{self.where}: {key}") if key.endswith("_s") else float(value)
        if not low <= seconds <= high:
            raise InvalidInput(f"{self.where}: {key} must be in {low}..{high}, got {value!r}")
        return seconds

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.get(key, int, default)
        if not low <= value <= high:
            raise InvalidInput(f"{self.where}: {key} must be an integer in {low}..{high}, got {value!r}")
        return value

    def numbers(self, section: type, ranges: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """The numeric keys named in `ranges` ({key: (low, high)}), each defaulting to the
        section dataclass's own default (the one place defaults are written): an int
        default reads an integer, a float one a number (a duration for keys ending in _s)."""
        defaults = {x.name: x.default for x in dataclasses.fields(section)}
        out: dict[str, Any] = {}
        for key, (low, high) in ranges.items():
            default = defaults[key]
            if isinstance(default, int) and not isinstance(default, bool):
                out[key] = self.integer(key, default, int(low), int(high))
            else:
                out[key] = self.number(key, default, low, high)
        return out

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.read)
        if unknown:
            raise InvalidInput(f"{self.where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(self.read))}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false",
                        "list": "a list"}.get(k.__name__, k.__name__) for k in kinds)


def _daemon(f: _Fields) -> DaemonSection:
    mode_text = f.get("socket_mode", (str, int), f"0{DaemonSection.socket_mode:o}")
    try:
        mode = int(mode_text, 8) if isinstance(mode_text, str) else int(mode_text)
    except ValueError:
        raise InvalidInput(f"{f.where}: socket_mode must be octal such as \"0660\", got {mode_text!r}") from None
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        raise InvalidInput(f"{f.where}: socket_mode must be 0600..0777 with owner read/write, got {mode_text!r}")
    group = f.get("socket_group", (str, int), None)
    if group is not None:
        resolve_group(group, f.where)
    root = f.get("cgroup_root", str, DaemonSection.cgroup_root)
    try:
        validate_path(root, allow_root=False)
    except InvalidInput as exc:
        raise InvalidInput(f"{f.where}: cgroup_root: {exc}") from None
    socket_path = Path(f.get("socket_path", str, DEFAULT_SOCKET))
    if len(os.fsencode(socket_path)) > 107:
        raise InvalidInput(f"{f.where}: socket_path {socket_path} is longer than 107 bytes (the sun_path limit)")
    records = f.get("records_path", str, DEFAULT_RECORDS)
    return DaemonSection(
        socket_path=socket_path, socket_mode=mode, socket_group=None if group is None else str(group),
        cgroup_root=root, state_dir=Path(f.get("state_dir", str, DEFAULT_STATE_DIR)),
        records_path=Path(records), records_mode=_records_mode(f),
        **f.numbers(DaemonSection, {"oom_score_adj": (-1000, 1000), "realtime_priority": (0, 99)}))


def _records_mode(f: _Fields) -> int:
    text = f.get("records_mode", str, f"0{DaemonSection.records_mode:o}")
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if mode not in (0o600, 0o640, 0o644):
        raise InvalidInput(f"{f.where}: records_mode must be \"0600\", \"0640\" (socket_group reads) or "
                           f"\"0644\", got {text!r}")
    return mode


def _limits(f: _Fields) -> LimitsSection:
    return LimitsSection(**f.numbers(LimitsSection, {
        "max_sandboxes": (1, 4096), "max_running_calls": (1, 65536), "max_running_calls_per_sandbox": (1, 65536),
        "call_pids_max": (1, 4_194_304), "grace_s": (0.0, 3600.0)}))


def _protocol(f: _Fields) -> ProtocolSection:
    return ProtocolSection(**f.numbers(ProtocolSection, {
        "line_timeout_s": (0.1, 3600.0), "idle_timeout_s": (0.1, 86400.0), "max_connections": (1, 4096),
        "max_connections_per_uid": (1, 4096), "root_connections": (0, 4096)}))


def _metrics(f: _Fields) -> MetricsSection:
    address = f.get("address", str, MetricsSection.address)
    if address:
        parse_address(address, f.where)
    return MetricsSection(address=address, **f.numbers(MetricsSection, {"max_tool_labels": (1, 1024)}))


def _ebpf(f: _Fields) -> EbpfSection:
    mode = f.get("mode", str, EbpfSection.mode)
    if mode not in ("auto", "on", "off"):
        raise InvalidInput(f"{f.where}: mode must be \"auto\", \"on\" or \"off\", got {mode!r}")
    concerns = f.get("concerns", list, list(BPF_CONCERNS))
    known = BPF_CONCERNS + BPF_OPTIONAL_CONCERNS
    bad = [c for c in concerns if c not in known]
    if bad or not concerns:
        raise InvalidInput(f"{f.where}: concerns {bad or '(empty)'} unknown; choose from {', '.join(known)}")
    return EbpfSection(mode=mode, concerns=tuple(concerns),
                       program_stats=f.get("program_stats", bool, EbpfSection.program_stats))


def _psi(f: _Fields) -> PsiSection:
    from agentcg.controller.psi import validate_trigger

    section = PsiSection(enabled=f.get("enabled", bool, PsiSection.enabled),
                         **f.numbers(PsiSection, {"stall_s": (0.001, 10.0), "window_s": (0.5, 10.0)}))
    validate_trigger("some", section.stall_s, section.window_s)
    return section


def _policy(f: _Fields) -> PolicySection:
    from agentcg.policies.sandbox import POLICY_NAMES

    name = f.get("name", str, PolicySection.name)
    if name not in POLICY_NAMES:
        raise InvalidInput(f"{f.where}: name must be one of {', '.join(POLICY_NAMES)}, got {name!r}")
    budget = f.get("host_budget", (str, int), None)
    d = GraduatedConfig()
    fractions = {key: f.number(key, getattr(d, key), 0.0, 1.0)
                 for key in ("throttle_at", "freeze_at", "kill_at", "relax_below", "admit_at")}
    seconds = {key: f.number(key, getattr(d, key), 0.0, 3600.0) for key in ("grace_s", "step_s", "lookahead_s")}
    # a waiting toolcall.begin is answered before a client's request timeout (60 s) runs out
    seconds["max_wait_s"] = f.number("max_wait_s", d.max_wait_s, 0.0, REQUEST_TIMEOUT_S - 10)
    try:
        graduated = GraduatedConfig(**fractions, **seconds)
    except InvalidInput as exc:
        raise InvalidInput(f"{f.where}: {exc}") from None
    return PolicySection(name=name, dry_run=f.get("dry_run", bool, PolicySection.dry_run),
                         host_budget_bytes=None if budget is None else parse_size(budget, what=f"{f.where}: host_budget"),
                         graduated=graduated,
                         kernel_thresholds=f.get("kernel_thresholds", bool, PolicySection.kernel_thresholds),
                         **f.numbers(PolicySection, {"tick_s": (0.01, 60.0)}))


def _engine(f: _Fields) -> EngineSection:
    uids = f.get("uids", list, [])
    if not all(isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 2**32 for u in uids) or len(uids) > 64:
        raise InvalidInput(f"{f.where}: uids must be a list of at most 64 user ids (integers), got {uids!r}")
    group = f.get("group", (str, int), None)
    if group is not None:
        try:
            resolve_group(group, f.where)
        except InvalidInput:
            raise InvalidInput(f"{f.where}: group {group!r} does not exist; create it or give a numeric gid") from None
    reserve, floor = f.get("host_reserve", (str, int), 0), f.get("kv_floor", (str, int), 0)
    return EngineSection(
        kv_policy=check_policy_name(f.get("kv_policy", str, EngineSection.kv_policy), f"{f.where}: kv_policy"),
        uids=tuple(uids), group=None if group is None else str(group),
        host_reserve_bytes=parse_size(reserve, what=f"{f.where}: host_reserve") if reserve else 0,
        kv_floor_bytes=parse_size(floor, what=f"{f.where}: kv_floor") if floor else 0,
        **f.numbers(EngineSection, {"max_links": (1, 64), "max_requests": (1, 65536)}))


_SECTION_PARSERS = {"daemon": _daemon, "limits": _limits, "protocol": _protocol, "metrics": _metrics,
                    "ebpf": _ebpf, "psi": _psi, "policy": _policy, "engine": _engine}


def parse_address(text: str, where: str = "metrics") -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidInput(f"{where}: address must be host:port such as 127.0.0.1:9464, got {text!r}")
    return host.strip("[]"), int(port_text)


def resolve_group(group: str | int, where: str = "config") -> int:
    if isinstance(group, int) or (isinstance(group, str) and group.isdigit()):
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidInput(f"{where}: socket_group {group!r} does not exist; create it (groupadd {group}) "
                           "or give a numeric gid") from None
