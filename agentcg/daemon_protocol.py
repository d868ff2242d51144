"""The daemon protocol's constants, in one place for the server and every client.

docs/daemon-protocol.md is the prose; this module is what both ends import, so a method
name, an error code or a limit cannot drift between them:

- `Method`: the operation names (`Method.TOOLCALL_BEGIN == "toolcall.begin"`), `METHODS`;
- `ErrorCode` and `ERRORS`: one table, code <-> agentcg exception. The server turns an
  exception into a code with `code_for(exc)` (the first row whose class matches, so the
  specific rows come first); a client turns a code back with `error_for(code)`;
- framing: `PROTOCOL_VERSION`, `MAX_MESSAGE_BYTES`, `MAX_OUTPUT_BYTES`, timeouts;
- `encode_request`, `encode_result`, `encode_error`: the three kinds of line.

It imports only `agentcg.errors`, so every part may import it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agentcg.errors import (
    AccessDenied, AgentcgError, CgroupBusy, CgroupExists, CgroupGone, HostUnsupported, InvalidInput,
    ProcessGone, ProtocolError,
)

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = Path("/run/agentcg/agentcg.sock")
SOCKET_ENV = "AGENTCG_SOCKET"

# ---- framing and limits ----------------------------------------------------------------
MAX_MESSAGE_BYTES = 64 * 1024          # one request or reply line, without its "\n"
MAX_OUTPUT_BYTES = 4 * 1024 * 1024     # the server drops a client that lets this much pile up
LINE_TIMEOUT_S = 10.0                  # default: a started line must be finished within this
IDLE_TIMEOUT_S = 300.0                 # default: an idle connection is closed after this
MAX_CONNECTIONS = 256                  # default [protocol] max_connections
MAX_GRACE_S = 3600.0                   # the longest grace period toolcall.begin accepts
REQUEST_TIMEOUT_S = 60.0               # a client's wait for an ordinary answer
END_TIMEOUT_S = MAX_GRACE_S + 60.0     # toolcall.end waits out the call's grace period


class Method:
    """Operation names: the `op` of a request."""

    PING = "ping"
    STATE = "state"
    SANDBOX_CREATE = "sandbox.create"
    SANDBOX_REMOVE = "sandbox.remove"
    SANDBOX_UPDATE = "sandbox.update"
    SANDBOX_LIST = "sandbox.list"
    SANDBOX_GET = "sandbox.get"
    SANDBOX_EXEC_BEGIN = "sandbox.exec_begin"   # the daemon watches an agent's execs
    SANDBOX_EXEC_END = "sandbox.exec_end"
    TOOLCALL_BEGIN = "toolcall.begin"
    TOOLCALL_ATTACH = "toolcall.attach"
    TOOLCALL_END = "toolcall.end"
    POLICY_GET = "policy.get"
    POLICY_SET = "policy.set"
    EVENTS_SINCE = "events.since"
    ENGINE_ATTACH = "engine.attach"


METHODS = frozenset(v for k, v in vars(Method).items() if k.isupper())


class ErrorCode:
    INVALID_INPUT = "invalid_input"   # malformed JSON, unknown op, ill-typed argument
    NOT_FOUND = "not_found"           # unknown sandbox, call or process
    FORBIDDEN = "forbidden"           # the peer may not do this (the "denied" of CONTRACTS.md)
    EXISTS = "exists"
    TOO_LARGE = "too_large"           # a line over MAX_MESSAGE_BYTES
    BUSY = "busy"                     # too many connections, sandboxes or calls; a cgroup not emptied
    TIMEOUT = "timeout"               # a line not finished within line_timeout_s
    UNSUPPORTED = "unsupported"       # the host lacks the feature
    INTERNAL = "internal"             # a daemon bug: the message says what failed


# code -> the exception a client raises; read top-down by `code_for`, so a subclass's row
# comes before its base's (AccessDenied and CgroupBusy are CgroupErrors, CgroupExists too)
ERRORS: tuple[tuple[str, type[AgentcgError]], ...] = (
    (ErrorCode.FORBIDDEN, AccessDenied),
    (ErrorCode.EXISTS, CgroupExists),
    (ErrorCode.BUSY, CgroupBusy),
    (ErrorCode.NOT_FOUND, CgroupGone),
    (ErrorCode.UNSUPPORTED, HostUnsupported),
    (ErrorCode.INVALID_INPUT, InvalidInput),
    (ErrorCode.TOO_LARGE, ProtocolError),
    (ErrorCode.TIMEOUT, ProtocolError),
    (ErrorCode.INTERNAL, ProtocolError),
)
ERROR_CODES = tuple(code for code, _ in ERRORS)
# exceptions that map to a code without being that code's client-side class
_ALSO = ((ProcessGone, ErrorCode.NOT_FOUND), (ProtocolError, ErrorCode.INVALID_INPUT))


def code_for(exc: BaseException) -> str:
    """The error code the server answers for `exc` (an `ApiError`-like `.code` wins)."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in ERROR_CODES:
        return code
    for code, cls in ERRORS[:6]:   # the rows whose class is specific to the code
        if isinstance(exc, cls):
            return code
    for cls, code in _ALSO:
        if isinstance(exc, cls):
            return code
    return ErrorCode.INTERNAL


def error_for(code: str) -> type[AgentcgError]:
    """The exception class a client raises for a refusal with `code` (unknown: ProtocolError)."""
    return next((cls for c, cls in ERRORS if c == code), ProtocolError)


# ---- lines -----------------------------------------------------------------------------
def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def encode_request(request_id: int, op: str, args: dict[str, Any]) -> bytes:
    line = _line({"v": PROTOCOL_VERSION, "id": request_id, "op": op, "args": args})
    if len(line) - 1 > MAX_MESSAGE_BYTES:
        raise InvalidInput(f"{op}: request of {len(line) - 1} bytes exceeds the protocol's {MAX_MESSAGE_BYTES}; "
                           "shorten the command or arguments")
    return line


def encode_result(request_id: int | None, result: dict[str, Any]) -> bytes:
    return _line({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result})


def encode_error(request_id: int | None, code: str, message: str) -> bytes:
    return _line({"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}})


def decode_reply(op: str, request_id: int, line: bytes) -> dict[str, Any]:
    """A reply line -> its result object, or the mapped agentcg error for a refusal."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{op}: the daemon sent invalid JSON ({exc})") from None
    if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION or message.get("id") != request_id:
        raise ProtocolError(f"{op}: unexpected reply {line[:200]!r} (want v={PROTOCOL_VERSION}, id={request_id})")
    if message.get("ok") is True:
        result = message.get("result", {})
        if not isinstance(result, dict):
            raise ProtocolError(f"{op}: the daemon's result is not an object: {result!r}")
        return result
    error = message.get("error") if isinstance(message.get("error"), dict) else {}
    code, text = str(error.get("code", ErrorCode.INTERNAL)), str(error.get("message", "no message"))
    exc = error_for(code)(f"daemon refused {op} ({code}): {text}")
    exc.code = code  # type: ignore[attr-defined]
    raise exc
