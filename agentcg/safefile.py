"""Files that root writes where someone else might have planted a symlink, a hard link or a FIFO.

Root (the daemon, `agentcg run`, `agentcg profile -o`) writes into directories other users
may be able to write: a shared output folder, a state directory with loose permissions.
A plain `open(path, "w")` there follows a symlink another user planted and overwrites
whatever it points to (`x.zip.tmp -> /etc/shadow`). Every such write goes through here:

- `atomic_write(path, data, mode)`: the new content goes into a fresh temp file made
  beside the target with O_CREAT|O_EXCL|O_NOFOLLOW (the `mkstemp` rule: never an existing
  name, never through a link) relative to a descriptor of the parent directory, is
  fsynced, given exactly `mode` (not the umask's idea of it), and renamed over the target.
  rename(2) replaces a symlink at the target name itself; it never writes through one.
- `atomic_file(path, mode)`: the same as a context manager yielding a binary file, for
  writers that stream (a trace's .zip); the target appears only when the block succeeds.
  `atomic_write` is this with one write: one implementation of the rules above.
- `open_private(path, flags, mode)`: open with O_NOFOLLOW; a file that is created is new
  (O_EXCL) and gets `mode`; a file that already exists is trusted only after `check_private`
  (a regular file, one link, owned by us or root, not writable by group or others) and only
  then truncated if O_TRUNC was asked for.
- `open_append(path, mode, gid)`: a log-like file (the records) opened for O_APPEND the
  same way; its mode (and group) are set to what the configuration says, also when an
  older agentcg left it world-readable.
- `read_private(path, max_bytes)`: bounded read of a file someone else could have forged
  (owner files, lock files): refused unless `check_private` passes.
- `ensure_private_dir(path, mode)`: a directory that is a directory (not a symlink), ours,
  and not writable by others; created with `mode` when missing.

Refusals raise `UnsafePath` (an InvalidInput: the CLI exits 2) naming the path and the fix.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from agentcg.errors import UnsafePath

_TMP_ATTEMPTS = 16
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _trusted_uids() -> tuple[int, ...]:
    return (0, os.geteuid())


def _describe(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}, {st.st_nlink} link(s)"


def check_private(fd: int, path: str | os.PathLike, *, allow_group_write: bool = False) -> os.stat_result:
    """Refuse an open file that another user could have planted or can still change."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{path} is not a regular file ({stat.filemode(st.st_mode)}); "
                         "remove it (someone may have planted it)")
    if st.st_uid not in _trusted_uids():
        raise UnsafePath(f"{path} belongs to uid {st.st_uid}, not to root or uid {os.geteuid()}; "
                         "remove it (someone may have planted it)")
    if st.st_nlink != 1:
        raise UnsafePath(f"{path} has {st.st_nlink} hard links ({_describe(st)}); remove it")
    writable = stat.S_IWOTH | (0 if allow_group_write else stat.S_IWGRP)
    if st.st_mode & writable:
        raise UnsafePath(f"{path} is writable by others ({_describe(st)}); remove it or chmod go-w")
    return st


def _open_parent(path: Path) -> int:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        return os.open(parent, _DIR_FLAGS)
    except FileNotFoundError:
        raise UnsafePath(f"cannot write {path}: directory {parent} does not exist; create it first") from None
    except NotADirectoryError:
        raise UnsafePath(f"cannot write {path}: {parent} is not a directory") from None
    except PermissionError:
        raise UnsafePath(f"cannot write {path}: no permission to open directory {parent}") from None


