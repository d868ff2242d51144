"""PNG charts of a trace (matplotlib, Agg backend): memory over time per session with
its tool calls, and the per-tool peak-memory distribution over all sessions."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from agentcg.profiler.trace import Trace

MB = 1000**2
MIN_BAR_FRACTION = 0.003      # calls shorter than this share of the x range still show
TOP_TOOLS = 10                # tab10 colours; more tools share one grey lane, as "other"
# fixed colours for the common tools, so every chart of every trace agrees
COMMON_TOOLS = ("Bash", "Read", "Edit", "Grep", "TodoWrite", "Glob", "Write", "WebFetch")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120]


def _tool_order(calls: "pd.DataFrame") -> list[str]:
    others = [str(t) for t in calls["tool"].value_counts().index if t not in COMMON_TOOLS]
    return (list(COMMON_TOOLS) + others)[:TOP_TOOLS]


def session_plot(trace: "Trace", session_id: str, out: Path, tools: list[str]) -> Path:
    """Memory (MB) over time since the first observation, tool calls shaded above it
    and drawn per tool in a lane below it, LLM requests as ticks."""
    plt = _pyplot()
    session = trace.sessions.loc[trace.sessions["session_id"] == session_id].iloc[0]
    t0, span = float(session.start_s), max(float(session.end_s - session.start_s), 1.0)
    samples = trace.samples[(trace.samples["session_id"] == session_id) & (trace.samples["scope"] == "sandbox")]
    samples = samples[samples["memory_bytes"].notna()].sort_values("time_s")
    calls = trace.toolcalls[trace.toolcalls["session_id"] == session_id]
    llm = trace.llm_requests[trace.llm_requests["session_id"] == session_id]
    colours = {tool: plt.get_cmap("tab10")(i) for i, tool in enumerate(tools)}
    other = (0.55, 0.55, 0.55, 1.0)
    lanes = [t for t in tools if t in set(calls["tool"])] + (["other"] if set(calls["tool"]) - set(tools) else [])

    fig, (mem_ax, lane_ax) = plt.subplots(
        2, 1, sharex=True, figsize=(12, 6.5), gridspec_kw={"height_ratios": [3, 1 + 0.25 * len(lanes)]})
    min_w = span * MIN_BAR_FRACTION
    for call in calls.itertuples(index=False):
        start = float(call.start_wall_s) - t0
        width = max(float(call.end_wall_s if call.end_wall_s == call.end_wall_s else session.end_s) - t0 - start, min_w)
        colour = colours.get(call.tool, other)
        mem_ax.axvspan(start, start + width, color=colour, alpha=0.18, lw=0)
        lane = lanes.index(call.tool if call.tool in colours else "other")
        lane_ax.broken_barh([(start, width)], (lane - 0.4, 0.8), color=colour)
    mem_ax.plot(samples["time_s"] - t0, samples["memory_bytes"].astype("float64") / MB, color="black", lw=1.2,
                label="sandbox memory")
    if len(samples):
        peak = samples.loc[samples["memory_bytes"].astype("float64").idxmax()]
        peak_mb = float(peak.memory_bytes) / MB
        mem_ax.annotate(f"peak {peak_mb:,.0f} MB", (float(peak.time_s) - t0, peak_mb),
                        textcoords="offset points", xytext=(8, 6), fontsize=9,
                        bbox={"boxstyle": "round", "fc": "white", "ec": "0.6", "alpha": 0.9})
        mem_ax.set_ylim(0, peak_mb * 1.3)   # room for the legend above the curve
    if len(llm):
        lane_ax.plot(llm["time_s"] - t0, [len(lanes)] * len(llm), "|", color="tab:purple", ms=9)
    lane_ax.set_yticks(range(len(lanes) + (1 if len(llm) else 0)),
                       lanes + (["LLM request"] if len(llm) else []))
    lane_ax.set_ylim(-0.7, len(lanes) + (0.7 if len(llm) else -0.3))
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours.get(t, other), alpha=0.5) for t in lanes]
    mem_ax.legend([mem_ax.lines[0], *handles], ["sandbox memory", *(f"{t} call" for t in lanes)],
                  loc="upper left", fontsize=8, ncol=min(5, len(lanes) + 1))
    mem_ax.set_ylabel("memory (MB)")
    mem_ax.grid(alpha=0.3)
    mem_ax.set_title(f"{session_id}: memory over time, tool calls shaded")
    lane_ax.set_xlabel("time since first observation (s)")
    lane_ax.set_xlim(0, span)
    lane_ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out / f"session-{_safe(session_id)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tool_peak_plot(trace: "Trace", out: Path, tools: list[str]) -> Path:
    """Box plot with the points: peak memory of each tool call, per tool."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator

    plt = _pyplot()
    calls = trace.toolcalls[trace.toolcalls["peak_memory_bytes"].notna()]
    data = [(t, calls.loc[calls["tool"] == t, "peak_memory_bytes"].to_numpy(dtype="float64") / MB) for t in tools]
    data = [(t, v) for t, v in data if len(v)]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    if data:
        ax.boxplot([v for _, v in data], showfliers=False, widths=0.5, medianprops={"color": "black"})
        rng = np.random.default_rng(0)
        for i, (tool, values) in enumerate(data, start=1):
            ax.plot(i + rng.uniform(-0.18, 0.18, len(values)), values, ".", alpha=0.35, ms=4,
                    color=plt.get_cmap("tab10")(tools.index(tool)))
        ax.set_xticks(range(1, len(data) + 1), [f"{t}\n(n={len(v)})" for t, v in data])
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("peak memory during the call (MB, log scale)")
    ax.set_xlabel("tool (n = calls with a memory sample inside them)")
    ax.set_title("Peak memory per tool call")
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    path = out / "tools-peak-memory.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(trace: "Trace", directory: str | Path, sessions: list[str] | None = None) -> list[Path]:
    """Write the per-tool chart and one chart per session (all, or those named)."""
    from agentcg.errors import InvalidInput

    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tools = _tool_order(trace.toolcalls)
        paths = [tool_peak_plot(trace, out, tools)]
        for session_id in sessions if sessions is not None else sorted(trace.sessions["session_id"]):
            paths.append(session_plot(trace, str(session_id), out, tools))
    except OSError as exc:
        raise InvalidInput(f"--plots {directory}: cannot write charts there ({exc.strerror or exc}); "
                           "give a directory this user may create or write") from None
    return paths
