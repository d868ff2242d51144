"""The doctor's bcc probes: is bcc importable, and can it really compile, load and
attach a tracepoint program on this kernel? Imported only when those checks run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from agentcg.controller.doctor import MISSING, OK, SETUP_FIX, Check
from agentcg.errors import BpfError

# Counts execs seen by sched:sched_process_exec into one array slot. Tracepoint args and
# helpers only: the headers may be of another kernel version than the running one.
PROBE_PROGRAM = r"""
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
    table = program["agentcg_doctor_execs"]
    return int(table[table.Key(0)].value)
