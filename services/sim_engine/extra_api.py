"""The rest of vLLM's API on the simulated engine: responses, rerank and score, tokenize and
detokenize, pooling and classify, and audio transcription and translation.

Shaped like vLLM's answers (vllm/entrypoints/openai/protocol.py), with deterministic values
from textgen: a test can check that an answer came from this request's input. The tokenizer is
byte-level (one token per UTF-8 byte), so detokenize inverts tokenize exactly. A transcription
is derived from the uploaded WAV: its duration, sample rate and channels.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import time
import wave
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from services.sim_engine import textgen
from services.sim_engine.cli import EngineConfig
from services.sim_engine.protocol import ApiError, Body, JSONResponse, check_max_tokens

_BOUNDARY = re.compile(r'boundary="?([^";]{1,70})"?', re.IGNORECASE)
_DISPOSITION = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)


def _id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(16).hex()}"


def _texts(value: Any, name: str) -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise ApiError(400, f"`{name}` must be a string or a non-empty list of strings.")


def _similarity(a: str, b: str, dim: int) -> float:
    """A score in [0, 1] from the two texts' embeddings (their cosine, rescaled)."""
    dot = sum(x * y for x, y in zip(textgen.embed(a, dim), textgen.embed(b, dim), strict=True))
    return (dot + 1.0) / 2.0


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


class _Counts(Protocol):
    upload_bytes: int
    uploads: int


