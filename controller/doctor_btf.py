"""Reading a raw BTF blob (/sys/kernel/btf/vmlinux) just enough to ask whether a
struct type is there: how the doctor tells kernel features that have no file of their
own (memcg BPF struct_ops) apart. Layout from include/uapi/linux/btf.h."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agentcg.errors import HostUnsupported

BTF_MAGIC = 0xEB9F
_BTF_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off/len, str_off/len


@dataclass(frozen=True)
class BtfStrings:
    """The string section of a raw BTF blob, and where the type section is."""

    blob: bytes
    types: memoryview
    strings: bytes

    def has_name(self, name: str) -> bool:
        return self.name_offset(name) is not None

    def name_offset(self, name: str) -> int | None:
        needle = name.encode()
        if self.strings.startswith(needle + b"\0"):
            return 0
        found = self.strings.find(b"\0" + needle + b"\0")
        return None if found < 0 else found + 1


def read_btf(path: Path) -> BtfStrings:
    """Reads a raw BTF blob (/sys/kernel/btf/vmlinux); raises HostUnsupported if it is not one."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise HostUnsupported(f"cannot read {path}: {exc.strerror}") from None
    if len(blob) < _BTF_HEADER.size:
        raise HostUnsupported(f"{path} is too short to be BTF ({len(blob)} bytes)")
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _BTF_HEADER.unpack_from(blob)
    if magic != BTF_MAGIC or hdr_len + max(type_off + type_len, str_off + str_len) > len(blob):
        raise HostUnsupported(f"{path} is not a raw BTF blob (magic {magic:#x})")
    view = memoryview(blob)
    return BtfStrings(blob=blob, types=view[hdr_len + type_off: hdr_len + type_off + type_len],
                      strings=blob[hdr_len + str_off: hdr_len + str_off + str_len])


# Bytes that follow each 12-byte BTF type record, by kind (include/uapi/linux/btf.h).
_BTF_KIND_STRUCT = 4
_BTF_EXTRA: dict[int, Callable[[int], int]] = {
    1: lambda vlen: 4, 3: lambda vlen: 12, 4: lambda vlen: 12 * vlen, 5: lambda vlen: 12 * vlen,
    6: lambda vlen: 8 * vlen, 13: lambda vlen: 8 * vlen, 14: lambda vlen: 4,
    15: lambda vlen: 12 * vlen, 17: lambda vlen: 4, 19: lambda vlen: 12 * vlen,
}


def btf_has_struct(btf: BtfStrings, name: str) -> bool:
    """True when a STRUCT type named `name` is in the blob: a string-section search first
    (fast, and enough to say no), then a walk of the type section to confirm the kind."""
    offset = btf.name_offset(name)
    if offset is None:
        return False
    types, pos = btf.types, 0
    while pos + 12 <= len(types):
        name_off, info = struct.unpack_from("<II", types, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if name_off == offset and kind == _BTF_KIND_STRUCT:
            return True
        extra = _BTF_EXTRA.get(kind)
        pos += 12 + (extra(vlen) if extra else 0)
    return False
