"""Without bcc importable, every BPF entry point says how to install it (python3-bpfcc).

bcc is hidden by a None entry in sys.modules (import then raises ImportError): this host
has it installed and removing the Debian package from a test is not an option."""
from __future__ import annotations

import os
import sys

import pytest

from agentcg.bpf.cudacopy import UPROBE_PMU, CudaCopyTracer
from agentcg.bpf.monitor import load_bcc
from agentcg.errors import BpfError


@pytest.fixture
def no_bcc(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)


def test_load_bcc_names_the_package(no_bcc):
    with pytest.raises(BpfError, match="python3-bpfcc"):
        load_bcc()


@pytest.mark.skipif(not UPROBE_PMU.exists(), reason=f"uprobes are not available ({UPROBE_PMU} missing)")
def test_cuda_copy_tracer_without_bcc_is_a_bpf_error(no_bcc):
    # Any existing file passes the library-path check that comes before bcc is needed.
    with pytest.raises(BpfError, match="python3-bpfcc"):
        CudaCopyTracer(os.getpid(), libcudart=sys.executable)
