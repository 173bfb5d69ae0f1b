"""Which client paths each engine serves: the router answers 404 naming the engine for a path
the model's engine lacks (instead of a proxy error from deep inside), and the worker proxies
exactly these paths (the engine's others, /sleep, /collective_rpc ..., are not for clients).

From each engine's own server: vLLM's OpenAI server (vllm/entrypoints/openai/api_server.py),
llama.cpp's llama-server (/v1/rerank, /tokenize, /detokenize, no responses, scoring, audio
or pooling), SGLang's http_server (OpenAI paths, /v1/rerank, /v1/score with its own request
shape, /classify, /tokenize, /detokenize; no audio, /pooling or the unversioned aliases) and
the simulated engine (services/sim_engine), which serves what vLLM does.
"""

from __future__ import annotations

from typing import Final

# Paths without the leading slash, as the router's routes and the worker's /proxy/ take them.
_ALL: Final = frozenset(("vllm", "llamacpp", "sglang", "sim"))
_VLLM_LIKE: Final = frozenset(("vllm", "sim"))
_NOT_LLAMACPP: Final = frozenset(("vllm", "sglang", "sim"))
_NOT_SGLANG: Final = frozenset(("vllm", "llamacpp", "sim"))
SERVED_BY: Final[dict[str, frozenset[str]]] = {
    "v1/chat/completions": _ALL,
    "v1/completions": _ALL,
    "v1/embeddings": _ALL,
    "v1/responses": _NOT_LLAMACPP,
    "v1/rerank": _ALL,
    "rerank": _NOT_SGLANG,
    "v1/score": _NOT_LLAMACPP,
    "score": _VLLM_LIKE,
    "tokenize": _ALL,
    "detokenize": _ALL,
    "pooling": _VLLM_LIKE,
    "classify": _NOT_LLAMACPP,
    "v1/audio/transcriptions": _VLLM_LIKE,
    "v1/audio/translations": _VLLM_LIKE,
}
# The POST paths whose body is JSON (the rest, audio, are multipart forms).
JSON_PATHS: Final = tuple(p for p in SERVED_BY if not p.startswith("v1/audio/"))
FORM_PATHS: Final = tuple(p for p in SERVED_BY if p.startswith("v1/audio/"))
# The paths whose prompt can share a prefix with other requests' (prefix-aware balancing).
PROMPT_PATHS: Final = frozenset(("v1/chat/completions", "v1/completions", "v1/responses"))

ENGINE_NAMES: Final = {"vllm": "vLLM", "llamacpp": "llama.cpp", "sglang": "SGLang",
                       "sim": "the simulated engine"}


def serves(engine: str, path: str) -> bool:
    return engine in SERVED_BY.get(path, ())


def not_served(alias: str, engine: str, path: str) -> str:
    """The message of the 404 for ``path`` on a model whose engine does not serve it."""
    return (f"the model '{alias}' runs on {ENGINE_NAMES.get(engine, engine)}, which does not "
            f"serve /{path}")
