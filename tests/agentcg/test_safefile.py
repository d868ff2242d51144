"""agentcg.safefile on the real file system: planted symlinks, hard links, FIFOs, foreign owners.

The foreign files are made by root and chowned to `nobody` (skipped when not root), which
is what another user planting them in a shared directory leaves behind.
"""
from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from agentcg.errors import InvalidInput, UnsafePath
from agentcg.safefile import atomic_write, ensure_private_dir, open_private, read_private


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
