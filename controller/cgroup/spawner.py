"""Starting a program inside a cgroup without forking the caller.

A `preexec_fn` that joins the cgroup forces Python's subprocess to fork() the caller
(copying the page tables of a daemon that holds bcc: 3+ ms) instead of vfork(). Here the
caller vforks a tiny exec helper (`acg_exec.c`, built once) that writes itself into the
call's cgroup.procs files, one per hierarchy, and execs the program: its first
instruction runs inside every hierarchy. On a pure v2 host with controllers,
clone3(CLONE_INTO_CGROUP) would save the helper's exec, but Python cannot issue it without
forking itself, and on hybrid hosts the v1 hierarchies need joining anyway; see
docs/cgroups.md for the measured options.

Without a built helper (no C compiler) a `/bin/sh` trampoline does the same, slower.

    proc = spawn_joined([v2_dir / "cgroup.procs", memory_dir / "cgroup.procs"], ["make"])
"""
from __future__ import annotations

import errno
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

from agentcg.controller.cgroup import _fs
from agentcg.errors import CgroupError, CgroupGone

HELPER_SOURCE = Path(__file__).with_name("acg_exec.c")
LIBEXEC_DIR = Path(os.environ.get("AGENTCG_LIBEXEC", "/var/cache/agentcg"))
# joins each path given before "--", then execs the rest ("echo 0" writes "0\n": accepted)
_SH_TRAMPOLINE = ('while [ "$1" != -- ]; do echo 0 > "$1" || exit 126; shift; done; shift; exec "$@"')


def helper_name() -> str:
    digest = hashlib.sha256(HELPER_SOURCE.read_bytes()).hexdigest()[:12]
    return f"agentcg-exec-{digest}"


@functools.lru_cache(maxsize=1)
def helper_path() -> Path | None:
    """The built helper for this source, or None (not built, or in an unsafe directory)."""
    candidate = LIBEXEC_DIR / helper_name()
    try:
        st_dir, st = LIBEXEC_DIR.stat(), candidate.stat()
    except OSError:
        return None
    # root runs it: only a root-owned file in a directory nobody else can write is trusted
    if st.st_uid != 0 or st_dir.st_uid != 0 or (st.st_mode | st_dir.st_mode) & 0o022 or not os.access(candidate, os.X_OK):
        return None
    return candidate


def build_helper(compiler: str | None = None) -> Path:
    """Compile acg_exec.c into LIBEXEC_DIR (static where the C library allows); idempotent."""
    target = LIBEXEC_DIR / helper_name()
    if helper_path() is not None:
        return target
    cc = compiler or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise CgroupError("no C compiler (cc) to build the exec helper: install gcc "
                          "(`bash scripts/host.sh setup` does); spawns use a slower /bin/sh trampoline meanwhile")
    LIBEXEC_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(LIBEXEC_DIR, 0o755)
    fd, tmp = tempfile.mkstemp(dir=LIBEXEC_DIR, prefix=".build-")
    os.close(fd)
    try:
        for extra in (["-static"], []):   # static: no dynamic loader run at each spawn
            done = subprocess.run([cc, "-O2", "-s", *extra, "-o", tmp, str(HELPER_SOURCE)],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise CgroupError(f"building the exec helper with {cc} failed: {done.stderr.strip()[-400:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    helper_path.cache_clear()
    return target


def resolve(program: str, env: dict[str, str] | None, cwd: Any) -> str:
    """The path subprocess would execute for `program`, or what it would raise
    (FileNotFoundError, PermissionError) when there is none."""
    if "/" in program:
        path = program if os.path.isabs(program) or cwd is None else os.path.join(os.fspath(cwd), program)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        return path
    search = (env if env is not None else os.environ).get("PATH", os.defpath)
    found = shutil.which(program, path=search)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    return found


def spawn_joined(procs_files: Sequence[Path], argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Start argv with its first instruction inside every cgroup whose cgroup.procs is
    given. Raises FileNotFoundError/PermissionError like Popen, CgroupGone when a cgroup
    vanished (then nothing ran), CgroupError for other join failures."""
    argv = [os.fspath(a) for a in argv]
    program = resolve(argv[0], popen_kwargs.get("env"), popen_kwargs.get("cwd"))
    helper = helper_path()
    if helper is None:
        proc = subprocess.Popen(["/bin/sh", "-c", _SH_TRAMPOLINE, "agentcg-join", *map(str, procs_files), "--",
                                 *argv], **popen_kwargs)
        proc.args = argv
        return proc
    fds: list[int] = []
    try:
        for procs in procs_files:
            fds.append(_fs.open_procs(procs))
        return spawn_with_fds(fds, argv, program=program, helper=helper, **popen_kwargs)
    finally:
        for fd in fds:
            os.close(fd)


def spawn_with_fds(join_fds: Sequence[int], argv: Sequence[str], *, program: str | None = None,
                   helper: Path | None = None, **popen_kwargs: Any) -> subprocess.Popen:
    """spawn_joined for callers that opened the cgroup.procs files themselves (and keep
    them: the helper closes only its inherited copies). Needs the built helper."""
    argv = [os.fspath(a) for a in argv]
    program = program or resolve(argv[0], popen_kwargs.get("env"), popen_kwargs.get("cwd"))
    helper = helper or helper_path()
    if helper is None:
        raise CgroupError("the exec helper is not built (`bash scripts/host.sh setup`)")
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        pass_fds = tuple(popen_kwargs.pop("pass_fds", ())) + (status_w, *join_fds)
        proc = subprocess.Popen([str(helper), str(status_w), ",".join(map(str, join_fds)), "--", program, *argv],
                                pass_fds=pass_fds, **popen_kwargs)
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    try:
        status = _read_all(status_r)   # end of file: the program runs
    finally:
        os.close(status_r)
    proc.args = argv
    if not status:
        return proc
    proc.wait()
    what, _, number = status.partition(" ")
    code = int(number) if number.isdigit() else errno.EIO
    if what == "E":   # OSError picks the subclass from the errno, as subprocess's does
        raise OSError(code, os.strerror(code), argv[0])
    if code in (errno.ENOENT, errno.ENODEV):
        raise CgroupGone(f"the cgroup vanished while spawning {argv[0]!r} (joining it: {os.strerror(code)})")
    raise CgroupError(f"joining the cgroup before running {argv[0]!r} failed: {os.strerror(code)}")


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        chunk = os.read(fd, 64)
        if not chunk:
            return b"".join(chunks).decode("ascii", "replace").strip()
        chunks.append(chunk)


if __name__ == "__main__":   # `python -m agentcg.controller.cgroup.spawner`: build the helper (setup)
    print(build_helper())
