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


# A part's headers longer than this are not a form's (content-disposition and content-type).
_PART_HEAD_MAX = 16 * 1024
_FILENAME = re.compile(rb"\bfilename\*?=", re.IGNORECASE)


class FieldScanner:
    """The leading text fields of a ``multipart/form-data`` body, found as the body arrives,
    so that an upload can be sent on before it is all read.

    ``feed`` is given each piece; it says True once every field in ``names`` was seen, or
    ``model`` was and the next part is a file (or longer than any text field asked for),
    or the body ended. The OpenAI clients send their text fields first (httpx
    writes ``data`` before ``files``); a ``stream`` field after the file goes unseen. A file
    part before ``model`` is skipped while ``model`` ends within the first ``bound`` bytes
    (curl's ``-F file=@a.wav -F model=x`` order, for smaller uploads); else the answer is a
    400 that says to send ``model`` first. Each piece is scanned once: a file part's end is searched
    from where the last search stopped.
    """

    def __init__(self, boundary: bytes, names: tuple[str, ...], bound: int) -> None:
        self.delimiter = b"--" + boundary
        self.wanted = {n.encode(): n for n in names}
        self.bound = bound
        self.buf = bytearray()
        self.fields: dict[str, str] = {}
        self._pos = -1  # the start of the next part's headers; -1: the first delimiter unread
        self._search = 0  # where to resume looking for the current part's end

    def feed(self, data: bytes, last: bool) -> bool:
        """Take the next piece (``last``: the body ended); True once the fields are known.
        400 for a malformed body or a ``model`` field too far behind a file."""
        self.buf += data
        buf, delimiter = self.buf, self.delimiter
        if self._pos < 0:
            if len(buf) < len(delimiter) and not last:
                return False
            if not buf.startswith(delimiter):
                raise BadRequest("malformed multipart body: it does not start with its "
                                 "boundary")
            self._pos = len(delimiter)
        while True:
            pos = self._pos
            if buf.startswith(b"--", pos):
                return True  # the closing delimiter: every field was seen
            head_end = buf.find(b"\r\n\r\n", pos)
            if head_end < 0:
                if last or len(buf) - pos > _PART_HEAD_MAX:
                    raise BadRequest("malformed multipart body: a part's headers are not "
                                     "terminated")
                return False
            match = _NAME.search(buf, pos, head_end)
            name = self.wanted.get(match.group(1)) if match is not None else None
            found = "model" in self.fields
            if found and _FILENAME.search(buf, pos, head_end) is not None:
                return True  # a file: the rest is sent on as it is
            end = buf.find(b"\r\n" + delimiter, max(head_end + 4, self._search))
            if end < 0:
                if found and name is None and len(buf) - head_end - 4 > _FIELD_MAX:
                    return True  # no short field (a file without a name): not waited for
                if last:
                    raise BadRequest("malformed multipart body: a part is not terminated")
                if len(buf) > self.bound:
                    raise self._too_far()
                self._search = max(head_end + 4, len(buf) - len(delimiter) - 2)
                return False
            self._search = 0
            if name is not None and name not in self.fields:
                if name == "model" and end > self.bound:  # wherever the pieces were cut
                    raise self._too_far()
                self.fields[name] = _text(bytes(buf[head_end + 4:end]), name)
                if len(self.fields) == len(self.wanted):
                    return True
            self._pos = end + 2 + len(delimiter)

    def _too_far(self) -> BadRequest:
        return BadRequest(f"the `model` field must come before the file in uploads over "
                          f"{self.bound} bytes (the OpenAI clients send it first)",
                          param="model")


def _text(value: bytes, name: str) -> str:
    if len(value) > _FIELD_MAX:
        raise BadRequest(f"`{name}`: the form field is too long", param=name)
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise BadRequest(f"`{name}`: the form field is not UTF-8", param=name) from None
