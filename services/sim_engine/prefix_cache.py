"""A simulated prefix cache: which prompt prefixes this engine has recently computed.

Like vLLM's automatic prefix caching, a prompt is cut into fixed blocks and each block is
keyed by the hash of everything up to its end, so a block hits only where the whole prefix
before it matches. Blocks live in an LRU of ``capacity`` entries (the KV cache's room). Hits
and queries are counted in tokens, 16 per 64-character block, and exported as vLLM's
``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries`` counters; the cached share of a
prompt shortens its simulated time to first token (the prefill it skips).
"""

from __future__ import annotations

from collections import OrderedDict
from hashlib import blake2b

BLOCK_CHARS = 64
BLOCK_TOKENS = 16


class PrefixCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[bytes, None] = OrderedDict()
        self.queries = 0  # tokens looked up
        self.hits = 0  # of which found cached

    def lookup(self, prompt: str) -> float:
        """Look ``prompt`` up and cache its blocks; the share of its full blocks that hit."""
        data = prompt.encode("utf-8", "replace")
        count = len(data) // BLOCK_CHARS
        if count == 0 or self.capacity <= 0:
            return 0.0
        digest = b""
        hit = 0
        leading = True
        for i in range(count):
            digest = blake2b(digest + data[i * BLOCK_CHARS:(i + 1) * BLOCK_CHARS],
                             digest_size=16).digest()
            if leading and digest in self.blocks:
                hit += 1
                self.blocks.move_to_end(digest)
            else:
                leading = False
                self.blocks[digest] = None
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        self.queries += count * BLOCK_TOKENS
        self.hits += hit * BLOCK_TOKENS
        return hit / count

    def metrics(self, label: str) -> str:
        """The two counters in Prometheus text, with vLLM's names."""
        lines: list[str] = []
        for name, value, text in (
                ("vllm:prefix_cache_queries", self.queries, "Prefix cache queries, in tokens."),
                ("vllm:prefix_cache_hits", self.hits, "Prefix cache hits, in tokens.")):
            lines += [f"# HELP {name}_total {text}", f"# TYPE {name}_total counter",
                      f"{name}_total{{{label}}} {float(value)}"]
        return "\n".join(lines) + "\n"
