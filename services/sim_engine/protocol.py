"""OpenAI wire format as vLLM speaks it: request validation, error and response shapes.

Pure functions of the request body and the engine's configuration; the server only adds
timing, accounting and transport.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from services.sim_engine import textgen
from services.sim_engine.cli import EngineConfig

Body = dict[str, Any]
Prompt = tuple[str, int]

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
DONE_EVENT = b"data: [DONE]\n\n"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(status: int, message: str) -> Response:
    """vLLM's error shape: an ``error`` object with message, type, param and code."""
    kind = _ERROR_TYPES.get(status, "Error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


class ApiError(Exception):
    """An error answer raised from anywhere in a request's validation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def sse(payload: Body) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def read_json(request: Request) -> Body:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"Invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


@dataclass(frozen=True, slots=True)
class GenSpec:
    """A validated completion request."""

    chat: bool
    prompts: list[Prompt]
    max_tokens: int
    stream: bool
    include_usage: bool
    priority: int = 0

    def usage(self) -> dict[str, int]:
        prompt = sum(tokens for _, tokens in self.prompts)
        completion = self.max_tokens * len(self.prompts)
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
        }


def stream_flags(body: Body) -> tuple[bool, bool]:
    """(stream, include_usage), validated as vLLM does."""
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be a boolean.")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object.")
    if not stream:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.")
    return stream, bool(options.get("include_usage"))


def check_max_tokens(value: Any, prompts: list[Prompt], config: EngineConfig) -> int:
    """The number of tokens to generate; 400 when invalid or past the context window."""
    longest = max(tokens for _, tokens in prompts)
    if value is None:
        value = min(config.max_tokens_default, max(1, config.max_model_len - longest))
    elif not textgen.is_int(value) or value < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {value}.")
    if longest + value > config.max_model_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, "
            f"you requested {longest + value} tokens ({longest} in the messages, {value} in "
            "the completion). Please reduce the length of the messages or completion.",
        )
    return int(value)


def gen_spec(body: Body, chat: bool, prompts: list[Prompt], config: EngineConfig) -> GenSpec:
    n = body.get("n")
    if n is not None and (not textgen.is_int(n) or n != 1):
        raise ApiError(400, "Only n=1 is supported by this engine.")
    limit = body.get("max_completion_tokens") if chat else None
    if limit is None:
        limit = body.get("max_tokens")
    max_tokens = check_max_tokens(limit, prompts, config)
    stream, include_usage = stream_flags(body)
    return GenSpec(chat, prompts, max_tokens, stream, include_usage,
                   check_priority(body.get("priority", 0), config))


def check_priority(value: Any, config: EngineConfig) -> int:
    """The request's ``priority``, refused as vLLM refuses it without priority scheduling."""
    if not textgen.is_int(value):
        raise ApiError(400, "`priority` must be an integer.")
    if value != 0 and config.scheduling_policy != "priority":
        raise ApiError(400, f"Got priority {value} but Priority scheduling is not enabled.")
    return int(value)


def stream_choice(spec: GenSpec, index: int, token: str | None, finish: str | None) -> Body:
    """One streamed choice: a token, or (token None) the closing one with its finish reason."""
    if not spec.chat:
        text = "" if token is None else token
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                "stop_reason": None}
    if token is None:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish,
                "stop_reason": None}
    return {"index": index, "delta": {"content": token}, "logprobs": None, "finish_reason": None}


def final_choice(spec: GenSpec, index: int, prompt: str) -> Body:
    text = textgen.generate_text(prompt, spec.max_tokens)
    if spec.chat:
        message = {"role": "assistant", "content": text, "tool_calls": []}
        return {"index": index, "message": message, "logprobs": None,
                "finish_reason": "length", "stop_reason": None}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": "length",
            "stop_reason": None}


def encode_embedding(vector: tuple[float, ...], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)
