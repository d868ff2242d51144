"""`agentcg gpu bench` on a small size: the report's shape, integrity and clean-up (no
speed assertions here: bench/bench_gpu.py prints the figures beside their ceilings)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from agentcg.cli import main
from agentcg.gpu.bench import format_result, run_bench

REPO = Path(__file__).resolve().parents[2]


def test_bench_runs_small_and_cleans_up(capsys):
    with tempfile.TemporaryDirectory(prefix="agentcg-test-bench-", dir=REPO) as d:
        result = run_bench(d, block_sizes=(64 * 1024,), total_bytes=4 * 2**20, repeats=3)
        assert list(Path(d).iterdir()) == []
        assert result.integrity_ok and result.device_kind in ("cpu", "cuda")
        assert [r.op for r in result.rows] == ["swap_out", "swap_in", "offload", "load"] * 2
        assert [r.layout for r in result.rows] == ["contiguous"] * 4 + ["scattered"] * 4
        assert all(r.bytes == 4 * 2**20 and r.ratio > 0 for r in result.rows)
        # each row: one ratio per repetition (store move against its own ceiling run), median reported
        assert all(len(r.ratios) == 3 and r.spread[0] <= r.ratio <= r.spread[1] for r in result.rows)
        assert [r.target_ratio for r in result.rows] == [0.9, 0.9, 0.8, 0.8] + [0.8] * 4
        assert "memcpy loop" in result.rows[0].ceiling or result.device_kind == "cuda"
        assert "fio-like" in result.rows[2].ceiling
        text = format_result(result)
        assert "ceiling" in text and "memory" in text and "disk" in text and "spread" in text
        out = Path(d) / "report.txt"
        assert main(["gpu", "bench", "--ssd-dir", d, "--block-sizes", "16K", "--total", "1M",
                     "--repeats", "1", "--no-kernel-view", "--output", str(out)]) == 0
        assert "swap_out" in out.read_text()
        assert "swap_out" in capsys.readouterr().out


def test_bench_refuses_bad_sizes(capsys):
    assert main(["gpu", "bench", "--block-sizes", "12x"]) == 2
    assert "--block-sizes" in capsys.readouterr().err


def test_kernel_view_sees_the_store_bytes():
    """Real BPF block-I/O program on the real kernel, the store in a throw-away v2 cgroup."""
    import pytest

    from agentcg.errors import AgentcgError
    from agentcg.gpu.kernel_view import measure

    with tempfile.TemporaryDirectory(prefix="agentcg-test-kview-", dir=REPO) as d:
        try:
            view = measure(d, 8 * 2**20)
        except (AgentcgError, ImportError) as exc:
            pytest.skip(f"BPF block monitor unavailable here: {exc}")
    assert view.store_write_bytes == view.store_read_bytes == 8 * 2**20
    assert view.kernel_write_bytes >= view.store_write_bytes
    assert view.kernel_read_bytes >= view.store_read_bytes
    if view.io_mode == "o_direct":  # issued by the child itself: nothing escapes the cgroup
        assert view.kernel_write_bytes < view.store_write_bytes + 2**20
    assert view.cgroup_path.startswith(str(Path("/sys/fs/cgroup"))) and not Path(view.cgroup_path).exists()
