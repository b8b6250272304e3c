"""A small reward and raw-socket helpers shared by the reward-service tests."""
import json
import socket
import time

import torch

from flowgrpo.rewards import Reward


class Brightness(Reward):
    """Mean pixel value; NaN for prompts saying 'unscorable'; raises for 'boom'. Records its batch sizes."""

    name = "brightness"

    def __init__(self):
        super().__init__()
        self.batches = []

    def score(self, images, prompts, metadata):
        self.batches.append(len(prompts))
        if "boom" in prompts:
            raise RuntimeError("boom prompt")
        out = images.mean(dim=(1, 2, 3))
        return torch.where(torch.tensor(["unscorable" in p for p in prompts]), torch.nan, out)


def quantised(n, h=8, w=8, seed=0):
    """n random images with 8-bit values, so a PNG round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255


class RawConnection:
    """One TCP connection speaking raw bytes, reading HTTP responses off it one at a time."""

    def __init__(self, address, timeout=10.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes, drip_s: float = 0.0) -> None:
        """Send ``data`` at once, or a byte every ``drip_s`` seconds (stopping quietly once the server hangs up)."""
        if not drip_s:
            self.sock.sendall(data)
            return
        for i in range(len(data)):
            try:
                self.sock.sendall(data[i:i + 1])
            except OSError:
                return
            time.sleep(drip_s)

    def response(self) -> tuple[int, dict, dict]:
        """(status, lower-cased headers, JSON body) of the next response."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, json.loads(body)

    def closed_by_server(self, wait_s: float = 1.0) -> bool:
        """Whether the server hangs up within ``wait_s`` (sending nothing more)."""
        self.sock.settimeout(wait_s)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"server closed the connection; unparsed: {self.buffer[:200]!r}")
        self.buffer += chunk


def post_bytes(body: bytes, token: str | None = "s3cret", path: str = "/score", length: int | None = None) -> bytes:
    """A raw POST request; ``length`` overrides the true Content-Length (a lying client)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    size = len(body) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: reward\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode() + body
