"""A process parked inside a cgroup ahead of time, that becomes the tool call's program.

Joining a v1 hierarchy is a cgroup migration, and its write side waits for an RCU grace
period (the percpu cgroup_threadgroup_rwsem): about 0.5 ms on an idle 2-core host, several
ms under load, on every spawn. A spare call cgroup (controller/toolcall_pool.py) therefore
holds the exec helper in park mode (`acg_exec.c`): it joined every hierarchy when the spare
was made and waits on a socket. `spawn` sends it the argv, environment, working directory
and stdio fds; it execs, so the program's first instruction runs inside the cgroup and the
caller neither forks nor migrates anything. The Popen it returns is the parked helper's
own (the program is the caller's child, as with subprocess).

    parked = Parked.start(join_fds)             # blocks until joined (background thread)
    proc = parked.spawn(["make"], stdout=subprocess.PIPE, cwd="/src")
    parked.release()                            # unused: kill and reap it

Only what the helper can do is accepted (`supports(popen_kwargs)`): stdin/stdout/stderr,
env, cwd, text/encoding/errors/bufsize; anything else (preexec_fn, start_new_session,
user, pass_fds, ...) goes the ordinary way (spawner.spawn_with_fds).
"""
from __future__ import annotations

import array
import errno
import io
import os
import socket
import struct
import subprocess
from typing import Any, Sequence

from agentcg.controller.cgroup.spawner import helper_path, resolve
from agentcg.errors import CgroupError, CgroupGone

SUPPORTED = frozenset({"stdin", "stdout", "stderr", "env", "cwd", "text", "universal_newlines", "encoding",
                       "errors", "bufsize", "close_fds"})


def supports(popen_kwargs: dict[str, Any]) -> bool:
    return set(popen_kwargs) <= SUPPORTED and popen_kwargs.get("close_fds", True) is True


class Parked:
    def __init__(self, proc: subprocess.Popen, sock: socket.socket) -> None:
        self.proc, self.sock = proc, sock

    @classmethod
    def start(cls, join_fds: Sequence[int]) -> "Parked":
        """Park the helper in the cgroups of `join_fds` (open cgroup.procs files, which the
        caller keeps); returns once it joined. CgroupError when it cannot."""
        helper = helper_path()
        if helper is None:
            raise CgroupError("the exec helper is not built (`bash scripts/host.sh setup`)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen([str(helper), "park", str(theirs.fileno()), ",".join(map(str, join_fds))],
                                    pass_fds=(theirs.fileno(), *join_fds), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        status = ours.recv(64)
        if status != b"R":
            ours.close()
            proc.kill()
            proc.wait()
            what, _, number = status.decode("ascii", "replace").partition(" ")
            code = int(number) if number.isdigit() else errno.EIO
            if code in (errno.ENOENT, errno.ENODEV):
                raise CgroupGone(f"the cgroup vanished while parking a process in it ({os.strerror(code)})")
            raise CgroupError(f"parking a process in the cgroup failed: {os.strerror(code) if status else 'it exited'}")
        return cls(proc, ours)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def release(self) -> None:
        """Kill and reap it (an unused spare, or a call that spawned another way)."""
        try:
            self.sock.close()    # it reads end-of-file and exits; the kill makes sure
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        except OSError:
            pass

    def spawn(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Exec argv in the parked process; raises like Popen (FileNotFoundError, ...)."""
        argv = [os.fspath(a) for a in argv]
        env = kw.get("env")
        cwd = kw.get("cwd")
        program = resolve(argv[0], env, cwd)
        environ = os.environb if env is None else {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
        env_items = [k + b"=" + v for k, v in environ.items()]
        fields = [os.fsencode(cwd) if cwd is not None else b"", os.fsencode(program),
                  *map(os.fsencode, argv), *env_items]
        payload = b"\0".join(fields) + b"\0"
        stdio, parent_ends, close_after = _stdio(kw)
        proc = self.proc
        try:
            head = struct.pack("=III", len(argv), len(env_items), len(payload))
            # one message, so the helper wakes once (a second send could wake it twice)
            sent = self.sock.sendmsg([head, payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", stdio))])
            if sent < len(head) + len(payload):
                self.sock.sendall((head + payload)[sent:])
            status = b""
            while True:
                chunk = self.sock.recv(64)
                if not chunk:
                    break
                status += chunk
        except BaseException:
            for fd in parent_ends.values():
                os.close(fd)
            self.release()
            raise
        finally:
            for fd in close_after:
                os.close(fd)
            self.sock.close()
        proc.args = argv
        if status:
            for fd in parent_ends.values():
                os.close(fd)
            proc.wait()
            what, _, number = status.decode("ascii", "replace").partition(" ")
            code = int(number) if number.isdigit() else errno.EIO
            raise OSError(code, os.strerror(code), argv[0])
        _attach_pipes(proc, parent_ends, kw)
        return proc


def _stdio(kw: dict[str, Any]) -> tuple[list[int], dict[str, int], list[int]]:
    """-> (the child's fds for 0, 1, 2; our ends of pipes by name; fds to close once sent)."""
    child: list[int] = []
    ours: dict[str, int] = {}
    close_after: list[int] = []
    devnull: int | None = None
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        value = kw.get(name)
        if value is None:
            child.append(number)
        elif value == subprocess.PIPE:
            r, w = os.pipe2(os.O_CLOEXEC)
            child.append(r if number == 0 else w)
            ours[name] = w if number == 0 else r
            close_after.append(r if number == 0 else w)
        elif value == subprocess.DEVNULL:
            if devnull is None:
                devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                close_after.append(devnull)
            child.append(devnull)
        elif value == subprocess.STDOUT and number == 2:
            child.append(child[1])
        elif isinstance(value, int):
            child.append(value)
        else:
            child.append(value.fileno())
    return child, ours, close_after


def _attach_pipes(proc: subprocess.Popen, ours: dict[str, int], kw: dict[str, Any]) -> None:
    """The file objects Popen would have made for PIPE, in its text or bytes mode."""
    text = bool(kw.get("text") or kw.get("universal_newlines") or kw.get("encoding") or kw.get("errors"))
    encoding, errors_ = kw.get("encoding"), kw.get("errors")
    bufsize = kw.get("bufsize", -1)
    line_buffering = bufsize == 1 and text
    if bufsize == 1:
        bufsize = -1
    proc.text_mode = text
    proc.encoding, proc.errors = encoding, errors_
    proc.universal_newlines = text
    if text and encoding is None:
        encoding = io.text_encoding(None)
    for name, fd in ours.items():
        if name == "stdin":
            f: Any = io.open(fd, "wb", bufsize)
            if text:
                f = io.TextIOWrapper(f, write_through=True, line_buffering=line_buffering,
                                     encoding=encoding, errors=errors_)
        else:
            f = io.open(fd, "rb", bufsize)
            if text:
                f = io.TextIOWrapper(f, encoding=encoding, errors=errors_)
        setattr(proc, name, f)
