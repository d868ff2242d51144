"""What this host can do: one probe per kernel feature, each with a status and the fix.

Call `probe_host()` once and pass the `HostReport` along; nothing else in agentcg
should probe the kernel with scattered try/except. File probes read below a
`HostRoots` (so tests point them at fixture trees); a few probes are live and always
touch the real kernel: `bpf_syscall` (a two-instruction program through bpf(2)),
`bcc`/`bcc_load` (compile, load and attach a tracepoint program, see `doctor_bpf`) and
`nvml`. `cgroup_v2_freeze_kill` may create and remove one empty cgroup
`agentcg-doctor-<pid>` in the v2 tree when the tree has no other cgroup to look at.

Statuses:
    ok           works
    warning      works, with a caveat the detail names (headers of another version)
    missing      the kernel could do it; something is not installed, mounted or enabled
    unsupported  this kernel cannot do it (not built in, too old); the fix is another kernel
"""
from __future__ import annotations

import gzip
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agentcg.controller.cgroup.layout import CgroupLayout, detect_layout
from agentcg.controller.doctor_btf import btf_has_struct, read_btf
from agentcg.controller.doctor_check import (  # noqa: F401  re-exported: the doctor's public names
    CHECK_NAMES, CORE_CHECKS, MIN_KERNEL, MISSING, OK, SETUP_FIX, STATUSES, UNSUPPORTED, WARNING, Check, HostReport,
)
from agentcg.errors import AgentcgError, HostUnsupported, InvalidInput
from agentcg.procfs import ProcFs


