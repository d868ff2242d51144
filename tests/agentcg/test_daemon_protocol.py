"""agentcg.daemon_protocol: one table for both ends, and the server and client really use it."""
from __future__ import annotations

import json

import pytest

from agentcg import daemon_protocol as dp
from agentcg.errors import (
    AccessDenied, CgroupBusy, CgroupExists, CgroupGone, HostUnsupported, InvalidInput, ProcessGone, ProtocolError,
)


@pytest.mark.parametrize("exc, code", [
    (AccessDenied("x"), "forbidden"), (CgroupExists("x"), "exists"), (CgroupBusy("x"), "busy"),
    (CgroupGone("x"), "not_found"), (ProcessGone("x", 3), "not_found"), (HostUnsupported("x"), "unsupported"),
    (InvalidInput("x"), "invalid_input"), (ProtocolError("x"), "invalid_input"), (RuntimeError("x"), "internal"),
])
def test_code_for_each_exception(exc: BaseException, code: str) -> None:
    assert dp.code_for(exc) == code


def test_round_trip_server_exception_to_client_exception() -> None:
    """Whatever a server raises of the mapped classes, the client raises the same class."""
    for cls in (AccessDenied, CgroupExists, CgroupBusy, CgroupGone, HostUnsupported, InvalidInput):
        line = dp.encode_error(4, dp.code_for(cls("why")), "why")
        with pytest.raises(cls, match="why") as info:
            dp.decode_reply("op", 4, line)
        assert info.value.code == dp.code_for(cls("why"))


def test_every_code_decodes_and_unknown_is_protocol_error() -> None:
    for code in dp.ERROR_CODES:
        with pytest.raises(dp.error_for(code)):
            dp.decode_reply("op", 1, dp.encode_error(1, code, "m"))
    with pytest.raises(ProtocolError):
        dp.decode_reply("op", 1, dp.encode_error(1, "martian", "m"))


def test_reply_checks_version_id_and_shape() -> None:
    assert dp.decode_reply("op", 2, dp.encode_result(2, {"a": 1})) == {"a": 1}
    for bad in (dp.encode_result(3, {}), b"not json", json.dumps({"v": 2, "id": 2, "ok": True}).encode(),
                json.dumps({"v": 1, "id": 2, "ok": True, "result": [1]}).encode()):
        with pytest.raises(ProtocolError):
            dp.decode_reply("op", 2, bad)


def test_request_size_limit() -> None:
    assert json.loads(dp.encode_request(1, dp.Method.PING, {}))["op"] == "ping"
    with pytest.raises(InvalidInput, match="exceeds"):
        dp.encode_request(1, dp.Method.TOOLCALL_BEGIN, {"command": "x" * dp.MAX_MESSAGE_BYTES})


def test_server_and_client_use_the_shared_module() -> None:
    from agentcg import client
    from agentcg.controller.daemon import api, server

    assert server.ERROR_CODES is dp.ERROR_CODES and server.PROTOCOL_VERSION == dp.PROTOCOL_VERSION
    assert server.error_code is dp.code_for or server.error_code(CgroupBusy("x")) == "busy"
    assert client.MAX_MESSAGE_BYTES == dp.MAX_MESSAGE_BYTES
    # every operation the daemon serves has a name in the shared table
    ops = set(api.Api(None).ops)  # type: ignore[arg-type]
    assert ops <= dp.METHODS, ops - dp.METHODS
