"""The reward service's HTTP protocol as a plain ASGI application (served by ``flowgrpo.rewards.server``).

    POST /score   {"images": [base64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]}  (metadata optional)
                  -> 200 {"rewards": [float | null, ...]}    (null = the reward could not score that sample)
    GET  /health  -> 200 {"status": "ok", "reward": NAME, "max_batch": N, "max_bytes": M}

Every error is JSON ``{"error": "..."}`` and closes the connection: 400 malformed body, 401 missing or wrong
bearer token, 404 unknown path, 405 wrong method, 408 body not received within the read timeout, 411 no
Content-Length, 413 body over ``max_bytes`` or images over ``max_pixels``, 500 the reward raised. A refused
body is read and thrown away first (up to ``_DRAIN_LIMIT``, within the read timeout), so a client that sends
before it reads sees the answer instead of a reset connection. Decoding runs on a small thread pool and scoring on the ``BatchingScorer``'s
one worker, so the event loop only moves bytes.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import torch

from flowgrpo.rewards.batching import BatchingScorer
from flowgrpo.rewards.http_client import png_b64_to_image

logger = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

_REQUEST_KEYS = {"images", "prompts", "metadata"}
# Refused bodies up to this size are read and discarded; a client claiming more is answered at once.
_DRAIN_LIMIT = 256 * 2**20
_ROUTES = {"/score": "POST", "/health": "GET"}


class HttpError(Exception):
    """An error answer: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class TooManyPixels(Exception):
    """The request's images decode to more pixels than the server accepts (a 413, not a malformed request)."""


def parse_request(body: Any, max_pixels: int) -> tuple[list[torch.Tensor], list[str], list[dict]]:
    """Validate a /score body; ValueError with a message fit for a 400 answer, TooManyPixels once the decoded images
    pass ``max_pixels`` in all (PNG compresses flat images a thousandfold: bytes alone do not bound memory)."""
    if not isinstance(body, dict):
        raise ValueError(f"body must be a JSON object with keys {sorted(_REQUEST_KEYS)}")
    unknown = sorted(set(body) - _REQUEST_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {sorted(_REQUEST_KEYS)}")
    images, prompts, metadata = body.get("images"), body.get("prompts"), body.get("metadata")
    if not isinstance(images, list) or not images:
        raise ValueError("'images' must be a non-empty list of base64 PNG strings")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("'prompts' must be a list of strings")
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if metadata is None:
        metadata = [{} for _ in images]
    if not isinstance(metadata, list) or len(metadata) != len(images) or not all(isinstance(m, dict) for m in metadata):
        raise ValueError(f"'metadata' must be a list of {len(images)} objects (or left out)")
    decoded, pixels = [], 0
    for i, data in enumerate(images):
        try:
            decoded.append(png_b64_to_image(data))
        except ValueError as exc:
            raise ValueError(f"images[{i}]: {exc}") from None
        pixels += decoded[-1].shape[1] * decoded[-1].shape[2]
        if pixels > max_pixels:
            raise TooManyPixels(f"images[:{i + 1}] decode to {pixels} pixels, over the limit of {max_pixels} per "
                                f"request (send fewer or smaller images per request)")
    return decoded, prompts, metadata


class RewardApp:
    """ASGI app: routes, bearer token, size and time limits, then the scorer."""

    def __init__(self, scorer: BatchingScorer, name: str, *, token: str | None, max_bytes: int, max_pixels: int,
                 read_timeout: float, decode_threads: int = 2) -> None:
        self.scorer, self.name, self.max_bytes, self.read_timeout = scorer, name, max_bytes, read_timeout
        self.max_pixels = max_pixels
        self._expected_auth = f"Bearer {token}".encode() if token is not None else None
        self._decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="reward-decode")

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self.scorer.close()

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the server runs without lifespan events; nothing else is spoken here
            return
        try:
            status, answer, headers = 200, await self._route(scope, receive), {}
        except HttpError as err:
            status, answer, headers = err.status, {"error": err.message}, {"connection": "close", **err.headers}
        body = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *((k.encode(), v.encode()) for k, v in headers.items())]})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: dict, receive: Receive) -> dict:
        path, method = scope["path"], scope["method"]
        if path not in _ROUTES:
            await self._refuse(scope, receive, 404, f"unknown path {path}; use GET /health or POST /score")
        if method != _ROUTES[path]:
            await self._refuse(scope, receive, 405, f"{method} {path} is not served; use GET /health or POST /score",
                               {"allow": _ROUTES[path]})
        if path == "/health":
            return {"status": "ok", "reward": self.name, "max_batch": self.scorer.max_batch,
                    "max_bytes": self.max_bytes}
        return await self._score(scope, receive)

    async def _score(self, scope: dict, receive: Receive) -> dict:
        headers = dict(scope["headers"])
        if b"content-length" not in headers:  # chunked or unframed: we need the size before reading
            raise HttpError(411, "a Content-Length header (a byte count) is required")
        if self._expected_auth is not None and not hmac.compare_digest(headers.get(b"authorization", b""),
                                                                        self._expected_auth):
            await self._refuse(scope, receive, 401, "missing or wrong bearer token (send 'Authorization: Bearer "
                                                    "<token>')", {"www-authenticate": "Bearer"})
        length = int(headers[b"content-length"])  # the HTTP parser has checked it is a byte count
        if length > self.max_bytes:
            await self._refuse(scope, receive, 413, f"body of {length} bytes exceeds the limit of {self.max_bytes} "
                                                    f"bytes (send fewer images per request)")
        body = await self._read(receive, keep=True)
        if body is None:
            raise HttpError(408, f"request body not received within {self.read_timeout:g} s")
        try:
            images, prompts, metadata = await asyncio.get_running_loop().run_in_executor(self._decoder, self._decode,
                                                                                         body)
        except (ValueError, RecursionError) as exc:  # JSON nested deeper than the parser's recursion limit
            raise HttpError(400, f"malformed request: {exc}") from None
        except TooManyPixels as exc:
            raise HttpError(413, str(exc)) from None
        try:
            chunks = await asyncio.gather(*map(asyncio.wrap_future, self.scorer.submit(images, prompts, metadata)))
        except Exception as exc:
            logger.exception("reward %s failed", self.name)
            raise HttpError(500, f"reward failed: {type(exc).__name__}: {exc}") from None
        return {"rewards": [v if math.isfinite(v) else None for chunk in chunks for v in chunk]}

    def _decode(self, body: bytes) -> tuple[list[torch.Tensor], list[str], list[dict]]:
        return parse_request(json.loads(body), self.max_pixels)  # JSONDecodeError is a ValueError too

    async def _refuse(self, scope: dict, receive: Receive, status: int, message: str,
                      headers: dict[str, str] | None = None) -> None:
        """Raise the error answer, after discarding the body if it is small enough to read in time."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) <= _DRAIN_LIMIT:
            await self._read(receive, keep=False)
        raise HttpError(status, message, headers)

    async def _read(self, receive: Receive, keep: bool) -> bytes | None:
        """The request body (b"" when not ``keep``), or None if it did not arrive within the read timeout.
        A client that hangs up mid-body gets an answer nobody reads; the server then drops the connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        chunks = []
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None
            if message["type"] == "http.disconnect":
                return None
            if keep:
                chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