@dataclass(frozen=True)
class HostRoots:
    """Where the probes look; `HostRoots.under(dir)` for a fixture tree."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    modules: Path = Path("/lib/modules")
    boot: Path = Path("/boot")

    @classmethod
    def under(cls, root: str | os.PathLike) -> "HostRoots":
        root = Path(root)
        return cls(proc=root / "proc", sys=root / "sys", modules=root / "lib/modules", boot=root / "boot")

    @property
    def tracing(self) -> Path:
        return self.sys / "kernel/tracing"


@dataclass(frozen=True)
class _Host:
    """What several probes share, read once."""

    roots: HostRoots
    release: str
    config: Mapping[str, str] | None     # CONFIG_X -> "y"/"m"/value; None when unreadable
    config_source: str
    layout: CgroupLayout | None
    layout_error: str

    def config_says(self, option: str) -> str:
        """'y', 'm', 'n' (not set) or '?' (config unreadable)."""
        if self.config is None:
            return "?"
        return self.config.get(option, "n")


def probe_host(roots: HostRoots | None = None, *, only: Iterable[str] | None = None) -> HostReport:
    """Run the probes (all of them, or the names in `only`) and return the report."""
    roots = roots or HostRoots()
    names = tuple(CHECK_NAMES) if only is None else tuple(only)
    unknown = [n for n in names if n not in CHECK_NAMES]
    if unknown:
        raise InvalidInput(f"unknown doctor check {', '.join(unknown)}; known: {', '.join(CHECK_NAMES)}")
    start = time.monotonic()
    host = _read_host(roots)
    checks: list[Check] = []
    for name in CHECK_NAMES:
        if name in names:
            try:
                checks.append(_PROBES[name](host))
            except OSError as exc:  # a file the probe expected to read refused it
                checks.append(Check(name, MISSING, f"probe failed: {exc}", "run as root"))
    return HostReport(checks=tuple(checks), elapsed_s=time.monotonic() - start)


def _read_host(roots: HostRoots) -> _Host:
    release = _read_text(roots.proc / "sys/kernel/osrelease") or os.uname().release
    config, source = _read_kernel_config(roots, release)
    try:
        layout, layout_error = detect_layout(roots.proc / "mounts"), ""
    except HostUnsupported as exc:
        layout, layout_error = None, str(exc)
    return _Host(roots=roots, release=release, config=config, config_source=source,
                 layout=layout, layout_error=layout_error)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_kernel_config(roots: HostRoots, release: str) -> tuple[dict[str, str] | None, str]:
    candidates = ((roots.proc / "config.gz", True), (roots.boot / f"config-{release}", False))
    for path, compressed in candidates:
        try:
            raw = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        config: dict[str, str] = {}
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                key, _, value = line.partition("=")
                config[key] = value.strip('"')
        return config, str(path)
    return None, ""


def kernel_version(release: str) -> tuple[int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else None


# --- the probes, one per check ------------------------------------------------------

def probe_kernel(host: _Host) -> Check:
    version = kernel_version(host.release)
    data = {"release": host.release, "config": host.config_source or None}
    if version is None:
        return Check("kernel", WARNING, f"cannot parse kernel release {host.release!r}", "", data)
    text = f"Linux {host.release}"
    if version < MIN_KERNEL:
        return Check("kernel", WARNING, f"{text}: older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]} "
                     "(no cgroup.kill; some probes may fail)", "use Linux 5.14 or newer", data)
    return Check("kernel", OK, text, "", data)


def probe_bpf_jit(host: _Host) -> Check:
    path = host.roots.proc / "sys/net/core/bpf_jit_enable"
    value = _read_text(path)
    if value is None:
        return Check("bpf_jit", UNSUPPORTED, f"{path} is absent: no BPF JIT (interpreter only)",
                     "use a kernel built with CONFIG_BPF_JIT=y")
    always_on = host.config_says("CONFIG_BPF_JIT_ALWAYS_ON") == "y"
    data = {"bpf_jit_enable": value, "always_on": always_on}
    if value in ("1", "2"):
        return Check("bpf_jit", OK, f"JIT enabled (bpf_jit_enable={value}"
                     f"{', always on' if always_on else ''})", "", data)
    return Check("bpf_jit", MISSING, f"JIT disabled (bpf_jit_enable={value}): programs run interpreted",
                 "sysctl -w net.core.bpf_jit_enable=1", data)


def probe_btf(host: _Host) -> Check:
    path = host.roots.sys / "kernel/btf/vmlinux"
    if not path.exists():
        return Check("btf", UNSUPPORTED, f"{path} is absent: the kernel has no BTF",
                     "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    try:
        btf = read_btf(path)
    except HostUnsupported as exc:
        return Check("btf", UNSUPPORTED, str(exc), "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    return Check("btf", OK, f"{path} ({len(btf.blob) / 2**20:.1f} MiB)", "",
                 {"path": str(path), "size_bytes": len(btf.blob)})


def probe_tracefs(host: _Host) -> Check:
    for tracing in (host.roots.tracing, host.roots.sys / "kernel/debug/tracing"):
        if (tracing / "events").is_dir():
            return Check("tracefs", OK, f"{tracing}/events", "", {"path": str(tracing)})
    if host.roots.tracing.is_dir():
        return Check("tracefs", MISSING, f"tracefs is not mounted at {host.roots.tracing}",
                     "mount -t tracefs tracefs /sys/kernel/tracing")
    return Check("tracefs", UNSUPPORTED, f"{host.roots.tracing} does not exist (no CONFIG_TRACING?)",
                 "use a kernel built with CONFIG_FTRACE and CONFIG_TRACING")


def probe_kernel_headers(host: _Host) -> Check:
    build = host.roots.modules / host.release / "build"
    if not (build / "include").is_dir():
        return Check("kernel_headers", MISSING, f"no kernel headers at {build}",
                     f"{SETUP_FIX} (installs linux-headers for this or the nearest kernel)")
    version = None
    uts = _read_text(build / "include/generated/utsrelease.h")
    if uts:
        match = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts)
        version = match.group(1) if match else None
    if version is None:
        match = re.search(r"linux-headers-(.+)$", os.path.realpath(build))
        version = match.group(1) if match else "unknown"
    data = {"build": os.path.realpath(build), "headers_release": version, "running_release": host.release}
    source = host.roots.modules / host.release / "source"
    if not (source / "include/linux/kconfig.h").exists() and not (build / "include/linux/kconfig.h").exists():
        return Check("kernel_headers", MISSING, f"headers {version} lack include/linux/kconfig.h "
                     f"(the -common half is not linked at {source})", SETUP_FIX, data)
    if version == host.release:
        return Check("kernel_headers", OK, f"headers {version} match the running kernel", "", data)
    return Check("kernel_headers", WARNING,
                 f"nearest {version}, running {host.release}: fine for tracepoint programs "
                 "(no kernel struct reads)",
                 f"apt-get install linux-headers-{host.release} if your distribution has it", data)


def _probe_dynamic_events(host: _Host, kind: str, config_option: str) -> Check:
    events = host.roots.tracing / f"{kind}_events"
    pmu = host.roots.sys / f"bus/event_source/devices/{kind}"
    name = f"{kind}s"
    if events.exists() or pmu.is_dir():
        found = [str(p) for p in (events, pmu) if p.exists()]
        return Check(name, OK, " and ".join(found), "", {"paths": found})
    configured = host.config_says(config_option)
    if configured == "n":
        return Check(name, UNSUPPORTED, f"kernel built without {config_option} ({events.name} and the "
                     f"{kind} PMU are absent)", f"use a kernel built with {config_option}=y")
    return Check(name, MISSING, f"neither {events} nor {pmu} exists",
                 "mount -t tracefs tracefs /sys/kernel/tracing")


def probe_kprobes(host: _Host) -> Check:
    return _probe_dynamic_events(host, "kprobe", "CONFIG_KPROBES")


def probe_uprobes(host: _Host) -> Check:
    return _probe_dynamic_events(host, "uprobe", "CONFIG_UPROBES")


def probe_sched_ext(host: _Host) -> Check:
    path = host.roots.sys / "kernel/sched_ext"
    configured = host.config_says("CONFIG_SCHED_CLASS_EXT")
    if path.is_dir():
        state = _read_text(path / "state") or "unknown"
        return Check("sched_ext", OK, f"{path} (state: {state})", "", {"state": state})
    where = f" ({host.config_source})" if host.config_source else ""
    said = {"n": "CONFIG_SCHED_CLASS_EXT is not set", "?": "kernel config unreadable"}.get(
        configured, f"CONFIG_SCHED_CLASS_EXT={configured}")
    return Check("sched_ext", UNSUPPORTED, f"{path} is absent; {said}{where}",
                 "use Linux 6.12+ built with CONFIG_SCHED_CLASS_EXT=y")


def probe_memcg_bpf_struct_ops(host: _Host) -> Check:
    path = host.roots.sys / "kernel/btf/vmlinux"
    fix = "use a kernel with the memcg BPF struct_ops patches (struct memcg_bpf_ops in its BTF)"
    try:
        btf = read_btf(path)
    except HostUnsupported as exc:
        return Check("memcg_bpf_struct_ops", UNSUPPORTED, f"cannot tell without BTF: {exc}", fix)
    if btf_has_struct(btf, "memcg_bpf_ops"):
        return Check("memcg_bpf_struct_ops", OK, "struct memcg_bpf_ops is in the kernel's BTF", "")
    return Check("memcg_bpf_struct_ops", UNSUPPORTED,
                 "no struct memcg_bpf_ops in the kernel's BTF (string section searched)", fix)


def probe_cgroup_layout(host: _Host) -> Check:
    layout = host.layout
    if layout is None:
        return Check("cgroup_layout", MISSING, host.layout_error, "mount -t proc proc /proc")
    where = {c: layout.hierarchy_of(c) for c in ("memory", "cpu", "pids", "freezer", "io", "blkio", "cpuset")}
    data = {"kind": layout.kind, "v2_mount": str(layout.v2_mount) if layout.v2_mount else None,
            "v2_controllers": sorted(layout.v2_controllers), "nsdelegate": layout.nsdelegate,
            "v1_mounts": {c: str(p) for c, p in sorted(layout.v1_mounts.items())},
            "controllers": {c: h for c, h in where.items() if h}}
    placed = ", ".join(f"{c}:{h}" for c, h in where.items() if h) or "no controllers"
    if layout.kind in ("v2", "hybrid"):
        return Check("cgroup_layout", OK, f"{layout.kind}: v2 at {layout.v2_mount}, {placed}; "
                     f"nsdelegate {'on' if layout.nsdelegate else 'off'}", "", data)
    if layout.kind == "v1":
        return Check("cgroup_layout", UNSUPPORTED, f"cgroup v1 only ({placed}); agentcg needs a v2 tree",
                     "mount -t cgroup2 none /sys/fs/cgroup/unified, or boot with "
                     "systemd.unified_cgroup_hierarchy=1", data)
    return Check("cgroup_layout", MISSING, "no cgroup hierarchy is mounted",
                 "mount -t cgroup2 none /sys/fs/cgroup", data)


@contextmanager
def _v2_sample_cgroup(host: _Host) -> Iterator[tuple[Path | None, str]]:
    """A non-root v2 cgroup to look at, one that will not vanish while we read it: this
    process's own, else a child of the v2 root that agentcg did not make (agentcg's come
    and go), else one made for the probe and removed. Yields (path or None, how found)."""
    root = host.layout.v2_mount if host.layout else None
    assert root is not None
    own = _own_v2_cgroup(ProcFs(host.roots.proc))
    if own and (root / own / "cgroup.procs").exists():
        yield root / own, f"in this process's cgroup {root / own}"
        return
    try:
        children = sorted(p for p in root.iterdir()
                          if not p.name.startswith("agentcg") and (p / "cgroup.procs").exists())
    except OSError:
        children = []
    if children:
        yield children[0], f"in existing cgroup {children[0]}"
        return
    probe = root / f"agentcg-doctor-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as exc:
        yield None, f"cannot create {probe}: {exc.strerror}"
        return
    try:
        yield probe, f"in a probe cgroup made (and removed) below {root}"
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass  # a fixture tree's plain directory holds files; the kernel's never refuses an empty cgroup


def _own_v2_cgroup(procfs: ProcFs) -> str:
    """This process's v2 cgroup relative to the v2 mount ("" for the root or unknown)."""
    try:
        return (procfs.v2_cgroup("self") or "").strip("/")
    except AgentcgError:
        return ""


