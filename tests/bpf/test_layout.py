"""bpf/events.py mirrors bpf/agentcg.h: every struct has the C size and field offsets.

bcc builds a ctypes type for each map value from the C compiler's own layout, so a
throw-away map per struct gives the real layout to compare with."""
from __future__ import annotations

import ctypes as ct
import os

import pytest

from agentcg.bpf import events
from agentcg.bpf.monitor import BPF_DIR

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="compiling BPF maps needs root")


def test_ctypes_mirror_matches_c_layout():
    bcc = pytest.importorskip("bcc")
    text = '#include "agentcg.h"\n' + "".join(
        f"BPF_ARRAY(s_{name}, struct {name}, 1);\n" for name in events.C_STRUCTS)
    b = bcc.BPF(text=text.encode(), cflags=[f"-I{BPF_DIR}"])
    try:
        for name, mirror in events.C_STRUCTS.items():
            c_type = b[f"s_{name}".encode()].Leaf
            assert ct.sizeof(mirror) == ct.sizeof(c_type), name
            c_fields = [(f[0], getattr(c_type, f[0]).offset) for f in c_type._fields_ if not f[0].startswith("__pad")]
            py_fields = [(f[0], getattr(mirror, f[0]).offset) for f in mirror._fields_]
            assert c_fields and py_fields == c_fields, name
    finally:
        b.cleanup()


def test_constants_match_header():
    header = (BPF_DIR / "agentcg.h").read_text()
    for name in ("HIST_SLOTS", "COMM_LEN", "FILENAME_LEN", "EV_EXEC", "EV_EXIT", "EV_RSS_THRESHOLD",
                 "EV_OOM_VICTIM", "EV_RECLAIM_STALL", "EV_CGROUP_REMOVED", "ERR_RINGBUF_FULL",
                 "ERR_TASKS_FULL", "ERR_MMS_FULL", "ERR_BLOCK_FULL", "ERR_INFLIGHT_FULL", "ERR_SLOTS",
                 "WATCH_STOP_AT_EXEC"):
        assert f"#define {name} {getattr(events, name)}\n" in header, name


def test_unknown_event_kind_is_a_bpf_error():
    from agentcg.errors import BpfError

    raw = events.Event(kind=99)
    with pytest.raises(BpfError, match="unknown event kind 99"):
        events.decode_event(raw)
