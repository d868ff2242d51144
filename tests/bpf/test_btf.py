"""Struct offsets and raw-tracepoint arguments from the running kernel's BTF
(/sys/kernel/btf/vmlinux): what the raw-tracepoint programs rely on instead of headers."""
from __future__ import annotations

import struct

import pytest

from agentcg.bpf.btf import OFFSETS, VMLINUX_BTF, Btf, kernel_offsets
from agentcg.errors import BpfError

# ctx->args[i] as bpf/*.bpf.c read them (the comment above each program says the same)
RAW_ARGS = {
    "task_newtask": ["struct task_struct *", "u64"],
    "sched_process_exec": ["struct task_struct *", "pid_t", "struct linux_binprm *"],
    "sched_process_exit": ["struct task_struct *", "bool"],
    "signal_generate": ["int", "struct kernel_siginfo *", "struct task_struct *", "int", "int"],
    "signal_deliver": ["int", "struct kernel_siginfo *", "struct k_sigaction *"],
    "sched_switch": ["bool", "struct task_struct *", "struct task_struct *", "unsigned int"],
    "sched_wakeup": ["struct task_struct *"],
    "sched_wakeup_new": ["struct task_struct *"],
    "page_fault_user": ["long unsigned int", "struct pt_regs *", "long unsigned int"],
}

needs_btf = pytest.mark.skipif(not VMLINUX_BTF.exists(), reason="no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)")


@needs_btf
def test_raw_tracepoint_arguments_are_what_the_programs_read():
    btf = Btf(VMLINUX_BTF.read_bytes())
    for event, args in RAW_ARGS.items():
        assert btf.raw_tracepoint_args(event) == args, event


@needs_btf
def test_offsets_are_found_and_plausible():
    offsets = kernel_offsets()
    assert set(offsets) == set(OFFSETS)
    assert offsets["ACG_OFF_TASK_TGID"] == offsets["ACG_OFF_TASK_PID"] + 4   # pid_t pid; pid_t tgid;
    assert offsets["ACG_OFF_KSIGACTION_HANDLER"] == 0                         # sa.sa_handler comes first
    assert 0 < offsets["ACG_OFF_TASK_PID"] < 16384 and offsets["ACG_OFF_BINPRM_FILENAME"] > 0


def test_a_blob_that_is_not_btf_or_lacks_a_member_is_a_clear_error():
    with pytest.raises(BpfError, match="not a raw BTF blob"):
        Btf(b"\0" * 64)
    # the smallest valid blob: header, one struct "s" with one int member "a" at byte 4
    strings = b"\0s\0a\0int\0"
    types = struct.pack("<III", 7, 1 << 24, 4) + struct.pack("<I", 32)            # [1] int
    types += struct.pack("<III", 1, (4 << 24) | 1, 8) + struct.pack("<III", 3, 1, 32)  # [2] struct s { int a @ bit 32 }
    blob = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings
    btf = Btf(blob)
    assert btf.offset("s", "a") == 4
    with pytest.raises(BpfError, match="no member 'b'"):
        btf.offset("s", "b")
    with pytest.raises(BpfError, match="no struct nope"):
        btf.offset("nope", "a")
