"""How long `agentcg report` takes on the whole AgentCgroup import (target: under 10 s),
with the import of the same dataset, measured in the same run, beside it as the baseline.

    .venv/bin/python bench/bench_report.py [DATASET_DIR] [--plots]
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: list[str]) -> int:
    from agentcg.profiler.importers.agentcgroup import default_dataset_dir, import_agentcgroup
    from agentcg.profiler.report import build_report, render_json, render_text
    from agentcg.profiler.trace import read_trace, write_trace

    args = [a for a in argv if not a.startswith("--")]
    dataset = Path(args[0]) if args else default_dataset_dir()
    if not dataset.is_dir():
        print(f"dataset not found at {dataset} (set AGENTCG_DATASETS)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="agentcg-bench-") as tmp:
        result, import_s = timed(lambda: import_agentcgroup(dataset))
        _, write_s = timed(lambda: write_trace(result.trace, Path(tmp) / "trace"))

        def report():
            report = build_report(read_trace(Path(tmp) / "trace"))
            render_text(report), render_json(report)
            return report

        rep, report_s = timed(report)
        print(f"dataset: {result.tasks} tasks, {result.tool_calls} tool calls, {result.llm_requests} LLM "
              f"requests, {result.samples} samples, {len(result.skipped)} skipped")
        print(f"baseline  import (JSON -> trace in memory):          {import_s:6.2f} s")
        print(f"          write trace (Parquet):                     {write_s:6.2f} s")
        print(f"result    report (read trace + stats + text + JSON): {report_s:6.2f} s   "
              f"target < 10 s: {'met' if report_s < 10 else 'NOT met'}   report/import = {report_s / import_s:.2f}")
        if "--plots" in argv:
            from agentcg.profiler.plots import write_plots

            trace = read_trace(Path(tmp) / "trace")
            paths, plots_s = timed(lambda: write_plots(trace, Path(tmp) / "plots"))
            print(f"          plots: {len(paths)} PNGs in {plots_s:.2f} s ({plots_s / len(paths):.2f} s each)")
        pydicom = next((s for s in rep.sessions if s.session_id == "pydicom__pydicom-2065"), None)
        if pydicom is not None and pydicom.memory is not None:
            print(f"check     pydicom__pydicom-2065 peak-to-mean: {pydicom.memory.peak_to_mean:.2f}")
    return 0 if report_s < 10 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
