"""CUDA copy uprobes, on the real kernel and the real libcudart from the
nvidia-cuda-runtime-cu12 wheel: without a GPU every call fails (no driver), but the
probe at the function's entry still sees it and its arguments."""
from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from agentcg.errors import InvalidInput

bcc = pytest.importorskip("bcc", reason="bcc (python3-bpfcc) is not importable")
from agentcg.bpf.cudacopy import UPROBE_PMU, CopyStat, CudaCopyTracer, find_library  # noqa: E402

pytestmark = pytest.mark.skipif(not UPROBE_PMU.exists(), reason="uprobes not available on this kernel")

CHILD = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
a, b = ctypes.create_string_buffer(1 << 16), ctypes.create_string_buffer(1 << 16)
print("ready", flush=True)
sys.stdin.readline()
codes = [lib.cudaMemcpy(a, b, 12345, 1),            # host to device
         lib.cudaMemcpyAsync(a, b, 4096, 2, None),   # device to host
         lib.cudaMemcpyAsync(a, b, 100, 2, None),
         lib.cudaMemcpy(a, b, 777, 3),               # device to device
         lib.cudaMemcpy(a, b, 5, 9)]                 # an invalid kind
print(" ".join(map(str, codes)), flush=True)
"""


@pytest.fixture(scope="module")
def libcudart() -> str:
    path = find_library(1, "libcudart")
    if path is None:
        pytest.skip("libcudart not found: pip install nvidia-cuda-runtime-cu12")
    return path


def start_child(libcudart: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD, libcudart], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def finish(child: subprocess.Popen) -> list[int]:
    child.stdin.write("go\n")
    child.stdin.flush()
    codes = [int(c) for c in child.stdout.readline().split()]
    assert child.wait(timeout=30) == 0
    return codes


def test_uprobes_count_cudamemcpy_bytes_by_direction(libcudart):
    target, bystander = start_child(libcudart), start_child(libcudart)
    try:
        with CudaCopyTracer(target.pid) as tracer:
            assert tracer.libraries["libcudart"] == libcudart
            assert tracer.attached == ["cudaMemcpy", "cudaMemcpyAsync"]
            codes = finish(target)
            finish(bystander)                      # another process: not counted
            counters = tracer.counters()
    finally:
        for child in (target, bystander):
            child.kill()
            child.wait()
    assert all(code != 0 for code in codes)        # no driver: every call failed, and was still seen
    assert counters.by_api["cudaMemcpy"]["host_to_device"] == (1, 12345)
    assert counters.by_api["cudaMemcpyAsync"]["device_to_host"] == (2, 4196)
    assert counters.direction("device_to_device") == (1, 777)
    assert counters.direction("other") == (1, 5)
    assert counters.host_to_device_bytes == 12345 and counters.device_to_host_bytes == 4196
    with pytest.raises(InvalidInput):
        counters.direction("sideways")


def test_missing_driver_library_is_reported_not_probed(libcudart):
    child = start_child(libcudart)
    try:
        with CudaCopyTracer(child.pid) as tracer:
            if find_library(child.pid, "libcuda") is None:
                assert tracer.libraries["libcuda"] == "missing"
                assert not any(name.startswith("cuMemcpy") for name in tracer.attached)
            finish(child)
    finally:
        child.kill()
        child.wait()


def test_struct_mirror_matches_the_bpf_map(libcudart):
    child = start_child(libcudart)
    try:
        with CudaCopyTracer(child.pid) as tracer:
            table = tracer._bpf[b"copy_stats"]
            assert ctypes.sizeof(table.Leaf) == ctypes.sizeof(CopyStat)
            assert [name for name, _ in table.Leaf._fields_] == [name for name, _ in CopyStat._fields_]
    finally:
        child.kill()
        child.wait()


def test_bad_pid_is_refused():
    with pytest.raises(InvalidInput, match="positive"):
        CudaCopyTracer(0)
    with pytest.raises(InvalidInput, match="no process"):
        CudaCopyTracer(2**22 + 7)
