"""Raw-socket HTTP for edge tests: what a hostile client sends, byte by byte, and whether the
server closed the connection afterwards (which httpx would hide)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import orjson


@dataclass
class Reply:
    raw: bytes
    closed: bool  # the server ended the connection (EOF or reset) after answering

    @property
    def status(self) -> int:
        line = self.raw.split(b"\r\n", 1)[0]
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0

    @property
    def head(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[0].lower()

    def error(self) -> dict[str, object]:
        body = self.raw.split(b"\r\n\r\n", 1)[1]
        err = orjson.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        return dict(err)


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_reply(s: socket.socket, timeout: float) -> Reply:
    """Everything the server sends until it closes, or ``timeout`` passes with it open."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return Reply(data, closed=False)
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            return Reply(data, closed=False)
        except ConnectionResetError:
            return Reply(data, closed=True)
        if not chunk:
            return Reply(data, closed=True)
        data += chunk


def send_all(s: socket.socket, data: bytes) -> bool:
    """Send ``data``; False when the server cut the connection first."""
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def exchange(port: int, data: bytes, timeout: float = 10.0) -> Reply:
    with connect(port) as s:
        send_all(s, data)
        return read_reply(s, timeout)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        lines = f.readlines()
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
