"""Reading one text field out of a ``multipart/form-data`` body, which is forwarded untouched.

The router needs only the ``model`` field of an audio upload; the body it scans is already
bounded by the body limit, and the scan copies nothing but the field asked for (the file parts
are skipped by offset, never parsed).
"""

from __future__ import annotations

import re

from shared.errors import BadRequest

_BOUNDARY = re.compile(rb'boundary="?([^";]{1,70})"?', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)
# A text field's value is short (a model alias); a longer one is not what we look for.
_FIELD_MAX = 1024


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; 400 for any other type."""
    raw = content_type.encode("latin-1", "replace")
    if not raw.lower().startswith(b"multipart/form-data"):
        raise BadRequest("this path takes a multipart/form-data body (an audio file and a "
                         "`model` field)")
    match = _BOUNDARY.search(raw)
    if match is None:
        raise BadRequest("multipart/form-data body without a boundary")
    return match.group(1)


def form_field(body: bytes, boundary: bytes, name: str) -> str | None:
    """The value of the text field ``name`` (None when absent); 400 for a malformed body."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        raise BadRequest("malformed multipart body: it does not start with its boundary")
    want = name.encode()
    pos = len(delimiter)
    while True:
        if body.startswith(b"--", pos):
            return None  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", pos)
        end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
        if end < 0:
            raise BadRequest("malformed multipart body: a part is not terminated")
        match = _NAME.search(body, pos, head_end)
        if match is not None and match.group(1) == want:
            if end - head_end - 4 > _FIELD_MAX:
                raise BadRequest(f"`{name}`: the form field is too long", param=name)
            try:
                return body[head_end + 4:end].decode()
            except UnicodeDecodeError:
                raise BadRequest(f"`{name}`: the form field is not UTF-8", param=name) from None
        pos = end + 2 + len(delimiter)
