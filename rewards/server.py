"""``flowgrpo serve-reward NAME``: any registered reward as a JSON-over-HTTP service (never pickle).

    POST /score   {"images": [base64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]}  (metadata optional)
                  -> 200 {"rewards": [float | null, ...]}    (null = the reward could not score that sample)
    GET  /health  -> 200 {"status": "ok", "reward": NAME, "max_batch": N, "max_bytes": M}

Errors are JSON ``{"error": "..."}``: 400 malformed body, 401 missing/wrong bearer token, 404 unknown path,
411 no Content-Length, 413 body over --max-bytes, 500 the reward raised. One worker thread runs the reward;
requests arriving together are merged into batches of up to --max-batch images (larger requests are split).
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from flowgrpo.rewards.base import RewardFn, build_reward
from flowgrpo.rewards.batching import BatchingScorer
from flowgrpo.rewards.http_client import png_b64_to_image, resolve_secret

logger = logging.getLogger(__name__)

_REQUEST_KEYS = {"images", "prompts", "metadata"}
# Bodies we refuse are still read (up to this much) and thrown away, so the client gets to see our answer.
_DRAIN_LIMIT = 256 * 2**20


def parse_request(body: Any) -> tuple[list[torch.Tensor], list[str], list[dict]]:
    """Validate a /score body; ValueError with a message fit for a 400 answer."""
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
    decoded = []
    for i, data in enumerate(images):
        try:
            decoded.append(png_b64_to_image(data))
        except ValueError as exc:
            raise ValueError(f"images[{i}]: {exc}") from None
    return decoded, prompts, metadata


class RewardServer(ThreadingHTTPServer):
    """Threaded HTTP server holding the scorer and the request limits."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], scorer: BatchingScorer, name: str, token: str | None,
                 max_bytes: int) -> None:
        super().__init__(address, _Handler)
        self.scorer, self.reward_name, self.token, self.max_bytes = scorer, name, token, max_bytes

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        """Stop serving (call from another thread than ``serve_forever``) and stop the worker."""
        self.shutdown()
        self.server_close()
        self.scorer.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RewardServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status: int, message: str, length: int, headers: dict[str, str] | None = None) -> None:
        # Drain (without keeping) the unread body so the client reads our answer instead of a reset socket.
        remaining = min(length, _DRAIN_LIMIT)
        while remaining > 0 and (chunk := self.rfile.read(min(remaining, 1 << 16))):
            remaining -= len(chunk)
        self.close_connection = True
        self._send(status, {"error": message}, {"Connection": "close", **(headers or {})})

    def do_GET(self) -> None:
        if self.path != "/health":
            self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})
            return
        self._send(200, {"status": "ok", "reward": self.server.reward_name,
                         "max_batch": self.server.scorer.max_batch, "max_bytes": self.server.max_bytes})

    def do_POST(self) -> None:
        raw_length = self.headers.get("Content-Length")
        try:
            length = int(raw_length) if raw_length is not None else -1
        except ValueError:
            length = -2
        if length < 0:
            self.close_connection = True
            status = 411 if length == -1 else 400
            self._send(status, {"error": "a Content-Length header (a byte count) is required"}, {"Connection": "close"})
            return
        if self.path != "/score":
            self._refuse(404, f"unknown path {self.path}; use POST /score", length)
            return
        token = self.server.token
        if token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self._refuse(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')", length,
                             {"WWW-Authenticate": "Bearer"})
                return
        if length > self.server.max_bytes:
            self._refuse(413, f"body of {length} bytes exceeds the limit of {self.server.max_bytes} bytes "
                              f"(send fewer images per request)", length)
            return
        try:
            images, prompts, metadata = parse_request(json.loads(self.rfile.read(length)))
        except ValueError as exc:  # JSONDecodeError is a ValueError too
            self._send(400, {"error": f"malformed request: {exc}"})
            return
        try:
            rewards = [v for f in self.server.scorer.submit(images, prompts, metadata) for v in f.result()]
        except Exception as exc:
            logger.exception("reward %s failed", self.server.reward_name)
            self._send(500, {"error": f"reward failed: {type(exc).__name__}: {exc}"})
            return
        self._send(200, {"rewards": [v if math.isfinite(v) else None for v in rewards]})


def make_server(reward: RewardFn, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                max_batch: int = 32, max_bytes: int = 64 * 2**20, batch_wait_s: float = 0.005) -> RewardServer:
    """A ready (not yet serving) server; run ``serve_forever()`` in a thread and ``close()`` it when done."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    return RewardServer((host, port), BatchingScorer(reward, max_batch, batch_wait_s), reward.name, token, max_bytes)


def load_config_arg(value: str | None) -> dict[str, Any]:
    """--config: inline JSON (``'{"checkpoint": ...}'``) or a .json/.yaml/.yml file holding one mapping."""
    if not value:
        return {}
    if value.lstrip().startswith("{"):
        config = json.loads(value)
    else:
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"--config {value!r} is neither inline JSON nor an existing file")
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            config = yaml.safe_load(path.read_text())
        else:
            config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"--config must hold a mapping of reward options, got {type(config).__name__}")
    return config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve-reward`` subcommand to the ``flowgrpo`` CLI."""
    p = subparsers.add_parser("serve-reward", help="serve a registered reward over HTTP (JSON, base64 PNG images)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="registered reward name (see flowgrpo.rewards.REWARDS)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--config", help="reward options: inline JSON or a .json/.yaml file")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN'; 'env:NAME' reads it from $NAME")
    p.add_argument("--max-batch", type=int, default=32, help="most images per reward call (default 32)")
    p.add_argument("--max-bytes", type=int, default=64 * 2**20, help="largest request body in bytes (default 64 MiB)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to wait to merge requests (default 5)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        reward = build_reward(args.name, **load_config_arg(args.config))
        server = make_server(reward, args.host, args.port, token=resolve_secret(args.token),
                             max_batch=args.max_batch, max_bytes=args.max_bytes, batch_wait_s=args.batch_wait_ms / 1000)
    except (KeyError, TypeError, ValueError, OSError) as exc:  # bad name, options, paths, config or port
        print(f"flowgrpo serve-reward: error: {exc}", file=sys.stderr)
        return 2
    print(f"flowgrpo serve-reward: {reward.name} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.scorer.close()
    return 0
