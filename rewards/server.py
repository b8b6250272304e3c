"""``flowgrpo serve-reward NAME``: any registered reward as a JSON-over-HTTP service (never pickle).

    POST /score   {"images": [base64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]}  (metadata optional)
                  -> 200 {"rewards": [float | null, ...]}    (null = the reward could not score that sample)
    GET  /health  -> 200 {"status": "ok", "reward": NAME, "max_batch": N, "max_bytes": M}

Errors are JSON {"error": "..."} and close the connection: 400 malformed HTTP or body, 401 missing/wrong
bearer token, 404 unknown path, 405 wrong method, 408 headers or body not received within --read-timeout,
411 no Content-Length, 413 body over --max-bytes or images over --max-pixels, 500 the reward raised.
One worker thread runs the reward; requests arriving together are merged into batches of up to --max-batch
images (larger requests are split).

It runs on uvicorn, an asyncio HTTP/1.1 server: every rank of a multi-GPU run posts at once, and a connection
costs a socket, not a thread, so hundreds of clients (and slow or idle ones) wait in the event loop while
the reward runs, and the listen backlog (--backlog) holds bursts of new connections. A thread-per-connection
server such as the standard library's (listen backlog 5) resets connections under such bursts.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from flowgrpo.rewards.base import RewardFn, build_reward
from flowgrpo.rewards.batching import BatchingScorer
from flowgrpo.rewards.http_client import resolve_secret
from flowgrpo.rewards.service_app import RewardApp

logger = logging.getLogger(__name__)

# h11's (and uvicorn's) limit on a request line plus headers; more is a 400.
_MAX_HEADER_BYTES = 16 * 1024


def _raw_answer(status: int, message: str) -> bytes:
    """A complete JSON error response that closes the connection, for answers sent outside a request cycle."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on request headers and JSON for unparseable requests.

    uvicorn waits for a request's headers as long as the client likes: one that connects and sends nothing, or
    sends its headers a byte at a time, holds its connection forever. Here the headers must be complete within
    ``header_timeout`` seconds of the connection (or of the request's first byte, on a kept-alive connection),
    else the client gets a 408 and is disconnected. uvicorn answers unparseable HTTP in plain text; here the
    answer is JSON like every other error.
    """

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # headers complete (or the request failed): no deadline
            self._cancel_deadline()
        elif self._deadline is None and not self.transport.is_closing():  # first bytes of a kept-alive request
            self._deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._cancel_deadline()
        self.transport.write(_raw_answer(400, f"malformed HTTP request: the request line and headers must be "
                                              f"HTTP/1.1, at most {_MAX_HEADER_BYTES} bytes, with a numeric "
                                              f"Content-Length"))
        self.transport.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(_raw_answer(408, f"request headers not received within {self.header_timeout:g} s"))
            self.transport.close()


class RewardServer:
    """A uvicorn server for one ``RewardApp`` on a socket bound (and listening) before it starts serving."""

    def __init__(self, app: RewardApp, sock: socket.socket, read_timeout: float, backlog: int) -> None:
        self.app, self._socket = app, sock
        self.address: tuple[str, int] = sock.getsockname()[:2]
        config = uvicorn.Config(
            app, http=functools.partial(HeaderDeadlineH11, header_timeout=read_timeout), interface="asgi3",
            lifespan="off", ws="none", access_log=False, log_config=None, log_level="warning",
            proxy_headers=False, server_header=False, backlog=backlog, timeout_keep_alive=5,
            timeout_graceful_shutdown=5, h11_max_incomplete_event_size=_MAX_HEADER_BYTES)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (main thread) or ``close()`` from another thread."""
        self._server.run(sockets=[self._socket])

    def start(self, timeout: float = 10.0) -> RewardServer:
        """Serve on a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="reward-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"reward server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        """Stop serving (in-flight requests get up to 5 s to finish) and stop the reward worker."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._socket.close()
        self.app.close()


def make_server(reward: RewardFn, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                max_batch: int = 32, max_bytes: int = 64 * 2**20, max_pixels: int = 2**26, batch_wait_s: float = 0.005,
                read_timeout: float = 30.0, backlog: int = 2048) -> RewardServer:
    """A bound, not yet serving server: ``start()`` it on a thread (``close()`` when done) or ``serve_forever()``."""
    if max_bytes < 1 or max_pixels < 1 or read_timeout <= 0:
        raise ValueError(f"need max_bytes >= 1, max_pixels >= 1 and read_timeout > 0, got {max_bytes}, {max_pixels} "
                         f"and {read_timeout}")
    app = RewardApp(BatchingScorer(reward, max_batch, batch_wait_s), reward.name, token=token, max_bytes=max_bytes,
                    max_pixels=max_pixels, read_timeout=read_timeout)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=backlog)
    except OSError:
        app.close()
        raise
    return RewardServer(app, sock, read_timeout, backlog)


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
    p.add_argument("--reward-options", "--config", dest="reward_options",
                   help="reward options (as `flowgrpo train --reward-options`): inline JSON or a .json/.yaml file")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on /score; 'env:NAME' reads it from $NAME")
    p.add_argument("--max-batch", type=int, default=32, help="most images per reward call (default 32)")
    p.add_argument("--max-bytes", type=int, default=64 * 2**20,
                   help="largest request body in bytes; larger ones get 413 (default 64 MiB)")
    p.add_argument("--max-pixels", type=int, default=2**26,
                   help="most decoded pixels per request, all images together; more get 413 (default 2**26: "
                        "64 images of 1024x1024)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the reward worker waits for more requests to merge into a batch (default 5)")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request's headers, and again its body; slower clients "
                        "get 408 and are disconnected (default 30)")
    p.add_argument("--backlog", type=int, default=2048,
                   help="connections the kernel queues before the server accepts them (default 2048, capped by "
                        "net.core.somaxconn)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        reward = build_reward(args.name, **load_config_arg(args.reward_options))
        server = make_server(reward, args.host, args.port, token=resolve_secret(args.token), max_batch=args.max_batch,
                             max_bytes=args.max_bytes, max_pixels=args.max_pixels,
                             batch_wait_s=args.batch_wait_ms / 1000, read_timeout=args.read_timeout,
                             backlog=args.backlog)
    except (KeyError, TypeError, ValueError, OSError) as exc:  # bad name, options, paths, config or port
        print(f"flowgrpo serve-reward: error: {exc}", file=sys.stderr)
        return 2
    print(f"flowgrpo serve-reward: {reward.name} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    finally:
        server.app.close()
    return 0
