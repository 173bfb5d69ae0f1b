"""Reading an engine's log for the operators (``GET /instances/{alias}/log``).

Only ``{STATE_DIR}/{worker}/{alias}.log`` is readable: the alias is checked against the name
pattern (no '/', no '..') and the resolved path must still lie inside STATE_DIR, so a symlink
planted there cannot point the endpoint at another file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shared.errors import BadRequest, NotFound, clip
from shared.models import is_valid_name

# One answer carries at most this much of the log: a follower catches up over several reads.
MAX_CHUNK = 256 * 1024


def log_path(state_dir: Path, worker_id: str, alias: str) -> Path:
    if not is_valid_name(alias):
        raise BadRequest(f"invalid alias '{clip(alias)}'", param="alias")
    root = state_dir.resolve()
    path = (root / worker_id / f"{alias}.log").resolve()
    if not path.is_relative_to(root):
        raise NotFound(f"no engine log for '{alias}' on this worker")
    return path


def _last_lines(data: bytes, lines: int) -> bytes:
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:]) if lines > 0 else b""


def read(path: Path, alias: str, lines: int, since: int | None) -> dict[str, Any]:
    """The last ``lines`` lines, or (with ``since``, a byte offset a previous answer gave) what
    was written after it. ``offset`` is where the next read starts; an offset past the end
    (the file was replaced) starts again from the tail."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if since is not None and 0 <= since <= size:
                f.seek(since)
                data = f.read(MAX_CHUNK)
                return {"alias": alias, "text": data.decode("utf-8", "replace"),
                        "offset": since + len(data), "size": size}
            f.seek(max(0, size - MAX_CHUNK))
            data = _last_lines(f.read(), lines)
    except FileNotFoundError:
        raise NotFound(f"no engine log for '{alias}' on this worker") from None
    return {"alias": alias, "text": data.decode("utf-8", "replace"), "offset": size,
            "size": size}
