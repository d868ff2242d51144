"""The exception tree of agentcg, raised once where the OS or the input fails.

    AgentcgError                  base; `exit_code` says what the CLI returns
     ├── InvalidInput             malformed sizes, durations, names, config (exit 2)
     ├── HostUnsupported          the host lacks a kernel feature agentcg needs
     │    ├── ControllerMissing   a cgroup controller is not available on this host
     │    └── DaemonUnavailable   the daemon's socket refuses connections, or a connection broke
     ├── CgroupError              a cgroup operation failed
     │    ├── CgroupGone          the cgroup vanished underneath us
     │    ├── CgroupExists        creating a cgroup that is already there
     │    ├── CgroupBusy          could not be emptied or removed in bounded retries
     │    └── AccessDenied        the kernel refused (EPERM/EACCES)
     ├── BpfError                 compiling, loading or attaching a BPF program failed
     ├── ProcessGone              a process is not there (exited, a zombie, or never was)
     ├── TraceError               a trace is unreadable, of an unknown version, or incomplete
     └── ProtocolError            a malformed or refused daemon/engine message

Every message says what went wrong and, where there is one, how to fix it.
"""
from __future__ import annotations


class AgentcgError(Exception):
    """Base of all agentcg errors."""

    exit_code = 1


class InvalidInput(AgentcgError, ValueError):
    """Input that cannot be used as given: a malformed size, name, option or file."""

    exit_code = 2


class HostUnsupported(AgentcgError):
    """The host lacks a feature; the message names it and the fix (see `agentcg doctor`)."""


class ControllerMissing(HostUnsupported):
    """A cgroup controller (memory, cpu, pids, freezer) is not available where needed."""


class DaemonUnavailable(HostUnsupported):
    """No daemon answers on the socket (not running, restarting), or the connection broke;
    `request_sent` says whether the request may have reached it."""

    def __init__(self, message: str, request_sent: bool = False) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class CgroupError(AgentcgError):
    """A cgroup operation failed."""


class CgroupGone(CgroupError):
    """The cgroup no longer exists (removed by someone else, or never created)."""


class CgroupExists(CgroupError):
    """The cgroup to create is already there."""


class CgroupBusy(CgroupError):
    """The cgroup still has processes or children after bounded retries."""


class AccessDenied(CgroupError, PermissionError):
    """The kernel refused the operation: not root, or a delegation boundary."""


class BpfError(AgentcgError):
    """A BPF program could not be compiled, loaded or attached."""


class ProcessGone(AgentcgError, ProcessLookupError):
    """The process does not exist: it exited (or is a zombie) or never was; `.pid` says which."""

    def __init__(self, message: str, pid: object = None) -> None:
        super().__init__(message)
        self.pid = pid


class TraceError(AgentcgError):
    """A trace could not be read or written: version, columns or layout are wrong."""


class ProtocolError(AgentcgError):
    """A daemon or engine protocol message was malformed, oversized or not allowed."""