def probe_cgroup_v2_freeze_kill(host: _Host) -> Check:
    layout = host.layout
    if layout is None or layout.v2_mount is None:
        return Check("cgroup_v2_freeze_kill", UNSUPPORTED, "no cgroup v2 tree",
                     "mount -t cgroup2 none /sys/fs/cgroup/unified")
    with _v2_sample_cgroup(host) as (cgroup, how):
        if cgroup is None:
            return Check("cgroup_v2_freeze_kill", MISSING, how, "run as root")
        files = {f: (cgroup / f).exists() for f in ("cgroup.freeze", "cgroup.kill")}
    if all(files.values()):
        return Check("cgroup_v2_freeze_kill", OK, f"cgroup.freeze and cgroup.kill {how}", "")
    absent = " and ".join(f for f, there in files.items() if not there)
    return Check("cgroup_v2_freeze_kill", UNSUPPORTED, f"{absent} absent {how}",
                 "use Linux 5.14 or newer (cgroup.freeze: 5.2, cgroup.kill: 5.14)")


_PRESSURE = ("cpu", "memory", "io")


def probe_psi(host: _Host) -> Check:
    directory = host.roots.proc / "pressure"
    if not directory.is_dir():
        return Check("psi", UNSUPPORTED, f"{directory} is absent (CONFIG_PSI not set)",
                     "use a kernel built with CONFIG_PSI=y")
    read, failed, memory = [], "", ""
    for resource in _PRESSURE:
        try:
            text = (directory / resource).read_text()
        except OSError as exc:
            failed = f"{directory / resource}: {exc.strerror}"
            break
        read.append(resource)
        if resource == "memory" and text:
            memory = text.splitlines()[0]
    if failed:
        return Check("psi", MISSING, f"PSI is built in but disabled ({failed})", "boot with psi=1")
    return Check("psi", OK, f"{directory}/{{cpu,memory,io}}; memory {memory}", "", {"resources": read})