def atomic_write(path: str | os.PathLike, data: bytes | str, mode: int = 0o600, *,
                 gid: int | None = None, fsync: bool = True) -> Path:
    """Replace `path` with `data` so that a reader sees the old or the new file, never half.

    Never writes through a symlink or into an existing file: the temp file is new
    (O_EXCL|O_NOFOLLOW, random name beside the target) and renamed over the target.
    `gid`: give the file this group (with `mode` 0o640, say, for a socket group).
    """
    with atomic_file(path, mode, gid=gid, fsync=fsync) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o600, *, gid: int | None = None,
                fsync: bool = True) -> Iterator[BinaryIO]:
    """Yield a new binary file that replaces `path` when the block ends without an error
    (the rules of `atomic_write`, which writes through this); on an error the temp file is
    removed, `path` untouched. With `fsync`, the file and then its directory are synced.
    An error of our own file operations becomes UnsafePath; one the block raises passes."""
    path = Path(path)
    in_block = False
    dfd = _open_parent(path)
    try:
        fd, tmp = _create_temp(dfd, path)
        try:
            try:
                if gid is not None:
                    os.fchown(fd, -1, gid)
                os.fchmod(fd, mode)
                fh = os.fdopen(fd, "w+b")
            except BaseException:
                os.close(fd)
                raise
            with fh:
                in_block = True
                yield fh
                in_block = False
                fh.flush()
                if fsync:
                    os.fsync(fh.fileno())
            os.rename(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        if fsync:
            try:
                os.fsync(dfd)
            except OSError:   # some file systems do not fsync directories; the data is synced
                pass
    except IsADirectoryError:
        if in_block:
            raise
        raise UnsafePath(f"cannot write {path}: it is a directory") from None
    except PermissionError as exc:
        if in_block:
            raise
        raise UnsafePath(f"cannot write {path}: {exc.strerror}") from None
    finally:
        os.close(dfd)


def _create_temp(dfd: int, path: Path) -> tuple[int, str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_TMP_ATTEMPTS):
        name = f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(name, flags, 0o600, dir_fd=dfd), name
        except FileExistsError:
            continue
    raise UnsafePath(f"cannot make a temp file beside {path}: {_TMP_ATTEMPTS} random names taken")


def open_private(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o600, *,
                 allow_group_write: bool = False) -> int:
    """os.open that never follows a symlink and trusts an existing file only after checking it.

    With O_CREAT: a new file is created exclusively and gets exactly `mode`; an existing
    one must pass `check_private`. With O_EXCL as well: an existing file is an error
    (FileExistsError). O_TRUNC is applied only after the check. Returns the descriptor.
    """
    path = os.fspath(path)
    base = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    for _ in range(_TMP_ATTEMPTS):
        if flags & os.O_CREAT and flags & os.O_EXCL:
            return _create_new(path, base, mode)
        # O_NONBLOCK: a planted FIFO must not hang the open; cleared once the file checks out
        try:
            fd = os.open(path, base | os.O_NONBLOCK)
            break
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{path} is a symlink; refusing to follow it (remove it: someone may "
                                 "have planted it)") from None
            raise
        try:
            return _create_new(path, base, mode)
        except FileExistsError:
            continue        # made meanwhile by someone else: open and check it
    else:
        raise UnsafePath(f"{path}: created and removed under us {_TMP_ATTEMPTS} times; is someone racing us?")
    try:
        check_private(fd, path, allow_group_write=allow_group_write)
        if not base & os.O_NONBLOCK:
            os.set_blocking(fd, True)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_append(path: str | os.PathLike, mode: int = 0o600, gid: int | None = None) -> int:
    """An O_APPEND descriptor of `path` (created when missing), never through a link, with
    exactly `mode` and, when given, group `gid`."""
    fd = open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        st = os.fstat(fd)
        if gid is not None and st.st_gid != gid:
            os.fchown(fd, -1, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_new(path: str, base: int, mode: int) -> int:
    fd = os.open(path, base | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: str | os.PathLike, max_bytes: int) -> bytes:
    """At most `max_bytes` of a file that must pass `check_private` (UnsafePath if larger)."""
    fd = open_private(path, os.O_RDONLY)
    try:
        data = b""
        while len(data) <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise UnsafePath(f"{path} is larger than {max_bytes} bytes; not an agentcg file, remove it")
    return data


def ensure_private_dir(path: str | os.PathLike, mode: int = 0o700, *, allow_group_write: bool = False,
                       allow_sticky: bool = False) -> Path:
    """Create `path` (and parents) when missing; refuse a symlink, a foreign owner or loose modes.

    `allow_sticky`: accept a world-writable directory with the sticky bit (like /tmp), where
    others cannot rename or delete our files.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, mode)
            os.chmod(path, mode, follow_symlinks=False)
        except FileExistsError:
            pass
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{path} is a symlink; agentcg keeps its state only in a real directory "
                         "(remove the link)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} is not a directory; remove it")
    if st.st_uid not in _trusted_uids():
        raise UnsafePath(f"directory {path} belongs to uid {st.st_uid}; agentcg needs it owned by root "
                         f"or uid {os.geteuid()} (chown it, or remove it)")
    writable = stat.S_IWOTH | (0 if allow_group_write else stat.S_IWGRP)
    if st.st_mode & writable and not (allow_sticky and st.st_mode & stat.S_ISVTX):
        raise UnsafePath(f"directory {path} is writable by others ({stat.filemode(st.st_mode)}); "
                         f"chmod go-w {path}")
    return path
