"""Mark tool calls from inside an agent framework: each call runs in its own cgroup and
ends with a `ToolCallRecord`.

    from agentcg.client import tool_call, run_tool

    result = run_tool("sb1", ["pytest", "-x"], tool="pytest")    # -> CallResult
    print(result.returncode, result.record.peak_memory_bytes)

    with tool_call("sb1", tool="build", command="make -j2") as call:
        proc = call.spawn(["make", "-j2"])
        proc.wait()
    print(call.record.cpu_s)

`Client(mode="auto")` talks to the agentcg daemon when its socket exists ($AGENTCG_SOCKET,
else /run/agentcg/agentcg.sock) and drives the cgroups in this process otherwise (root);
a daemon that restarts while a command runs is waited for, so the command's status is
never lost (docs/toolcalls.md). The implementation lives in `agentcg.controller.client`;
this module is the public import path and the one place outside the parts that imports
`controller` for it (tests/test_layout.py allows exactly that).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Sequence

from agentcg.controller.client import MAX_MESSAGE_BYTES, Call, CallResult, Client, socket_path, spawn_into

__all__ = ["Call", "CallResult", "Client", "MAX_MESSAGE_BYTES", "default_client", "run_tool", "socket_path",
           "spawn_into", "tool_call"]

_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def tool_call(sandbox: str, tool: str | None = None, command: Sequence[str] | str | None = None, *,
              mem_hint_bytes: int | None = None, priority: str = "normal") -> contextlib.AbstractContextManager[Call]:
    """Context manager over the default client: `with tool_call("sb1", "pytest") as call: call.spawn([...])`."""
    return default_client().tool_call(sandbox, tool, command, mem_hint_bytes=mem_hint_bytes, priority=priority)


def run_tool(sandbox: str, argv: Sequence[str], **kwargs: Any) -> CallResult:
    """Run argv as one tool call with the default client; see `Client.run`."""
    return default_client().run(sandbox, argv, **kwargs)
