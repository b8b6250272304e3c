"""Client for a reward service (``flowgrpo serve-reward``): JSON over HTTP, never pickle.

``POST {url}/score`` with ``{"images": [base64 PNG], "prompts": [...], "metadata": [...]}`` answers
``{"rewards": [float | null, ...]}``. The batch is sent in chunks of ``batch_size``. Timeouts, refused or
reset connections, 5xx/429 and malformed answers are retried with exponential backoff; a chunk that still
fails scores NaN, is counted in ``stats`` and logged, and training goes on. Answers that retrying cannot fix
(401/403 bad token, 413 too large, 408 too slow, 400 bad request, 404 wrong URL) raise ``RemoteRewardError``
with the server's message.
"""
from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from flowgrpo.rewards.base import Reward
from flowgrpo.rewards.http_client import HttpStatusError, RequestFailed, image_to_png_b64, post_json, resolve_secret

logger = logging.getLogger(__name__)

_HINTS = {
    401: "the server wants a bearer token: set the reward's 'token' (e.g. token='env:REWARD_TOKEN')",
    403: "the server refused the token",
    404: "is 'url' the service base (http://host:port, without /score)?",
    408: "the request reached the server slower than its --read-timeout: lower 'batch_size' or raise --read-timeout",
    413: "the request is larger than the server's --max-bytes or --max-pixels: lower 'batch_size' or raise the limit",
}


class RemoteRewardError(RuntimeError):
    """The reward service rejected a request in a way retrying cannot fix."""


def parse_rewards(answer: Any, n: int) -> list[float]:
    """``{"rewards": [...]}`` with n numbers or nulls -> floats (null -> NaN); ValueError otherwise."""
    if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
        raise ValueError(f"expected {{'rewards': [...]}}, got {str(answer)[:200]}")
    values = answer["rewards"]
    if len(values) != n:
        raise ValueError(f"expected {n} rewards, got {len(values)}")
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
        raise ValueError(f"rewards must be numbers or null, got {values[:8]}")
    return [math.nan if v is None else float(v) for v in values]


class RemoteReward(Reward):
    """Pointwise reward computed by a remote ``flowgrpo serve-reward`` service."""

    def __init__(self, url: str, token: str | None = None, batch_size: int = 16, concurrency: int = 1,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, max_backoff: float = 30.0,
                 name: str = "remote") -> None:
        super().__init__()
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be the service base like http://host:8000, got {url!r}")
        if batch_size < 1 or concurrency < 1:
            raise ValueError(f"need batch_size >= 1 and concurrency >= 1, got {batch_size}, {concurrency}")
        self.url = url.rstrip("/")
        secret = resolve_secret(token)
        self.headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self.batch_size, self.concurrency = batch_size, concurrency
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.name = name

    def _chunk(self, payload: dict[str, list]) -> list[float]:
        n = len(payload["prompts"])
        self.count("requests")
        try:
            return post_json(self.url + "/score", payload, headers=self.headers, timeout=self.timeout,
                             retries=self.retries, backoff=self.backoff, max_backoff=self.max_backoff,
                             validate=lambda answer: parse_rewards(answer, n),
                             on_retry=lambda reason: self.count("retries"))
        except RequestFailed as exc:
            self.count("failed_requests")
            self.count("failed_samples", n)
            logger.warning("remote reward %s: %d sample(s) scored NaN (%d failed request(s) so far): %s",
                           self.name, n, self.stats["failed_requests"], exc)
            return [math.nan] * n
        except HttpStatusError as exc:
            hint = _HINTS.get(exc.status, "")
            raise RemoteRewardError(f"reward service {self.url} answered HTTP {exc.status}: {exc.body[:300]}"
                                    + (f" ({hint})" if hint else "")) from None

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be plain JSON (str, numbers, lists, dicts) to send to {self.url}: "
                            f"{exc}") from None
        encoded = [image_to_png_b64(img) for img in images]
        starts = range(0, len(encoded), self.batch_size)
        payloads = [{"images": encoded[s:s + self.batch_size], "prompts": prompts[s:s + self.batch_size],
                     "metadata": metadata[s:s + self.batch_size]} for s in starts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            chunks = list(pool.map(self._chunk, payloads))
        return torch.tensor([v for chunk in chunks for v in chunk], dtype=torch.float32)
