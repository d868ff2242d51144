"""Struct member offsets of the running kernel, read from its BTF (/sys/kernel/btf/vmlinux).

The raw-tracepoint programs get pointers (a `struct task_struct *`, a `struct linux_binprm *`)
and read a few members of them with bpf_probe_read_kernel. The installed kernel headers
are those of another kernel (6.1 for a 6.18 kernel here), so no offset may come from them:
each offset is looked up here, in the type information the running kernel carries, and
passed to the compiler as a -D define (`OFFSETS` below names them). Layout of the blob
from include/uapi/linux/btf.h; only what the lookup needs is decoded.

    offsets = kernel_offsets()          # {"ACG_OFF_TASK_PID": 2464, ...}, cached per process
"""
from __future__ import annotations

import functools
import struct
from pathlib import Path

from agentcg.errors import BpfError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")   # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_TYPE = struct.Struct("<III")          # name_off, info, size_or_type
_MEMBER = struct.Struct("<III")        # name_off, type, offset

# kinds (BTF_KIND_*) and the bytes that follow their 12-byte record (per vlen entry, or fixed)
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC, _FUNC_PROTO, _VAR, _DATASEC = 9, 10, 11, 12, 13, 14, 15
_FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = 16, 17, 18, 19
_FIXED_EXTRA = {_INT: 4, _ARRAY: 12, _VAR: 4, _DECL_TAG: 4}
_PER_VLEN = {_STRUCT: 12, _UNION: 12, _ENUM: 8, _FUNC_PROTO: 8, _DATASEC: 12, _ENUM64: 12}
_QUALIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)

# define -> (struct, member path): what the programs read through a pointer argument
OFFSETS = {
    "ACG_OFF_TASK_PID": ("task_struct", "pid"),
    "ACG_OFF_TASK_TGID": ("task_struct", "tgid"),
    "ACG_OFF_TASK_FLAGS": ("task_struct", "flags"),
    "ACG_OFF_TASK_RUNTIME": ("task_struct", "se.sum_exec_runtime"),
    "ACG_OFF_TASK_RUN_DELAY": ("task_struct", "sched_info.run_delay"),
    "ACG_OFF_TASK_PCOUNT": ("task_struct", "sched_info.pcount"),
    "ACG_OFF_BINPRM_FILENAME": ("linux_binprm", "filename"),
    "ACG_OFF_KSIGACTION_HANDLER": ("k_sigaction", "sa.sa_handler"),
}


