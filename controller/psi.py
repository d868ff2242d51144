"""Pressure stall information (PSI): parse `<resource>.pressure` files, arm triggers.

Format (Documentation/accounting/psi.rst, kernel 4.20+; per cgroup on the v2 tree):

    some avg10=0.12 avg60=0.05 avg300=0.01 total=123456
    full avg10=0.00 avg60=0.00 avg300=0.00 total=0

avg* are percentages of wall time, `total` is cumulative stall time in MICROseconds;
both become floats here (percent, seconds). `cpu.pressure` has a `full` line only since
5.13 (it is all zeros at the system level); a missing line reads as zeros.

A trigger is armed by writing "some 150000 1000000" (stall threshold and window in us)
to the pressure file opened O_RDWR|O_NONBLOCK; the kernel then raises POLLPRI on that fd
at most once per window while the threshold is exceeded. The window must be 0.5..10 s
(kernel 5.2+; unprivileged users need multiples of 2 s since 6.5). The trigger lives as
long as the fd stays open. The fd gets POLLERR if the cgroup is removed.
"""
from __future__ import annotations

import errno
import os
import select
from pathlib import Path
from typing import NamedTuple

from agentcg.errors import AccessDenied, AgentcgError, CgroupError, CgroupGone, HostUnsupported, InvalidInput
from agentcg.procfs import PROC, ProcFs

RESOURCES = ("memory", "cpu", "io", "irq")
KINDS = ("some", "full")
WINDOW_MIN_S = 0.5
WINDOW_MAX_S = 10.0
UNPRIVILEGED_WINDOW_US = 2_000_000
_CAP_SYS_RESOURCE = 24


class PressureLine(NamedTuple):
    avg10: float   # percent of the last 10 s spent stalled
    avg60: float
    avg300: float
    total_s: float  # cumulative stall time, seconds


class Pressure(NamedTuple):
    some: PressureLine  # at least one task stalled
    full: PressureLine  # all non-idle tasks stalled at once


_ZERO = PressureLine(0.0, 0.0, 0.0, 0.0)


def parse_pressure(text: str, *, source: str = "pressure file") -> Pressure:
    lines: dict[str, PressureLine] = {}
    for raw in text.splitlines():
        parts = raw.split()
        if not parts:
            continue
        kind = parts[0]
        if kind not in KINDS:
            raise InvalidInput(f"{source}: unexpected line {raw!r}; expected 'some ...' or 'full ...'")
        try:
            values = dict(part.split("=", 1) for part in parts[1:])
            lines[kind] = PressureLine(
                avg10=float(values["avg10"]), avg60=float(values["avg60"]),
                avg300=float(values["avg300"]), total_s=int(values["total"]) / 1e6,
            )
        except (KeyError, ValueError) as exc:
            raise InvalidInput(f"{source}: malformed line {raw!r} ({exc})") from None
    if "some" not in lines:
        raise InvalidInput(f"{source}: no 'some' line in {text!r}")
    return Pressure(some=lines["some"], full=lines.get("full", _ZERO))


def read_pressure(path: str | os.PathLike) -> Pressure:
    """Read one pressure file (a cgroup's or /proc/pressure/<resource>)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise CgroupGone(f"{path} does not exist: the cgroup was removed, or the kernel lacks PSI") from None
    except OSError as exc:
        raise _translate(exc, path) from None
    return parse_pressure(text, source=str(path))


def validate_trigger(kind: str, stall_s: float, window_s: float) -> tuple[int, int]:
    """-> (stall_us, window_us), or InvalidInput saying what the kernel would refuse."""
    if kind not in KINDS:
        raise InvalidInput(f"PSI trigger kind must be 'some' or 'full', got {kind!r}")
    if not WINDOW_MIN_S <= window_s <= WINDOW_MAX_S:
        raise InvalidInput(f"PSI trigger window must be {WINDOW_MIN_S}..{WINDOW_MAX_S} s, got {window_s!r}")
    if not 0 < stall_s <= window_s:
        raise InvalidInput(f"PSI trigger stall must be > 0 and <= the window ({window_s} s), got {stall_s!r}")
    return int(round(stall_s * 1e6)), int(round(window_s * 1e6))


class PressureTrigger:
    """An armed PSI trigger. `fileno()` can go into select/poll/epoll (EPOLLPRI);
    `wait(timeout_s)` returns True when the trigger fired within the timeout."""

    def __init__(self, path: str | os.PathLike, kind: str = "some", stall_s: float = 0.15,
                 window_s: float = 1.0) -> None:
        self._fd: int | None = None
        stall_us, window_us = validate_trigger(kind, stall_s, window_s)
        if window_us % UNPRIVILEGED_WINDOW_US and not has_cap_sys_resource():
            raise InvalidInput(
                f"PSI trigger window {window_s} s: without CAP_SYS_RESOURCE the kernel (6.5+) accepts only "
                "multiples of 2 s; use window_s=2.0, or run with CAP_SYS_RESOURCE"
            )
        self.path = Path(path)
        self.kind, self.stall_s, self.window_s = kind, stall_s, window_s
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CgroupGone(f"{self.path} does not exist: the cgroup was removed, or the kernel lacks PSI") from None
        except OSError as exc:
            raise _translate(exc, self.path) from None
        try:
            os.write(fd, f"{kind} {stall_us} {window_us}\0".encode())
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EINVAL:
                raise InvalidInput(f"{self.path}: kernel refused trigger '{kind} {stall_us} {window_us}'") from None
            if exc.errno == errno.EOPNOTSUPP:
                raise HostUnsupported(f"{self.path}: this kernel does not support PSI triggers (5.2+ needed)") from None
            raise _translate(exc, self.path) from None
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLPRI)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("PressureTrigger is closed")
        return self._fd

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the trigger fires (True) or the timeout passes (False).
        Raises CgroupGone when the cgroup behind it was removed (POLLERR)."""
        self.fileno()
        timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
        for _fd, events in self._poll.poll(timeout_ms):
            if events & select.POLLERR:
                raise CgroupGone(f"{self.path}: the cgroup was removed while a PSI trigger was armed")
            if events & select.POLLPRI:
                return True
        return False

    def close(self) -> None:
        if self._fd is not None:
            self._poll.unregister(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PressureTrigger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:  # fds are bounded: never leak one on a forgotten trigger
        self.close()

    def __repr__(self) -> str:
        return f"PressureTrigger({str(self.path)!r}, {self.kind!r}, stall_s={self.stall_s}, window_s={self.window_s})"


def has_cap_sys_resource(procfs: ProcFs = PROC) -> bool:
    """Whether this process may arm PSI triggers with any window (else multiples of 2 s)."""
    try:
        return bool(procfs.status("self").cap_effective >> _CAP_SYS_RESOURCE & 1)
    except AgentcgError:
        return False


def _translate(exc: OSError, path: str | os.PathLike) -> Exception:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"{path}: {exc.strerror}; run as root or inside a delegated cgroup")
    return CgroupError(f"{path}: {exc.strerror}")