def probe_psi_cgroup(host: _Host) -> Check:
    layout = host.layout
    if layout is None or layout.v2_mount is None:
        return Check("psi_cgroup", UNSUPPORTED, "no cgroup v2 tree (per-cgroup PSI lives there)",
                     "mount -t cgroup2 none /sys/fs/cgroup/unified")
    with _v2_sample_cgroup(host) as (cgroup, how):
        if cgroup is None:
            return Check("psi_cgroup", MISSING, how, "run as root")
        readable, failed = [], ""
        for resource in _PRESSURE:
            try:
                (cgroup / f"{resource}.pressure").read_text()
                readable.append(resource)
            except OSError as exc:
                failed = failed or f"{cgroup / f'{resource}.pressure'}: {exc.strerror}"
    if "memory" in readable:
        return Check("psi_cgroup", OK, f"{', '.join(r + '.pressure' for r in readable)} {how}", "", {"resources": readable})
    return Check("psi_cgroup", MISSING, f"per-cgroup PSI unreadable ({failed})",
                 "boot with psi=1 and make sure cgroup.pressure is 1")


def probe_swap(host: _Host) -> Check:
    path = host.roots.proc / "swaps"
    text = _read_text(path)
    if text is None:
        return Check("swap", UNSUPPORTED, f"{path} is absent (CONFIG_SWAP not set)",
                     "use a kernel built with CONFIG_SWAP=y")
    devices = [line.split() for line in text.splitlines()[1:] if line.strip()]
    total_bytes = sum(int(d[2]) * 1024 for d in devices if len(d) >= 3 and d[2].isdigit())
    data = {"devices": [d[0] for d in devices], "total_bytes": total_bytes}
    if not devices:
        return Check("swap", MISSING, "no swap device: reclaim under a memory limit can only drop page cache",
                     "fallocate -l 4G /swapfile && chmod 600 /swapfile && mkswap /swapfile && swapon /swapfile",
                     data)
    return Check("swap", OK, f"{len(devices)} device(s), {total_bytes / 2**30:.1f} GiB", "", data)


