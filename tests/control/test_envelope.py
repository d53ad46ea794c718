"""envelope: every malformed request gets the right code, with its id whenever one is readable."""

from __future__ import annotations

import pytest

from onthefly.control.envelope import (
    MAX_LINE_BYTES,
    Request,
    debug_enabled,
    error_event,
    parse_request,
    reply_error,
    reply_ok,
)
from onthefly.control.errors import ErrorCode, ProtocolError


def test_max_line_bytes_is_16_mib():
    assert MAX_LINE_BYTES == 16 * 1024 * 1024


def test_well_formed_requests():
    assert parse_request('{"id":"a1","cmd":"pause","payload":{"reason":"x"}}') == Request(
        "a1", "pause", {"reason": "x"}
    )
    # The extension's fire-and-forget resume: no id, no payload.
    assert parse_request('{"cmd":"resume"}') == Request(None, "resume", {})
    assert parse_request('{"id":null,"cmd":"resume","payload":null}') == Request(None, "resume", {})
    assert parse_request('{"id":"","cmd":"resume"}').id is None
    assert parse_request('{"id":17,"cmd":"status"}').id == "17"
    assert parse_request('  {"cmd":"status","extra":1}  ').cmd == "status"


def test_int_id_is_converted_by_the_dataclass_too():
    assert Request(5, "x", {}).id == "5"
    with pytest.raises(TypeError, match="Request.id must be str, int or None, got float"):
        Request(1.5, "x", {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "line, code, request_id, fragment",
    [
        ("not json", ErrorCode.BAD_JSON, None, "line is not valid JSON"),
        ('{"id":"a","cmd":"x"', ErrorCode.BAD_JSON, None, "line is not valid JSON"),
        ('{"cmd":"x","payload":{"lr":NaN}}', ErrorCode.BAD_JSON, None, "NaN is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, ErrorCode.BAD_JSON, None, "nested too deeply"),
        ('[{"cmd":"pause"}]', ErrorCode.BAD_ENVELOPE, None, "must be a JSON object, got array"),
        ('"pause"', ErrorCode.BAD_ENVELOPE, None, "must be a JSON object, got str"),
        ("42", ErrorCode.BAD_ENVELOPE, None, "must be a JSON object, got int"),
        ('{"id":"r1","payload":{}}', ErrorCode.BAD_ENVELOPE, "r1", "request has no 'cmd'"),
        ('{"id":"r2","cmd":3}', ErrorCode.BAD_ENVELOPE, "r2", "'cmd' must be a non-empty string, got int"),
        ('{"id":"r3","cmd":""}', ErrorCode.BAD_ENVELOPE, "r3", "got ''"),
        ('{"id":"r4","cmd":"   "}', ErrorCode.BAD_ENVELOPE, "r4", "non-empty string"),
        ('{"id":9,"cmd":"fork","payload":[1]}', ErrorCode.BAD_ENVELOPE, "9", "'payload' of 'fork' must be an object or null, got array"),
        ('{"id":"r5","cmd":"fork","payload":"x"}', ErrorCode.BAD_ENVELOPE, "r5", "got str"),
        ('{"id":1.5,"cmd":"x"}', ErrorCode.BAD_ENVELOPE, None, "'id' must be a string or an integer, got float"),
        ('{"id":true,"cmd":"x"}', ErrorCode.BAD_ENVELOPE, None, "got bool"),
        ('{"id":["a"],"cmd":"x"}', ErrorCode.BAD_ENVELOPE, None, "got array"),
    ],
)
def test_bad_requests_get_the_right_code_and_id(line, code, request_id, fragment):
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == code
    assert info.value.request_id == request_id
    assert fragment in info.value.message


def test_bad_json_message_quotes_a_bounded_preview():
    with pytest.raises(ProtocolError) as info:
        parse_request("x" * 10_000)
    assert info.value.message.endswith("...'")
    assert len(info.value.message) < 200


def test_reply_shapes():
    assert reply_ok("a", {"x": 1}) == {"id": "a", "ok": True, "data": {"x": 1}}
    assert reply_ok("a", []) == {"id": "a", "ok": True, "data": []}
    assert reply_error("a", "busy", "queue full") == {"id": "a", "ok": False, "error": "queue full", "code": "busy"}
    assert reply_error("a", "failed", "boom", "Traceback ...")["detail"] == "Traceback ..."
    assert error_event("bad_json", "not json") == {"text": "not json", "code": "bad_json"}
    with pytest.raises(ValueError, match="unknown error code 'oops'"):
        reply_error("a", "oops", "x")
    with pytest.raises(ValueError, match="unknown error code 'nope'"):
        error_event("nope", "x")


def test_debug_enabled_follows_the_environment(monkeypatch):
    monkeypatch.delenv("ONTHEFLY_DEBUG", raising=False)
    assert debug_enabled() is False
    monkeypatch.setenv("ONTHEFLY_DEBUG", "1")
    assert debug_enabled() is True
    monkeypatch.setenv("ONTHEFLY_DEBUG", "0")
    assert debug_enabled() is False
