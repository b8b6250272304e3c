"""HTTP plumbing shared by the remote reward, the VLM judges and the reward server.

Images travel as base64 PNG (8-bit, so values are quantised to k/255); bodies are JSON, never pickle.
``post_json`` retries transient failures (refused or reset connections, timeouts, 5xx/429, malformed JSON) with
exponential backoff and raises ``RequestFailed`` once the budget is spent; other 4xx answers are
configuration errors and raise ``HttpStatusError`` at once.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from flowgrpo.media import to_uint8

logger = logging.getLogger(__name__)

# A 4096x4096 RGB image; larger decoded PNGs are refused before their pixels are allocated.
MAX_PIXELS = 4096 * 4096


def image_to_png_b64(image: torch.Tensor) -> str:
    """[3,H,W] float in [0,1] -> base64 of an 8-bit RGB PNG."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one image [3,H,W], got {tuple(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0], mode="RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_b64_to_image(data: str, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """base64 PNG -> [3,H,W] float32 in [0,1]; raises ValueError with the reason for anything else."""
    if not isinstance(data, str):
        raise ValueError(f"expected a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64 ({exc})") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
            if img.width * img.height > max_pixels:
                raise ValueError(f"image of {img.width}x{img.height} exceeds the {max_pixels}-pixel limit")
            pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable PNG ({exc})") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0


def resolve_secret(spec: str | None) -> str | None:
    """``"env:NAME"`` -> the value of environment variable NAME (error if unset); any other string is literal."""
    if spec is None or spec == "":
        return None
    if spec.startswith("env:"):
        var = spec[4:]
        value = os.environ.get(var)
        if not value:
            raise ValueError(f"secret {spec!r}: environment variable {var} is not set or empty")
        return value
    return spec


class HttpStatusError(RuntimeError):
    """A non-retryable HTTP error answer (bad request, auth, size limit, ...)."""

    def __init__(self, url: str, status: int, body: str) -> None:
        self.status, self.body = status, body
        super().__init__(f"POST {url} -> HTTP {status}: {body[:500]}")


class RequestFailed(RuntimeError):
    """All attempts at a request failed with transient errors; ``reason`` is the last one."""

    def __init__(self, url: str, attempts: int, reason: str) -> None:
        self.attempts, self.reason = attempts, reason
        super().__init__(f"POST {url} failed after {attempts} attempt(s): {reason}")


class _Transient(Exception):
    pass


def _post_once(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Any:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        if exc.code >= 500 or exc.code == 429:  # overloaded or failing server; any other 4xx is our mistake
            raise _Transient(f"HTTP {exc.code}: {text[:200]}") from None
        raise HttpStatusError(url, exc.code, text) from None
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, truncated answer
        raise _Transient(f"{type(exc).__name__}: {exc}") from None
    try:
        return json.loads(payload)
    except ValueError:
        raise _Transient(f"malformed JSON answer: {payload[:200]!r}") from None


def post_json(
    url: str,
    payload: Any,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    validate: Callable[[Any], Any] | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> Any:
    """POST ``payload`` as JSON; return the decoded (and ``validate``-d) answer.

    Up to ``1 + retries`` attempts, sleeping ``backoff * 2**k`` (capped at ``max_backoff``) between them, less a
    random part of up to half, so clients that failed together (every rank of a run) do not retry together.
    ``validate(answer)`` may raise ValueError to mark an answer malformed (retried like a transient error).
    """
    if retries < 0 or timeout <= 0:
        raise ValueError(f"need retries >= 0 and timeout > 0, got retries={retries} timeout={timeout}")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"url must start with http:// or https://, got {url!r}")
    body = json.dumps(payload, allow_nan=False).encode("utf-8")
    reason = ""
    for attempt in range(retries + 1):
        if attempt:
            if on_retry is not None:
                on_retry(reason)
            time.sleep(min(backoff * 2 ** (attempt - 1), max_backoff) * random.uniform(0.5, 1.0))
        try:
            answer = _post_once(url, body, headers or {}, timeout)
            return validate(answer) if validate is not None else answer
        except _Transient as exc:
            reason = str(exc)
        except ValueError as exc:  # only `validate` raises ValueError here: the URL was checked above
            reason = f"malformed answer: {exc}"
        logger.debug("POST %s attempt %d failed: %s", url, attempt + 1, reason)
    raise RequestFailed(url, retries + 1, reason)
