"""Audio uploads through the pool: what relaying them as they arrive costs the router and the
worker, in memory (peak RSS, /proc VmHWM) and CPU time (/proc utime+stime), per upload size.

``python -m bench.audio_upload [--sizes-mb 1,8,30]`` (``MAX_BODY_BYTES`` from the shell is
passed to the pool): a real pool (redis, manager, worker,
router, one simulated engine), each size uploaded three times with a declared length, as the
OpenAI client sends it. A body read whole would raise the router's and the worker's peak RSS
by at least its size; streamed, the rise stays near the first MAX_BODY_BYTES the router keeps
for a retry (8 MiB by default), whatever the size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import httpx

from bench.pool import Pool, register_models, start_pool
from bench.procset import Children

BOUNDARY = "benchboundary"
_TICKS = os.sysconf("SC_CLK_TCK")


def _wav(size: int) -> bytes:
    """A mono 16-bit 16 kHz WAV of about ``size`` bytes."""
    frames = max(0, size - 44) // 2
    data = b"\x00\x01" * frames
    return (b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVEfmt " +
            (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") +
            (16000).to_bytes(4, "little") + (32000).to_bytes(4, "little") +
            (2).to_bytes(2, "little") + (16).to_bytes(2, "little") + b"data" +
            len(data).to_bytes(4, "little") + data)


def _form(model: str, audio: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\ncontent-disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            f'--{BOUNDARY}\r\ncontent-disposition: form-data; name="file"; '
            f'filename="a.wav"\r\ncontent-type: audio/wav\r\n\r\n').encode() + audio + \
        f"\r\n--{BOUNDARY}--\r\n".encode()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def measure(pool: Pool, sizes_mb: list[float], repeat: int = 3) -> list[str]:
    router = pool.urls["router"]
    rows = ["| upload | router peak RSS (MB, before -> after) | worker peak RSS | "
            "router CPU ms / upload | worker CPU ms / upload |", "|---|---|---|---|---|"]
    for mb in sizes_mb:
        body = _form("sim0", _wav(int(mb * 1024 * 1024)))
        before = {s: (_peak_rss_mb(pool.pids[s]), _cpu_s(pool.pids[s]))
                  for s in ("router", "worker")}
        for _ in range(repeat):
            r = httpx.post(f"{router}/v1/audio/transcriptions", content=body, timeout=120,
                           headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
            r.raise_for_status()
            assert r.json().get("bytes_received", len(body)) == len(body), r.text
        after = {s: (_peak_rss_mb(pool.pids[s]), _cpu_s(pool.pids[s]))
                 for s in ("router", "worker")}
        cells = [f"{before[s][0]:.0f} -> {after[s][0]:.0f}" for s in ("router", "worker")]
        cpu = [f"{(after[s][1] - before[s][1]) * 1000 / repeat:.0f}"
               for s in ("router", "worker")]
        rows.append(f"| {len(body) / 1e6:.1f} MB | {cells[0]} | {cells[1]} | {cpu[0]} | "
                    f"{cpu[1]} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="1,8,30")
    args = parser.parse_args()
    sizes = [float(x) for x in args.sizes_mb.split(",")]
    run_dir = Path(tempfile.mkdtemp(prefix="bench-audio-"))
    children = Children(run_dir)
    try:
        # MAX_BODY_BYTES from the shell passes through: the A/B against a version that read
        # uploads whole (bounded by it) needs it raised there.
        env = {"MAX_AUDIO_BYTES": str(64 * 1024 * 1024),
               **{k: os.environ[k] for k in ("MAX_BODY_BYTES",) if k in os.environ}}
        pool = start_pool(children, run_dir, env)
        register_models(pool)
        print("\n".join(measure(pool, sizes)))
    finally:
        children.stop_all()


if __name__ == "__main__":
    main()
