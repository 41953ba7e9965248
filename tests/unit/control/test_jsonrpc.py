"""bridge.control.jsonrpc: framing, request validation, parameter schemas."""

from __future__ import annotations

import json

import pytest

from bridge.control import jsonrpc as j


def test_valid_request_and_notification():
    r = j.parse_request(b'{"jsonrpc":"2.0","method":"lu.list","id":7}')
    assert (r.method, r.params, r.id, r.notification) == ("lu.list", {}, 7, False)
    n = j.parse_request(b'{"jsonrpc":"2.0","method":"stats","params":{}}')
    assert n.notification


@pytest.mark.parametrize("line, code, words", [
    (b"{not json", j.PARSE_ERROR, "not valid JSON"),
    (b"\xff\xfe", j.PARSE_ERROR, "not valid JSON"),
    (b"[" * 100000, j.PARSE_ERROR, "not valid JSON"),
    (b'[{"jsonrpc":"2.0","method":"x","id":1}]', j.INVALID_REQUEST, "batch"),
    (b"42", j.INVALID_REQUEST, "object"),
    (b'{"method":"x","id":1}', j.INVALID_REQUEST, "jsonrpc"),
    (b'{"jsonrpc":"2.0","id":1}', j.INVALID_REQUEST, "method"),
    (b'{"jsonrpc":"2.0","method":5,"id":1}', j.INVALID_REQUEST, "method"),
    (b'{"jsonrpc":"2.0","method":"x","id":{}}', j.INVALID_REQUEST, "id"),
    (b'{"jsonrpc":"2.0","method":"x","id":true}', j.INVALID_REQUEST, "id"),
    (b'{"jsonrpc":"2.0","method":"x","params":3,"id":1}', j.INVALID_REQUEST, "params"),
    (b'{"jsonrpc":"2.0","method":"x","params":[1],"id":1}', j.INVALID_PARAMS, "by name"),
    (b'{"jsonrpc":"2.0","method":"x","id":1,"extra":1}', j.INVALID_REQUEST, "extra"),
])
def test_malformed_requests_name_the_problem(line, code, words):
    with pytest.raises(j.RpcError) as e:
        j.parse_request(line)
    assert e.value.code == code and words in e.value.message


def test_error_keeps_the_id_when_it_was_readable():
    with pytest.raises(j.RpcError) as e:
        j.parse_request(b'{"jsonrpc":"1.0","method":"x","id":"abc"}')
    assert j.error_id(e.value) == "abc"


SCHEMA = (j.param("name", str), j.param("size", int, str, required=False), j.param("force", bool, required=False))


@pytest.mark.parametrize("params, words", [
    ({}, "name: is required"),
    ({"name": 1}, "name: must be a string, not integer"),
    ({"name": "a", "size": True}, "size: must be an integer or string, not boolean"),
    ({"name": "a", "force": 1}, "force: must be a boolean, not integer"),
    ({"name": "a", "bogus": 1}, "unknown parameter 'bogus'"),
    ({"name": None}, "name: must be a string, not null"),
])
def test_params_checked_against_the_schema(params, words):
    with pytest.raises(j.RpcError) as e:
        j.check_params(params, SCHEMA)
    assert e.value.code == j.INVALID_PARAMS and words in e.value.message


def test_encoders_one_line_each():
    for line in (j.encode_result(1, {"a": "x\ny"}), j.encode_error(None, -32700, "bad"),
                 j.encode_request("lu.list", None, 3)):
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert json.loads(line)["jsonrpc"] == "2.0"
