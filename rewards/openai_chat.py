"""Minimal client for an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint (vLLM, SGLang, ...)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from flowgrpo.rewards.http_client import image_to_png_b64, post_json, resolve_secret


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part(image: torch.Tensor) -> dict[str, Any]:
    """An image content part carrying a [3,H,W] tensor as a PNG data URL."""
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_to_png_b64(image)}}


def answer_text(answer: Any) -> str:
    """The assistant text of a chat-completions answer; ValueError if the answer has no such text."""
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"no choices[0].message.content in answer {str(answer)[:200]}") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ValueError(f"message content is {type(content).__name__}, not text")
    return content


class ChatClient:
    """Sends one user message (text and image parts) and returns the assistant's text.

    ``api_key`` may be ``"env:NAME"`` to read it from the environment. Transient failures are retried with
    backoff (see ``http_client.post_json``); the caller decides what an unusable answer is worth.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, max_tokens: int = 1024, temperature: float = 0.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https:// (e.g. http://host:8000/v1), got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        key = resolve_secret(api_key)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_tokens, self.temperature = max_tokens, temperature

    def complete(self, parts: list[dict[str, Any]], on_retry: Callable[[str], None] | None = None) -> str:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": parts}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        return post_json(self.url, payload, headers=self.headers, timeout=self.timeout, retries=self.retries,
                         backoff=self.backoff, validate=answer_text, on_retry=on_retry)
