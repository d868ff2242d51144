"""The socket-free control core: one policy loop for the daemon, `agentcg replay` and local
tool calls.

    core = ControlCore(tree, "agentcg", locate=Layout().locate, log=EventLog())
    core.add_pending(CallKey("sb", "tc-1"), "pytest", hint_bytes=300 << 20, now=time.monotonic())
    step = core.step(Inputs(...), now=time.monotonic())    # snapshot -> decide -> enforce
    step.admitted, step.applied

`snapshot.py` builds the one Snapshot every caller decides on; `loop.py` runs the policy
and the enforcer and remembers what was applied; `events.py` is the bounded event log
(socket method `events.since`); `thresholds.py` turns the policy's fractions of a budget
into the byte thresholds the kernel is asked to report. Nothing here opens a socket or
waits: the caller owns the clock and the I/O.
"""
from agentcg.controller.core.events import EVENT_KINDS, EventLog
from agentcg.controller.core.loop import ControlCore, Step
from agentcg.controller.core.snapshot import CallInput, Inputs, SandboxInput, build_snapshot
from agentcg.controller.core.thresholds import Thresholds, call_threshold_bytes, needs_rearm, sandbox_thresholds

__all__ = ["ControlCore", "Step", "EventLog", "EVENT_KINDS", "Inputs", "SandboxInput", "CallInput",
           "build_snapshot", "Thresholds", "call_threshold_bytes", "needs_rearm", "sandbox_thresholds"]
