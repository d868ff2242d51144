"""PNG charts of a trace (matplotlib, Agg backend): memory over time per session with
its tool calls and events, the LLM context per request below it, and the per-tool
peak-memory distribution over all sessions."""
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
# events on the memory axis: (label, colour, line style); policy actions by their action
EVENT_STYLES = {
    "oom_kill": ("OOM kill", "red", "-"), "freeze": ("freeze", "tab:blue", "--"), "thaw": ("thaw", "tab:green", "--"),
    "kill": ("kill", "darkred", ":"), "throttle": ("throttle", "tab:orange", "--"),
    "kv_decision": ("KV directive", "tab:purple", ":"),
}
OTHER_EVENT = ("other event", "0.4", ":")
MAX_EVENT_LINES = 400         # per chart; a reclaim storm is drawn as ticks, not lines


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

    has_llm = bool(llm["input_tokens"].notna().any())
    ratios = [3, 1 + 0.25 * len(lanes)] + ([1.6] if has_llm else [])
    fig, axes = plt.subplots(len(ratios), 1, sharex=True, figsize=(12, 6.5 + (1.8 if has_llm else 0)),
                             gridspec_kw={"height_ratios": ratios})
    mem_ax, lane_ax = axes[0], axes[1]
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
    event_handles = _draw_events(mem_ax, trace.events[trace.events["session_id"] == session_id], t0)
    mem_ax.legend([mem_ax.lines[0], *handles, *event_handles.values()],
                  ["sandbox memory", *(f"{t} call" for t in lanes), *event_handles],
                  loc="upper left", fontsize=8, ncol=min(6, len(lanes) + 1 + len(event_handles)))
    mem_ax.set_ylabel("memory (MB)")
    mem_ax.grid(alpha=0.3)
    mem_ax.set_title(f"{session_id}: memory over time, tool calls shaded, events marked")
    lane_ax.set_xlim(0, span)
    lane_ax.grid(axis="x", alpha=0.3)
    if has_llm:
        _draw_context(axes[2], llm, t0)
    axes[-1].set_xlabel("time since first observation (s)")
    fig.tight_layout()
    path = out / f"session-{_safe(session_id)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw_events(ax, events: "pd.DataFrame", t0: float) -> dict:
    """Vertical lines for OOM kills, policy actions and KV directives; reclaim stalls as
    ticks along the bottom. Returns {legend label: handle}."""
    from matplotlib.lines import Line2D

    handles: dict = {}
    stalls = events[events["kind"] == "reclaim_stall"]
    if len(stalls):
        ax.plot(stalls["time_s"] - t0, [0] * len(stalls), "|", color="tab:red", ms=10, mew=1, clip_on=False)
        handles[f"reclaim stall ({len(stalls)})"] = Line2D([], [], color="tab:red", marker="|", ls="", ms=10)
    drawn = events[events["kind"] != "reclaim_stall"].head(MAX_EVENT_LINES)
    actions = drawn[drawn["kind"] == "policy_action"].sort_values("time_s")
    frozen_since: dict = {}
    for event in actions.itertuples(index=False):     # frozen from a freeze to the next thaw
        who = event.call_id if isinstance(event.call_id, str) else None
        if event.action == "freeze":
            frozen_since.setdefault(who, float(event.time_s))
        elif event.action == "thaw" and who in frozen_since:
            ax.axvspan(frozen_since.pop(who) - t0, float(event.time_s) - t0, color="tab:blue", alpha=0.08,
                       hatch="//", lw=0)
    for event in drawn.itertuples(index=False):
        key = event.action if event.kind == "policy_action" and isinstance(event.action, str) else event.kind
        label, colour, style = EVENT_STYLES.get(key, OTHER_EVENT)
        ax.axvline(float(event.time_s) - t0, color=colour, ls=style, lw=1.3, alpha=0.9)
        handles.setdefault(label, Line2D([], [], color=colour, ls=style, lw=1.3))
    return handles


def _draw_context(ax, llm: "pd.DataFrame", t0: float) -> None:
    """Each request's context (thousands of tokens), the part read from a prompt cache
    filled where the source said; sub-agent requests as hollow points."""
    llm = llm[llm["input_tokens"].notna()].sort_values("time_s")
    x = (llm["time_s"] - t0).to_numpy(dtype="float64")
    ctx = llm["input_tokens"].to_numpy(dtype="float64") / 1000
    side = llm["is_sidechain"].fillna(False).astype(bool).to_numpy()
    ax.plot(x[~side], ctx[~side], "-o", color="tab:purple", ms=3, lw=1, label="context (main agent)")
    if side.any():
        ax.plot(x[side], ctx[side], "o", mfc="none", color="tab:purple", ms=4, label="context (sub-agent)")
    cached = llm["cache_read_tokens"]
    if cached.notna().any():
        c = cached.astype("float64").fillna(0).to_numpy() / 1000
        ax.vlines(x, 0, c, color="tab:cyan", lw=3, alpha=0.8, label="cached part (prompt cache read)")
    ax.set_ylabel("LLM context\n(k tokens)")
    ax.set_ylim(0, max(ctx.max() * 1.25, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, ncol=3)


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
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tools = _tool_order(trace.toolcalls)
    paths = [tool_peak_plot(trace, out, tools)]
    for session_id in sessions if sessions is not None else sorted(trace.sessions["session_id"]):
        paths.append(session_plot(trace, str(session_id), out, tools))
    return paths