def probe_zswap(host: _Host) -> Check:
    params = host.roots.sys / "module/zswap/parameters"
    enabled = _read_text(params / "enabled")
    if enabled is None:
        return Check("zswap", UNSUPPORTED, f"{params} is absent (CONFIG_ZSWAP not set)",
                     "use a kernel built with CONFIG_ZSWAP=y")
    compressor = _read_text(params / "compressor") or "unknown"
    data = {"enabled": enabled == "Y", "compressor": compressor}
    if enabled == "Y":
        return Check("zswap", OK, f"enabled, compressor {compressor}", "", data)
    return Check("zswap", MISSING, "built in but disabled",
                 "echo Y > /sys/module/zswap/parameters/enabled (zswap caches swap: enable swap too)", data)


def _probe_bpf_syscall(host: _Host) -> Check:
    from agentcg.controller.doctor_bpf import probe_bpf_syscall
    return probe_bpf_syscall()


def _probe_bcc(host: _Host) -> Check:
    from agentcg.controller.doctor_bpf import probe_bcc
    return probe_bcc()


def _probe_bcc_load(host: _Host) -> Check:
    from agentcg.controller.doctor_bpf import probe_bcc_load
    return probe_bcc_load()


def probe_nvml(nvml: Any = None) -> Check:
    """GPUs through NVML. `nvml` replaces the pynvml module (tests; this host has no GPU)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return Check("nvml", MISSING, "pynvml is not importable", "pip install nvidia-ml-py")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        reason = str(exc)
        if "Not Found" in reason or "Library" in reason:
            reason = "no NVIDIA driver (libnvidia-ml.so.1 not found)"
        return Check("nvml", MISSING, reason, "no GPU is fine; for GPUs install the NVIDIA driver")
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        count = nvml.nvmlDeviceGetCount()
        names = [_text(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
    except nvml.NVMLError as exc:
        return Check("nvml", MISSING, f"NVML initialised but failed: {exc}", "check nvidia-smi")
    finally:
        nvml.nvmlShutdown()
    data = {"driver": driver, "count": count, "names": names}
    if count == 0:
        return Check("nvml", MISSING, f"driver {driver} loaded but no GPUs", "check nvidia-smi", data)
    return Check("nvml", OK, f"{count} GPU(s): {', '.join(names)}; driver {driver}", "", data)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


_PROBES: dict[str, Callable[[_Host], Check]] = {
    "kernel": probe_kernel, "bpf_syscall": _probe_bpf_syscall, "bpf_jit": probe_bpf_jit,
    "btf": probe_btf, "tracefs": probe_tracefs, "bcc": _probe_bcc, "bcc_load": _probe_bcc_load,
    "kernel_headers": probe_kernel_headers, "kprobes": probe_kprobes, "uprobes": probe_uprobes,
    "sched_ext": probe_sched_ext, "memcg_bpf_struct_ops": probe_memcg_bpf_struct_ops,
    "cgroup_layout": probe_cgroup_layout, "cgroup_v2_freeze_kill": probe_cgroup_v2_freeze_kill,
    "psi": probe_psi, "psi_cgroup": probe_psi_cgroup, "swap": probe_swap, "zswap": probe_zswap,
    "nvml": lambda host: probe_nvml(),
}
