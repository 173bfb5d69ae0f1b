"""Downloading model weights ahead of time (``POST /admin/models/{alias}/prefetch``), and the
worker's view of the weights it has, which its heartbeat reports.

A download copies from PREFETCH_SOURCE_DIR (a local mirror, ``<dir>/<org>/<name>``) when
that is set, else uses huggingface_hub's ``snapshot_download`` into the hub cache. A mirror
copy lands in a hidden directory first and is renamed into the cache's layout at the end, so
a half-copied model is never reported or loaded. Progress and the reason of a failure go to
``svllm:{m:<alias>}:prefetch_status``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.worker import weights
from shared.models import LocalModel
from shared.store import Store

logger = logging.getLogger(__name__)

_PROGRESS_S = 0.5


class FetchError(Exception):
    """Why a download failed, in words for /admin/status."""


class Weights:
    """The latest scan of this worker's weights; re-scanned on a timer and after prefetches."""

    def __init__(self, cache: Path, roots: tuple[str, ...]) -> None:
        self.cache = cache
        self.roots = roots
        self.models: list[LocalModel] | None = None
        self.free_mb: int | None = None

    async def rescan(self) -> None:
        self.models = await asyncio.to_thread(weights.scan, self.cache, self.roots)
        self.free_mb = await asyncio.to_thread(weights.free_mb, self.cache)


def copy_from_mirror(source_dir: Path, cache: Path, repo_id: str,
                     progress: Callable[[int], None]) -> None:
    """Copy ``<source_dir>/<repo_id>`` into the hub cache as one snapshot."""
    src = source_dir / repo_id
    if not src.is_dir():
        raise FetchError(f"'{repo_id}' is not in the mirror {source_dir}")
    entry = weights.cache_entry(cache, repo_id)
    final = entry / "snapshots" / "mirror"
    if final.exists():
        return
    partial = entry / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    done = 0
    try:
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            target = partial / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            done += f.stat().st_size
            progress(done)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(final)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise FetchError(f"copying from the mirror failed: {e}") from e


def download_from_hub(cache: Path, repo_id: str) -> None:
    if importlib.util.find_spec("huggingface_hub") is None:
        raise FetchError("huggingface_hub is not installed on this worker and "
                         "PREFETCH_SOURCE_DIR is unset: nothing to download with")
    hub: Any = importlib.import_module("huggingface_hub")
    try:
        hub.snapshot_download(repo_id=repo_id, cache_dir=str(cache))
    except Exception as e:  # the hub raises many kinds; the reason is shown
        raise FetchError(f"download from the hub failed: {type(e).__name__}: {e}") from e


class Prefetcher:
    def __init__(self, store: Store, worker_id: str, weights_view: Weights,
                 source_dir: Path | None, interval_s: float) -> None:
        self.store = store
        self.worker_id = worker_id
        self.weights = weights_view
        self.source_dir = source_dir
        self.interval_s = interval_s
        self._running: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis hiccup: ask again next time
                logger.warning("reading prefetch requests failed: %s", e)
            await asyncio.sleep(self.interval_s)

    async def poll(self) -> None:
        for alias, model_name in (await self.store.prefetch_requests(self.worker_id)).items():
            task = self._running.get(alias)
            if task is None or task.done():
                self._running[alias] = asyncio.create_task(self._fetch(alias, model_name))

    async def _fetch(self, alias: str, model_name: str) -> None:
        state: dict[str, Any] = {"state": "downloading", "model_name": model_name,
                                 "done_mb": 0, "error": ""}
        await self.store.set_prefetch_status(alias, self.worker_id, state)
        logger.info("prefetching %s (%s)", model_name, alias)
        started = time.monotonic()
        work = asyncio.ensure_future(asyncio.to_thread(self._download, model_name, state))
        try:
            while not work.done():
                await asyncio.wait((work,), timeout=_PROGRESS_S)
                if not work.done():
                    await self.store.set_prefetch_status(alias, self.worker_id, state)
            work.result()
            state |= {"state": "done", "seconds": round(time.monotonic() - started, 3)}
            await self.weights.rescan()
        except FetchError as e:
            logger.warning("prefetch of %s failed: %s", model_name, e)
            state |= {"state": "failed", "error": str(e)}
        await self.store.set_prefetch_status(alias, self.worker_id, state, finished=True)

    def _download(self, model_name: str, state: dict[str, Any]) -> None:
        def progress(done: int) -> None:
            state["done_mb"] = round(done / (1 << 20), 3)

        if self.source_dir is not None:
            copy_from_mirror(self.source_dir, self.weights.cache, model_name, progress)
        else:
            download_from_hub(self.weights.cache, model_name)
