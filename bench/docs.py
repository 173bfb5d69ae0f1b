"""Keeping docs/performance.md's generated parts current.

Each generated block sits between ``<!-- bench:NAME begin -->`` and ``<!-- bench:NAME end -->``
markers; everything outside them (the prose, the cold-start section) is left as written.
"""

from __future__ import annotations

from pathlib import Path

from bench.procset import ROOT

DOC = ROOT / "docs" / "performance.md"


def replace_block(name: str, content: str, doc: Path = DOC) -> None:
    begin, end = f"<!-- bench:{name} begin -->", f"<!-- bench:{name} end -->"
    text = doc.read_text()
    block = f"{begin}\n{content.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
