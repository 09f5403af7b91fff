"""The model a request names, read from its serialised bytes before they are parsed.

A unary inference request is 150 KB of tensor or image bytes and a few
short fields; parsing it copies the bytes into Python objects. Which model
it is for is its field 1 (``model_name`` in ``ModelInferRequest``,
``ClassifyRequest`` and ``EmbedRequest``), and finding that field in the
protobuf wire format needs only its keys and length prefixes: a
length-delimited field is stepped over, not read. The admission uses the
name to refuse a call its own model cannot answer in time before the
message is parsed (:mod:`tlserve.server.edge.admission`).
"""

from __future__ import annotations

__all__ = ["model_name"]

_MODEL_NAME_FIELD = 1
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5
_MAX_VARINT_BYTES = 10


def model_name(raw: bytes) -> str | None:
    """Field 1 of a serialised message as text (the last one, as protobuf reads it).

    None when it is absent, not a string, or the bytes are not a well-formed
    message: the caller then treats the model as unknown, and the full parse
    says what is wrong with the bytes.
    """
    found: str | None = None
    position, end = 0, len(raw)
    while position < end:
        key, position = _varint(raw, position)
        if key is None:
            return None
        field, kind = key >> 3, key & 7
        if kind == _LENGTH_DELIMITED:
            length, position = _varint(raw, position)
            if length is None or position + length > end:
                return None
            if field == _MODEL_NAME_FIELD:
                try:
                    found = raw[position : position + length].decode("utf-8")
                except UnicodeDecodeError:
                    return None
            position += length
        elif kind == _VARINT:
            value, position = _varint(raw, position)
            if value is None:
                return None
        elif kind == _FIXED64:
            position += 8
        elif kind == _FIXED32:
            position += 4
        else:  # groups, or not protobuf at all
            return None
    return found if position == end else None


def _varint(raw: bytes, position: int) -> tuple[int | None, int]:
    """The varint at ``position`` and the position after it (None: truncated or too long)."""
    value, shift = 0, 0
    for index in range(position, min(position + _MAX_VARINT_BYTES, len(raw))):
        byte = raw[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    return None, position
