"""The wire format of the client protocol: Pie 0.1.1's msgpack maps, checked field by field.

Every application message is one msgpack map in one binary WebSocket frame,
tagged by its "type" key (the seed's serde `tag = "type"`). Pie 0.1.1 dropped
anything it could not decode without a word; here every defect becomes a
`BadMessage` carrying the request's corr_id when one could be read, so the
protocol can answer with a `response` (or a `server_event` when it cannot).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

U32_MAX = 2**32 - 1


class BadMessage(Exception):
    """A frame that is not a valid client message; str(self) is the reason for the client."""

    def __init__(self, reason: str, corr_id: int | None = None) -> None:
        super().__init__(reason)
        self.corr_id = corr_id


def _is_u32(value: Any) -> bool:
    return type(value) is int and 0 <= value <= U32_MAX


def _is_uint(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_str(value: Any) -> bool:
    return type(value) is str


def _is_str_list(value: Any) -> bool:
    return type(value) in (list, tuple) and all(type(item) is str for item in value)


def _to_bytes(value: Any) -> bytes | None:
    """msgpack `bin`, or an array of byte values (which the seed's decoder also accepts)."""
    if type(value) is bytes:
        return value
    if type(value) in (list, tuple) and all(type(b) is int and 0 <= b <= 255 for b in value):
        return bytes(value)
    return None


# field name -> (check, description for errors); a check returns the value to use or None.
_Field = tuple[Callable[[Any], Any], str]


def _plain(check: Callable[[Any], bool]) -> Callable[[Any], Any]:
    return lambda value: value if check(value) else None


_U32: _Field = (_plain(_is_u32), "an integer in 0..4294967295")
_UINT: _Field = (_plain(_is_uint), "a non-negative integer")
_STR: _Field = (_plain(_is_str), "a string")
_STR_LIST: _Field = (lambda v: list(v) if _is_str_list(v) else None, "an array of strings")
_BIN: _Field = (_to_bytes, "binary data (msgpack bin)")

CLIENT_MESSAGES: dict[str, dict[str, _Field]] = {
    "authenticate": {"corr_id": _U32, "token": _STR},
    "query": {"corr_id": _U32, "subject": _STR, "record": _STR},
    "upload_program": {
        "corr_id": _U32,
        "program_hash": _STR,
        "chunk_index": _UINT,
        "total_chunks": _UINT,
        "chunk_data": _BIN,
    },
    "launch_instance": {"corr_id": _U32, "program_hash": _STR, "arguments": _STR_LIST},
    "launch_server_instance": {
        "corr_id": _U32,
        "port": _U32,
        "program_hash": _STR,
        "arguments": _STR_LIST,
    },
    "signal_instance": {"instance_id": _STR, "message": _STR},
    "terminate_instance": {"instance_id": _STR},
    "attach_remote_service": {
        "corr_id": _U32,
        "endpoint": _STR,
        "service_type": _STR,
        "service_name": _STR,
    },
}


def decode_client_message(payload: bytes) -> tuple[str, dict[str, Any]]:
    """Decode one binary frame into (type, fields); raise BadMessage saying what is wrong.

    Unknown extra keys are ignored, as in the seed.
    """
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise BadMessage(f"malformed msgpack: {e}") from None
    if not isinstance(message, dict):
        raise BadMessage(f"a message must be a msgpack map, got {type(message).__name__}")
    corr_id = message.get("corr_id")
    corr_id = corr_id if _is_u32(corr_id) else None
    kind = message.get("type")
    if not _is_str(kind):
        raise BadMessage("missing or non-string 'type' field", corr_id)
    schema = CLIENT_MESSAGES.get(kind)
    if schema is None:
        known = ", ".join(CLIENT_MESSAGES)
        raise BadMessage(f"unknown message type {kind!r} (known: {known})", corr_id)
    fields: dict[str, Any] = {}
    for name, (check, description) in schema.items():
        if name not in message:
            raise BadMessage(f"{kind}: missing field {name!r}", corr_id)
        value = check(message[name])
        if value is None:
            raise BadMessage(f"{kind}: field {name!r} must be {description}", corr_id)
        fields[name] = value
    return kind, fields


def encode(message: dict[str, Any]) -> bytes:
    """Encode a server->client map the way the seed's rmp-serde `to_vec_named` does."""
    return msgpack.packb(message, use_bin_type=True)


def response(corr_id: int, successful: bool, result: str) -> dict[str, Any]:
    return {"type": "response", "corr_id": corr_id, "successful": successful, "result": result}


def instance_event(instance_id: str, event: str, message: str) -> dict[str, Any]:
    return {
        "type": "instance_event",
        "instance_id": instance_id,
        "event": event,
        "message": message,
    }


def server_event(message: str) -> dict[str, Any]:
    return {"type": "server_event", "message": message}