class Btf:
    """The struct and union types of one raw BTF blob, by name."""

    def __init__(self, blob: bytes, where: str = "BTF") -> None:
        if len(blob) < _HEADER.size:
            raise BpfError(f"{where} is too short to be BTF")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(blob)
        if magic != BTF_MAGIC:
            raise BpfError(f"{where} is not a raw BTF blob (magic {magic:#x}); the kernel needs CONFIG_DEBUG_INFO_BTF")
        self._strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]
        self._types: list[tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]  # id -> (kind, name_off, size_or_type, pos, info)
        self._blob = blob
        self._by_name: dict[bytes, list[int]] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_or_type = _TYPE.unpack_from(blob, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            self._types.append((kind, name_off, size_or_type, pos + _TYPE.size, info))
            if kind in (_STRUCT, _UNION, _TYPEDEF) and name_off:
                self._by_name.setdefault(self._name(name_off), []).append(len(self._types) - 1)
            pos += _TYPE.size + _FIXED_EXTRA.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen

    def _name(self, off: int) -> bytes:
        return self._strings[off:self._strings.index(b"\0", off)]

    def _resolve(self, type_id: int) -> int:
        while self._types[type_id][0] in _QUALIFIERS:
            type_id = self._types[type_id][2]
        return type_id

    def _member_offset(self, type_id: int, name: bytes) -> tuple[int, int] | None:
        """(byte offset, member type id) of `name` in a struct/union, looking inside
        anonymous members (task_struct keeps fields in unnamed unions)."""
        kind, _name_off, _size, pos, info = self._types[type_id]
        if kind not in (_STRUCT, _UNION):
            return None
        kind_flag = info >> 31
        for i in range(info & 0xFFFF):
            m_name, m_type, m_off = _MEMBER.unpack_from(self._blob, pos + i * _MEMBER.size)
            bit_off = m_off & 0xFFFFFF if kind_flag else m_off
            if m_name and self._name(m_name) == name:
                if bit_off % 8:
                    return None  # a bitfield: not readable by offset
                return bit_off // 8, m_type
            if not m_name:
                inner = self._member_offset(self._resolve(m_type), name)
                if inner is not None:
                    return bit_off // 8 + inner[0], inner[1]
        return None

    def describe(self, type_id: int) -> str:
        """A C-like spelling of a type ("struct task_struct *", "int"), without qualifiers."""
        type_id = self._resolve_quiet(type_id)
        kind, name_off = self._types[type_id][0], self._types[type_id][1]
        if kind == _PTR:
            return self.describe(self._types[type_id][2]).rstrip() + " *"
        if type_id == 0:
            return "void"
        prefix = {_STRUCT: "struct ", _UNION: "union ", _ENUM: "enum ", _ENUM64: "enum "}.get(kind, "")
        return prefix + (self._name(name_off).decode() if name_off else "?")

    def _resolve_quiet(self, type_id: int) -> int:
        # typedefs of plain integers (pid_t, u64) are spelled by their own name
        while self._types[type_id][0] in _QUALIFIERS and self._types[type_id][0] != _TYPEDEF:
            type_id = self._types[type_id][2]
        return type_id

    def raw_tracepoint_args(self, event: str) -> list[str]:
        """The arguments a raw tracepoint program gets (ctx->args[0], ...), from the
        kernel's `btf_trace_<event>` typedef (its first parameter, the probe's data, is
        not passed)."""
        ids = [t for t in self._by_name.get(f"btf_trace_{event}".encode(), []) if self._types[t][0] == _TYPEDEF]
        if not ids:
            raise BpfError(f"the kernel's BTF has no tracepoint {event} (btf_trace_{event})")
        ptr = self._types[ids[0]][2]
        proto = self._types[ptr][2] if self._types[ptr][0] == _PTR else ptr
        kind, _name, _size, pos, info = self._types[proto]
        if kind != _FUNC_PROTO:
            raise BpfError(f"btf_trace_{event} is not a function pointer type")
        params = [struct.unpack_from("<II", self._blob, pos + 8 * i)[1] for i in range(info & 0xFFFF)]
        return [self.describe(p) for p in params[1:]]

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` ("sa.sa_handler") inside `struct struct_name`."""
        candidates = [t for t in self._by_name.get(struct_name.encode(), []) if self._types[t][0] == _STRUCT]
        if not candidates:
            raise BpfError(f"the kernel's BTF has no struct {struct_name}; agentcg's raw tracepoints need it")
        type_id, total = candidates[0], 0
        for part in path.split("."):
            found = self._member_offset(self._resolve(type_id), part.encode())
            if found is None:
                raise BpfError(f"the kernel's BTF has no member {part!r} in struct {struct_name} (path {path!r})")
            total += found[0]
            type_id = found[1]
        return total


@functools.lru_cache(maxsize=4)
def kernel_offsets(path: Path = VMLINUX_BTF) -> dict[str, int]:
    """Every offset in OFFSETS, from the running kernel's BTF (read once per process)."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise BpfError(f"cannot read {path}: {exc.strerror}; the kernel needs CONFIG_DEBUG_INFO_BTF=y "
                       "(agentcg reads struct offsets from it, never from kernel headers)") from None
    btf = Btf(blob, str(path))
    return {define: btf.offset(name, member) for define, (name, member) in OFFSETS.items()}
