"""JSON-RPC 2.0 framing and validation, sans-I/O (https://www.jsonrpc.org/specification).

Framing on the control socket: newline-delimited JSON, one request object per line,
one response object per line (UTF-8). Batches (arrays) are not supported and get
-32600. A request without ``id`` is a notification: it runs, nothing is answered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Server-defined codes (-32000..-32099 are reserved for implementations):
REFUSED = -32000  # the operation is not allowed in the current state (LU mapped, shrink, ...)
NOT_FOUND = -32001  # no such LU, LUN, attachment, initiator
FAILED = -32002  # the operation was attempted and failed (an OS error)
TOO_MANY_CLIENTS = -32003

ERROR_NAMES = {
    PARSE_ERROR: "parse error",
    INVALID_REQUEST: "invalid request",
    METHOD_NOT_FOUND: "method not found",
    INVALID_PARAMS: "invalid params",
    INTERNAL_ERROR: "internal error",
    REFUSED: "refused",
    NOT_FOUND: "not found",
    FAILED: "failed",
    TOO_MANY_CLIENTS: "too many clients",
}


class RpcError(Exception):
    """An error answer: ``code`` and a message that names the problem."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Param:
    """One named parameter: its JSON type(s), whether it is required, what it means."""

    name: str
    types: tuple[type, ...]
    required: bool = True
    help: str = ""

    def type_names(self) -> str:
        return " or ".join(_JSON_TYPE_NAMES[t] for t in self.types)


_JSON_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", dict: "object",
                    list: "array", float: "number", type(None): "null"}


def param(name: str, *types: type, required: bool = True, help: str = "") -> Param:
    return Param(name, types, required, help)


@dataclass(frozen=True)
class Request:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    id: Any = None
    notification: bool = False


def parse_request(line: bytes) -> Request:
    """One line -> Request, or RpcError (-32700 / -32600) naming the problem. The id of a
    request that is invalid after its id was read is kept in ``RpcError.args[1]``."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise RpcError(PARSE_ERROR, f"not valid JSON: {e}") from None
    if isinstance(obj, list):
        raise RpcError(INVALID_REQUEST, "batch requests are not supported: send one object per line")
    if not isinstance(obj, dict):
        raise RpcError(INVALID_REQUEST, "a request must be a JSON object")
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int | float)):
        raise RpcError(INVALID_REQUEST, "id must be a string, a number or null")
    if obj.get("jsonrpc") != "2.0":
        raise _with_id(RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"'), rid)
    method = obj.get("method")
    if not isinstance(method, str):
        raise _with_id(RpcError(INVALID_REQUEST, "method must be a string"), rid)
    params = obj.get("params", {})
    if params is None:
        params = {}
    if isinstance(params, list):
        if params:
            raise _with_id(RpcError(INVALID_PARAMS, "params must be an object (by name), not an array"), rid)
        params = {}
    if not isinstance(params, dict):
        raise _with_id(RpcError(INVALID_REQUEST, "params must be an object"), rid)
    unknown = set(obj) - {"jsonrpc", "method", "params", "id"}
    if unknown:
        raise _with_id(RpcError(INVALID_REQUEST, f"unknown member {sorted(unknown)[0]!r}"), rid)
    return Request(method, params, rid, "id" not in obj)


def _with_id(e: RpcError, rid: Any) -> RpcError:
    e.id = rid  # type: ignore[attr-defined]
    return e


def error_id(e: RpcError) -> Any:
    return getattr(e, "id", None)


def check_params(params: dict[str, Any], schema: tuple[Param, ...]) -> dict[str, Any]:
    """Every required parameter present, none unknown, each of its declared JSON type."""
    known = {p.name: p for p in schema}
    for name in params:
        if name not in known:
            expected = ", ".join(known) or "none"
            raise RpcError(INVALID_PARAMS, f"unknown parameter {name!r} (parameters: {expected})")
    for p in schema:
        if p.name not in params:
            if p.required:
                raise RpcError(INVALID_PARAMS, f"{p.name}: is required ({p.type_names()})")
            continue
        value = params[p.name]
        ok = any(
            (value is None) if t is type(None)
            else isinstance(value, t) and not (isinstance(value, bool) and t is not bool)
            for t in p.types
        )
        if not ok:
            raise RpcError(INVALID_PARAMS, f"{p.name}: must be {_article(p.type_names())}, "
                                           f"not {_json_kind(value)}")
    return params


def _article(names: str) -> str:
    return ("an " if names[0] in "aeiou" else "a ") + names


def _json_kind(value: Any) -> str:
    for t, name in _JSON_TYPE_NAMES.items():
        if isinstance(value, t) and not (isinstance(value, bool) and t is int):
            return name
    return type(value).__name__


def encode_result(rid: Any, result: Any) -> bytes:
    return _line({"jsonrpc": "2.0", "id": rid, "result": result})


def encode_error(rid: Any, code: int, message: str) -> bytes:
    return _line({"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}})


def encode_request(method: str, params: dict[str, Any] | None, rid: Any) -> bytes:
    obj: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
    if params:
        obj["params"] = params
    return _line(obj)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
