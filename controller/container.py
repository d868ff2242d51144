"""Finding a container's init process through its runtime's CLI (Docker, Podman), and the
host and container pids of a process.

    info = inspect_container("86db10a1f96a", runtime="podman")   # ContainerInfo
    host_pid, container_pid = ns_pids(pid)

`runtime=None` tries podman, then docker. The CLI runs with a bounded timeout; its errors
become agentcg errors that say what to fix (no such container, exited, no CLI).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from agentcg.errors import AgentcgError, CgroupGone, HostUnsupported, InvalidInput

RUNTIMES = ("podman", "docker")
INSPECT_TIMEOUT_S = 15.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")   # an id, a prefix of one, or a name


@dataclass(frozen=True)
class ContainerInfo:
    runtime: str
    container_id: str        # the full id
    name: str
    pid: int                 # the init process's pid on the host
    running: bool


def validate_container_ref(ref: object) -> str:
    if not isinstance(ref, str) or not _ID_RE.match(ref):
        raise InvalidInput(f"container {ref!r}: give its id (or a unique prefix) or name, 1..128 characters of "
                           "A-Z a-z 0-9 _ . - (see `podman ps` / `docker ps`)")
    return ref


def inspect_container(ref: str, runtime: str | None = None, timeout_s: float = INSPECT_TIMEOUT_S) -> ContainerInfo:
    """The container's full id and init pid from `<runtime> inspect`; CgroupGone when it
    does not exist or is not running."""
    validate_container_ref(ref)
    if runtime is not None and runtime not in RUNTIMES:
        raise InvalidInput(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}; use --cgroup PATH "
                           "for other runtimes (Kubernetes pods, systemd units)")
    candidates = [runtime] if runtime else [r for r in RUNTIMES if shutil.which(r)]
    if not candidates:
        raise HostUnsupported("neither podman nor docker is installed here; use --cgroup PATH with the container's "
                              "cgroup (from /proc/<its pid>/cgroup)")
    errors = []
    for name in candidates:
        try:
            return _inspect(name, ref, timeout_s)
        except CgroupGone as exc:
            errors.append(str(exc))
    raise CgroupGone("; ".join(errors))


def _inspect(runtime: str, ref: str, timeout_s: float) -> ContainerInfo:
    if shutil.which(runtime) is None:
        raise HostUnsupported(f"{runtime} is not installed (or not on PATH)")
    try:
        done = subprocess.run([runtime, "inspect", "--type", "container", ref],
                              capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AgentcgError(f"`{runtime} inspect {ref}` did not answer within {timeout_s:g} s") from None
    if done.returncode != 0:
        raise CgroupGone(f"{runtime}: no container {ref!r} ({done.stderr.strip()[:200] or 'inspect failed'})")
    try:
        data = json.loads(done.stdout)   # both print a JSON array of one object
        data = data[0] if isinstance(data, list) else data
        state = data["State"]
        info = ContainerInfo(runtime=runtime, container_id=str(data["Id"]), name=str(data.get("Name", "")).lstrip("/"),
                             pid=int(state.get("Pid") or 0), running=bool(state.get("Running")))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise AgentcgError(f"`{runtime} inspect {ref}` printed something unexpected ({exc})") from None
    if not info.running or info.pid <= 0:
        raise CgroupGone(f"{runtime} container {ref!r} is not running (state {state.get('Status', '?')}); start it "
                         "first")
    return info


def ns_pids(pid: int, proc: str | os.PathLike = "/proc") -> tuple[int, int | None]:
    """(host pid, pid in the innermost PID namespace) from NSpid in /proc/<pid>/status;
    the second is None when the process is gone or the kernel has no NSpid (< 4.1)."""
    from agentcg.procfs import ProcFs

    try:
        text = ProcFs(proc).text(f"{int(pid)}/status")
    except AgentcgError:
        return pid, None
    for line in text.splitlines():
        if line.startswith("NSpid:"):
            try:
                values = [int(v) for v in line.split()[1:]]
            except ValueError:
                return pid, None
            return pid, values[-1] if values else None
    return pid, None
