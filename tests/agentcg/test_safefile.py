"""agentcg.safefile on the real file system: planted symlinks, hard links, FIFOs, foreign owners.

The foreign files are made by root and chowned to `nobody` (skipped when not root), which
is what another user planting them in a shared directory leaves behind.
"""
from __future__ import annotations

import os
import pwd
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from agentcg.errors import InvalidInput, UnsafePath
from agentcg.safefile import atomic_file, atomic_write, ensure_private_dir, open_private, read_private


REPO = Path(__file__).resolve().parents[2]


def _nobody() -> int:
    if os.geteuid() != 0:
        pytest.skip("making a file owned by another uid needs root")
    return pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("precious")
    return path


def test_atomic_write_replaces_planted_symlinks_instead_of_following_them(tmp_path: Path, victim: Path) -> None:
    target = tmp_path / "out" / "x.zip"
    target.parent.mkdir()
    (target.parent / "x.zip.tmp").symlink_to(victim)          # the name main used for its temp file
    target.symlink_to(victim)
    atomic_write(target, b"new")
    assert victim.read_text() == "precious"
    assert not target.is_symlink() and target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []   # no temp left


def test_atomic_write_sets_the_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = atomic_write(tmp_path / "records.jsonl", "x", mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path = atomic_write(tmp_path / "state.json", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_atomic_write_gives_the_group(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another group needs root")
    gid = pwd.getpwnam("nobody").pw_gid
    path = atomic_write(tmp_path / "f", "x", mode=0o640, gid=gid)
    assert path.stat().st_gid == gid


def test_atomic_write_into_a_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist; create it first"):
        atomic_write(tmp_path / "missing" / "x.zip", "x")
    with pytest.raises(UnsafePath, match="is a directory"):
        atomic_write(tmp_path, "x")


def test_atomic_file_streams_with_the_same_rules(tmp_path: Path, victim: Path) -> None:
    """The streaming writer is atomic_write's one implementation: through no planted link,
    the exact mode, the target only once the block succeeded, no temp file left."""
    target = tmp_path / "trace.zip"
    target.symlink_to(victim)
    with atomic_file(target, 0o640) as fh:
        fh.write(b"part one, ")
        assert target.is_symlink()                     # not there until the block ends
        fh.write(b"part two")
    assert victim.read_text() == "precious"
    assert target.read_bytes() == b"part one, part two" and stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError):
        with atomic_file(target) as fh:
            fh.write(b"half")
            raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"part one, part two"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_file_passes_the_blocks_own_errors(tmp_path: Path) -> None:
    """A PermissionError of the block is the caller's (a source it could not read), not
    an unsafe target: it passes unchanged."""
    with pytest.raises(PermissionError):
        with atomic_file(tmp_path / "out"):
            raise PermissionError(13, "the caller's own")
    assert not (tmp_path / "out").exists()


def test_atomic_write_and_atomic_file_refuse_a_directory_they_may_not_write() -> None:
    """As a user who may enter the directory but not write it, both say so (UnsafePath),
    never a traceback of PermissionError."""
    if os.geteuid() != 0:
        pytest.skip("running as another uid needs root")
    _nobody()
    directory = Path(tempfile.mkdtemp(prefix="agentcg-test-safefile-"))
    try:
        directory.chmod(0o755)
        code = ("import sys\nfrom agentcg.errors import UnsafePath\nfrom agentcg.safefile import atomic_file, atomic_write\n"
                "for write in (lambda p: atomic_write(p, 'x'), lambda p: atomic_file(p).__enter__()):\n"
                "    try:\n        write(sys.argv[1])\n    except UnsafePath as exc:\n        print('refused:', exc)\n")
        # the system python: this test's interpreter may live where `nobody` may not enter
        done = subprocess.run(["/usr/bin/python3", "-c", code, str(directory / "out")], user=65534, group=65534,
                              capture_output=True, text=True, timeout=60, cwd="/",
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 2 and all(f"cannot write {directory / 'out'}" in line for line in lines), done.stdout
        assert list(directory.iterdir()) == []
    finally:
        for p in directory.iterdir():
            p.unlink()
        directory.rmdir()


def test_open_private_refuses_a_symlink(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "lock"
    link.symlink_to(victim)
    with pytest.raises(UnsafePath, match="symlink"):
        open_private(link, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nothing-there")
    with pytest.raises(UnsafePath, match="symlink"):
        open_private(dangling, os.O_RDWR | os.O_CREAT)
    assert not (tmp_path / "nothing-there").exists()
    assert victim.read_text() == "precious"


def test_open_private_refuses_a_hard_link_before_truncating(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "owner.json"
    os.link(victim, link)
    with pytest.raises(UnsafePath, match="2 hard links"):
        open_private(link, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    assert victim.read_text() == "precious"


def test_open_private_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "lock"
    os.mkfifo(fifo)
    with pytest.raises(UnsafePath, match="not a regular file"):
        open_private(fifo, os.O_RDONLY)


def test_open_private_refuses_a_file_of_another_uid(tmp_path: Path) -> None:
    uid = _nobody()
    forged = tmp_path / "call.json"
    forged.write_text("{}")
    os.chown(forged, uid, -1)
    with pytest.raises(UnsafePath, match=f"belongs to uid {uid}"):
        open_private(forged, os.O_RDONLY)
    with pytest.raises(UnsafePath, match=f"belongs to uid {uid}"):
        read_private(forged, 4096)


def test_open_private_refuses_a_file_others_can_write(tmp_path: Path) -> None:
    loose = tmp_path / "lock"
    loose.write_text("")
    os.chmod(loose, 0o666)
    with pytest.raises(UnsafePath, match="writable by others"):
        open_private(loose, os.O_RDWR | os.O_CREAT)
    os.chmod(loose, 0o660)
    with pytest.raises(UnsafePath, match="writable by others"):
        open_private(loose, os.O_RDWR)
    os.close(open_private(loose, os.O_RDWR, allow_group_write=True))


def test_open_private_creates_new_files_with_the_mode_and_reopens_own_ones(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    fd = open_private(path, os.O_RDWR | os.O_CREAT, 0o640)
    os.write(fd, b"abc")
    os.close(fd)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    assert os.read(fd, 10) == b""
    assert os.get_blocking(fd)
    os.close(fd)
    with pytest.raises(FileExistsError):
        open_private(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)


def test_read_private_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "owner.json"
    path.write_bytes(b"x" * 100)
    os.chmod(path, 0o600)
    assert read_private(path, 100) == b"x" * 100
    with pytest.raises(UnsafePath, match="larger than 99 bytes"):
        read_private(path, 99)


def test_ensure_private_dir(tmp_path: Path) -> None:
    made = ensure_private_dir(tmp_path / "state" / "calls", 0o700)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert ensure_private_dir(made) == made
    link = tmp_path / "link"
    link.symlink_to(made)
    with pytest.raises(UnsafePath, match="symlink"):
        ensure_private_dir(link)
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    with pytest.raises(UnsafePath, match="writable by others"):
        ensure_private_dir(loose)
    os.chmod(loose, 0o1777)
    assert ensure_private_dir(loose, allow_sticky=True) == loose


def test_ensure_private_dir_refuses_a_directory_of_another_uid(tmp_path: Path) -> None:
    uid = _nobody()
    foreign = tmp_path / "state"
    foreign.mkdir(mode=0o755)
    os.chown(foreign, uid, -1)
    with pytest.raises(UnsafePath, match=f"belongs to uid {uid}"):
        ensure_private_dir(foreign)