class ExtraApi:
    def __init__(self, config: EngineConfig, stats: _Counts) -> None:
        self.config = config
        self.name = config.served_model_name
        self.stats = stats

    def _list(self, prefix: str, data: list[Body], tokens: int) -> JSONResponse:
        return JSONResponse({"id": _id(prefix), "object": "list", "created": int(time.time()),
                             "model": self.name, "data": data, "usage": _usage(tokens)})

    async def responses(self, request: Request, body: Body) -> Response:
        given = body.get("input")
        if isinstance(given, str):
            prompt = (given, textgen.count_words(given))
        elif isinstance(given, list) and given:
            found = textgen.chat_prompt(given)
            if found is None:
                raise ApiError(400, "Each input item needs a string `role` and text `content`.")
            prompt = found
        else:
            raise ApiError(400, "`input` must be a string or a non-empty list of messages.")
        max_tokens = check_max_tokens(body.get("max_output_tokens"), [prompt], self.config)
        tokens = textgen.generate_tokens(prompt[0], max_tokens)
        answer = self._response(body, "".join(tokens), prompt[1], max_tokens)
        if body.get("stream") is True:
            return StreamingResponse(self._response_events(answer, tokens),
                                     media_type="text/event-stream")
        return JSONResponse(answer)

    def _response(self, body: Body, text: str, prompt_tokens: int, max_tokens: int) -> Body:
        content: Body = {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
        message = {"id": _id("msg"), "type": "message", "role": "assistant",
                   "status": "completed", "content": [content]}
        usage = {"input_tokens": prompt_tokens, "output_tokens": max_tokens,
                 "total_tokens": prompt_tokens + max_tokens,
                 "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        return {
            "id": _id("resp"), "object": "response", "created_at": int(time.time()),
            "model": self.name, "status": "completed", "output": [message],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "max_output_tokens": max_tokens, "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0), "usage": usage, "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "metadata": None, "text": {"format": {"type": "text"}}, "truncation": "disabled"}

    async def _response_events(self, answer: Body, tokens: tuple[str, ...],
                               ) -> AsyncIterator[bytes]:
        """The streamed form: created, one text delta per token (paced by --itl), completed."""
        item = answer["output"][0]["id"]
        started = {**answer, "status": "in_progress", "output": [], "usage": None}
        events: list[Body] = [{"type": "response.created", "response": started}]
        events += [{"type": "response.output_text.delta", "item_id": item, "output_index": 0,
                    "content_index": 0, "delta": token, "logprobs": []} for token in tokens]
        events.append({"type": "response.completed", "response": answer})
        for number, event in enumerate(events):
            if event["type"] == "response.output_text.delta" and self.config.itl > 0:
                await asyncio.sleep(self.config.itl)
            event["sequence_number"] = number
            yield (f"event: {event['type']}\n".encode() + b"data: " + orjson.dumps(event)
                   + b"\n\n")

    async def rerank(self, request: Request, body: Body) -> Response:
        query = body.get("query")
        if not isinstance(query, str):
            raise ApiError(400, "`query` must be a string.")
        documents = _texts(body.get("documents"), "documents")
        top_n = body.get("top_n") or len(documents)
        if not textgen.is_int(top_n) or top_n < 1:
            raise ApiError(400, "`top_n` must be a positive integer.")
        dim = self.config.embedding_dim
        scored = sorted(((_similarity(query, doc, dim), i) for i, doc in enumerate(documents)),
                        reverse=True)
        results = [{"index": i, "document": {"text": documents[i]}, "relevance_score": score}
                   for score, i in scored]
        tokens = sum(textgen.count_words(t) for t in (query, *documents))
        return JSONResponse({"id": _id("rerank"), "model": self.name,
                             "usage": {"total_tokens": tokens}, "results": results[:top_n]})

    async def score(self, request: Request, body: Body) -> Response:
        first = _texts(body.get("text_1"), "text_1")
        second = _texts(body.get("text_2"), "text_2")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise ApiError(400, "`text_1` must be one text or as many as `text_2`.")
        dim = self.config.embedding_dim
        data = [{"index": i, "object": "score", "score": _similarity(a, b, dim)}
                for i, (a, b) in enumerate(zip(first, second, strict=True))]
        tokens = sum(textgen.count_words(t) for t in (*first, *second))
        return self._list("score", data, tokens)

    async def tokenize(self, request: Request, body: Body) -> Response:
        if "messages" in body:
            found = textgen.chat_prompt(body["messages"]) \
                if isinstance(body["messages"], list) else None
            if found is None:
                raise ApiError(400, "`messages` must be a list of messages with text content.")
            text = found[0]
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise ApiError(400, "Either `prompt` (a string) or `messages` is required.")
        tokens = list(text.encode("utf-8"))
        return JSONResponse({"count": len(tokens), "max_model_len": self.config.max_model_len,
                             "tokens": tokens, "token_strs": None})

    async def detokenize(self, request: Request, body: Body) -> Response:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                textgen.is_int(t) and 0 <= t < 256 for t in tokens):
            raise ApiError(400, "`tokens` must be a list of token ids (0..255 on this engine).")
        return JSONResponse({"prompt": bytes(tokens).decode("utf-8", "replace")})

    async def pooling(self, request: Request, body: Body) -> Response:
        inputs = _texts(body.get("input"), "input")
        dim = self.config.embedding_dim
        data = [{"index": i, "object": "pooling", "data": list(textgen.embed(t, dim))}
                for i, t in enumerate(inputs)]
        return self._list("pool", data, sum(textgen.count_words(t) for t in inputs))

    async def classify(self, request: Request, body: Body) -> Response:
        inputs = _texts(body.get("input"), "input")
        data = []
        for i, text in enumerate(inputs):
            p = _similarity(text, "positive", self.config.embedding_dim)
            label = "positive" if p >= 0.5 else "negative"
            data.append({"index": i, "label": label, "probs": [1.0 - p, p], "num_classes": 2})
        return self._list("classify", data, sum(textgen.count_words(t) for t in inputs))

    async def audio(self, request: Request, task: str) -> Response:
        """A transcription (or translation) of the uploaded WAV: a sentence about it."""
        match = _BOUNDARY.search(request.headers.get("content-type", ""))
        if match is None:
            raise ApiError(400, "Expected a multipart/form-data body.")
        body = bytearray()
        async for piece in request.stream():  # counted as it arrives (/sim/stats)
            body += piece
            self.stats.upload_bytes += len(piece)
        self.stats.uploads += 1
        fields = _form(bytes(body), match.group(1).encode("latin-1"))
        model = fields.get("model", b"").decode("utf-8", "replace")
        if model and model != self.name:
            raise ApiError(404, f"The model `{model}` does not exist.")
        if "file" not in fields:
            raise ApiError(400, "The `file` field (the audio) is required.")
        try:
            with wave.open(io.BytesIO(fields["file"])) as w:
                frames, rate, channels = w.getnframes(), w.getframerate(), w.getnchannels()
        except (wave.Error, EOFError) as exc:
            raise ApiError(400, f"Invalid or unsupported audio file: {exc}") from None
        seconds = frames / rate if rate else 0.0
        text = (f"{task} of {seconds:.2f} seconds of audio at {rate} Hz, "
                f"{channels} channel{'s' if channels != 1 else ''}")
        fmt = fields.get("response_format", b"json").decode("ascii", "replace")
        if fmt == "text":
            return PlainTextResponse(text)
        usage = {"type": "duration", "seconds": int(seconds + 0.999)}
        # `bytes_received`: the body this engine got, so a test can check it came whole.
        return JSONResponse({"text": text, "usage": usage, "bytes_received": len(body)}
                            if fmt != "verbose_json" else
                            {"text": text, "language": "en", "duration": seconds,
                             "segments": [], "task": task, "bytes_received": len(body)})


def _form(body: bytes, boundary: bytes) -> dict[str, bytes]:
    """Every part of a multipart/form-data body by name; 400 when malformed."""
    delimiter = b"--" + boundary
    chunks = body.split(delimiter)
    if len(chunks) < 3 or chunks[0] not in (b"", b"\r\n"):
        raise ApiError(400, "Malformed multipart body.")
    fields: dict[str, bytes] = {}
    for chunk in chunks[1:-1]:
        head, sep, value = chunk.partition(b"\r\n\r\n")
        name = _DISPOSITION.search(head)
        if not sep or name is None or not value.endswith(b"\r\n"):
            raise ApiError(400, "Malformed multipart body.")
        fields[name.group(1).decode("utf-8", "replace")] = value[:-2]
    return fields
