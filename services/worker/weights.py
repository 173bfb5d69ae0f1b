"""Which model weights this worker has on its disks, for placement that follows the weights.

Two places are looked at: the Hugging Face hub cache (``models--org--name`` directories with
at least one snapshot; reported as ``org/name``) and the directories under MODEL_ROOTS
(reported as their absolute paths, which is how a spec names a local model). Sizes count
each file once (the cache's snapshots are symlinks into its blobs). A scan walks whole trees,
so the agent runs it in a thread, every WEIGHTS_SCAN_INTERVAL_S and after a prefetch.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from shared.models import MAX_LOCAL_MODELS, LocalModel

_CACHE_PREFIX = "models--"


def hub_cache_dir(hf_hub_cache: Path | None, hf_home: Path | None) -> Path:
    """Where the Hugging Face hub keeps models, as huggingface_hub and vLLM resolve it."""
    if hf_hub_cache is not None:
        return hf_hub_cache
    home = hf_home if hf_home is not None else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def cache_entry(cache: Path, repo_id: str) -> Path:
    """The cache directory of hub id ``org/name``."""
    return cache / (_CACHE_PREFIX + repo_id.replace("/", "--"))


def repo_id_of(dirname: str) -> str | None:
    if not dirname.startswith(_CACHE_PREFIX):
        return None
    org, _, name = dirname[len(_CACHE_PREFIX):].partition("--")
    return f"{org}/{name}" if name else org or None


def tree_mb(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                continue  # removed meanwhile
    return total // (1 << 20)


def _has_snapshot(entry: Path) -> bool:
    snaps = entry / "snapshots"
    try:
        return any(p.is_dir() for p in snaps.iterdir())
    except OSError:
        return False


def _children(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def scan(cache: Path, roots: Iterable[str]) -> list[LocalModel]:
    """The models found, largest first, at most MAX_LOCAL_MODELS (the record's bound)."""
    found = [LocalModel(name=repo, size_mb=tree_mb(entry), source="hf_cache")
             for entry in _children(cache)
             if (repo := repo_id_of(entry.name)) and _has_snapshot(entry)]
    found += [LocalModel(name=str(d), size_mb=tree_mb(d), source="model_root")
              for root in roots for d in _children(Path(root))]
    found = [m for m in found if len(m.name) <= 512]
    found.sort(key=lambda m: (-m.size_mb, m.name))
    return found[:MAX_LOCAL_MODELS]


def free_mb(cache: Path) -> int | None:
    """Disk space left where downloads go (the cache, or the nearest existing parent)."""
    for p in (cache, *cache.parents):
        if p.exists():
            return shutil.disk_usage(p).free // (1 << 20)
    return None
