"""The doctor's live BPF probes: does bpf(2) load a program, is bcc importable, and can
it really compile, load and attach a tracepoint program on this kernel? Imported only
when those checks run."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys
import struct
import tempfile
import time

from agentcg.controller.doctor_check import MISSING, OK, SETUP_FIX, UNSUPPORTED, WARNING, Check
from agentcg.errors import BpfError

# Counts execs seen by sched:sched_process_exec into one array slot. Tracepoint args and
# helpers only: the headers may be of another kernel version than the running one.
PROBE_PROGRAM = rb"""
BPF_ARRAY(agentcg_doctor_execs, u64, 1);

TRACEPOINT_PROBE(sched, sched_process_exec) {
    int zero = 0;
    u64 *count = agentcg_doctor_execs.lookup(&zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}
"""
_EXEC_TIMEOUT_S = 5.0
_STDERR_TAIL_LINES = 3
_BCC_FIX = f"apt-get install python3-bpfcc, then {SETUP_FIX} (links it into the venv)"


# Two instructions, `r0 = 0; exit`, as a socket filter: the smallest program bpf(2) loads.
_TINY_PROGRAM = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])
_BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_PROG_LOAD, _BPF_PROG_TYPE_SOCKET_FILTER = 5, 1


def probe_bpf_syscall() -> Check:
    machine = os.uname().machine
    number = _BPF_SYSCALL_NR.get(machine)
    if number is None:
        return Check("bpf_syscall", WARNING, f"bpf(2) not probed directly on {machine}; see bcc_load", "")
    insns = ctypes.create_string_buffer(_TINY_PROGRAM, len(_TINY_PROGRAM))
    license_ = ctypes.create_string_buffer(b"GPL")
    # union bpf_attr, BPF_PROG_LOAD prefix: prog_type, insn_cnt, insns, license, log_level,
    # log_size, log_buf, kern_version (+4 bytes pad); the kernel zero-fills the rest.
    attr = struct.pack("<IIQQIIQI4x", _BPF_PROG_TYPE_SOCKET_FILTER, len(_TINY_PROGRAM) // 8,
                       ctypes.addressof(insns), ctypes.addressof(license_), 0, 0, 0, 0)
    attr_buf = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(number), ctypes.c_long(_BPF_PROG_LOAD),
                      ctypes.c_void_p(ctypes.addressof(attr_buf)), ctypes.c_long(len(attr)))
    if fd >= 0:
        os.close(fd)
        return Check("bpf_syscall", OK, "bpf(2) loaded a 2-instruction socket filter", "")
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return Check("bpf_syscall", UNSUPPORTED, "bpf(2) does not exist (CONFIG_BPF_SYSCALL not set)",
                     "use a kernel built with CONFIG_BPF_SYSCALL=y")
    if err in (errno.EPERM, errno.EACCES):
        return Check("bpf_syscall", MISSING, f"bpf(2) refused: {os.strerror(err)}",
                     "run as root (or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)")
    return Check("bpf_syscall", MISSING, f"bpf(2) PROG_LOAD failed: {os.strerror(err)}",
                 "check dmesg and `sysctl kernel.unprivileged_bpf_disabled`")


def probe_bcc() -> Check:
    try:
        import bcc
    except ImportError as exc:
        return Check("bcc", MISSING, f"cannot import bcc: {exc}", _BCC_FIX)
    path = os.path.dirname(getattr(bcc, "__file__", "") or "?")
    if not hasattr(bcc, "BPF"):
        return Check("bcc", MISSING, f"the bcc at {path} is not BCC (PyPI's unrelated 'bcc' package?)",
                     f"pip uninstall bcc; {_BCC_FIX}")
    version = getattr(bcc, "__version__", "unknown")
    return Check("bcc", OK, f"bcc {version} from {path}", "", {"version": version, "path": path})


def probe_bcc_load() -> Check:
    try:
        import bcc
        bcc.BPF  # noqa: B018 - PyPI's unrelated 'bcc' has no BPF
    except (ImportError, AttributeError):
        return Check("bcc_load", MISSING, "bcc is not importable (see the bcc check)", _BCC_FIX)
    start = time.monotonic()
    try:
        program, compiler_output = _compile(bcc)
    except Exception as exc:  # bcc raises bare Exception for compile and load failures
        return Check("bcc_load", MISSING, f"compiling the probe failed: {exc}",
                     f"check kernel_headers; {SETUP_FIX} installs them")
    try:
        load_s = time.monotonic() - start
        execs = _trigger_and_count(program)
    except Exception as exc:
        return Check("bcc_load", MISSING, f"the probe loaded but failed: {exc}",
                     "check that tracefs is mounted (see tracefs)")
    finally:
        program.cleanup()
    data = {"compile_load_s": round(load_s, 3), "execs_seen": execs}
    detail = f"compiled, loaded and attached sched:sched_process_exec in {load_s:.2f} s"
    if execs < 1:
        return Check("bcc_load", MISSING, f"{detail}, but it saw no exec", "check dmesg", data)
    if compiler_output:
        data["compiler_output"] = compiler_output
    return Check("bcc_load", OK, f"{detail}; it counted {execs} exec(s)", "", data)


def _compile(bcc) -> tuple[object, str]:
    """BPF(text=...) with clang's stderr captured, so a failure can name its cause."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            program = bcc.BPF(text=PROBE_PROGRAM)
        except Exception as exc:
            raise BpfError(f"{exc}; {_tail(captured)}".rstrip("; ")) from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        return program, _tail(captured)


def _tail(captured) -> str:
    captured.seek(0)
    lines = captured.read().decode(errors="replace").strip().splitlines()
    return " | ".join(lines[-_STDERR_TAIL_LINES:])


def _trigger_and_count(program) -> int:
    true = shutil.which("true") or sys.executable
    argv = [true] if true != sys.executable else [true, "-c", ""]
    subprocess.run(argv, check=True, timeout=_EXEC_TIMEOUT_S)
    table = program[b"agentcg_doctor_execs"]
    return int(table[table.Key(0)].value)
