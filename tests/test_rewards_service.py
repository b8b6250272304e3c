"""The reward service and the remote client, against real HTTP servers started here.

`make_server` / `flowgrpo serve-reward` are the real service; `ScriptedServer` is a stand-in that speaks the
same protocol but misbehaves on cue (5xx, 429 and 4xx answers, garbage, timeouts, reset connections, dying
mid-batch). Hostile input to the real service is in test_rewards_service_hostile.py, its load test in
test_rewards_service_load.py.
"""
import base64
import http.client
import io
import json
import logging
import math
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowgrpo.rewards import build_reward
from flowgrpo.rewards.batching import BatchingScorer
from flowgrpo.rewards.http_client import image_to_png_b64, png_b64_to_image
from flowgrpo.rewards.remote import RemoteReward, RemoteRewardError
from flowgrpo.rewards.server import load_config_arg, make_server
from tests.service_helpers import Brightness, quantised


@pytest.fixture
def service():
    reward = Brightness()
    server = make_server(reward, token="s3cret", max_batch=3, max_bytes=200_000, read_timeout=1.0).start()
    yield server, reward
    server.close()


def raw_post(server, body: bytes, headers=None, path="/score"):
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    conn.request("POST", path, body=body, headers={"Authorization": "Bearer s3cret", **(headers or {})})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def test_png_codec_round_trip_is_exact_on_8bit_values():
    images = quantised(2, 5, 7)
    for img in images:
        assert torch.equal(png_b64_to_image(image_to_png_b64(img)), img)
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    with pytest.raises(ValueError, match="not a readable PNG"):
        png_b64_to_image(base64.b64encode(jpeg.getvalue()).decode())


def test_remote_client_scores_through_the_service(service):
    server, reward = service
    client = RemoteReward(server.url, token="s3cret", batch_size=4)
    images = quantised(5)
    prompts = ["a", "b", "unscorable c", "d", "e"]
    out = client(images, prompts, [{"i": i} for i in range(5)])
    expected = images.mean(dim=(1, 2, 3))
    assert torch.allclose(out[[0, 1, 3, 4]], expected[[0, 1, 3, 4]], atol=1e-6)
    assert math.isnan(out[2].item())
    assert all(b <= 3 for b in reward.batches) and sum(reward.batches) == 5  # chunks of 4 + 1, split to <= 3
    assert client.stats["requests"] == 2 and client.stats["nan"] == 1 and client.stats["failed_requests"] == 0


def test_service_groups_images_of_different_sizes(service):
    server, _ = service
    small, tall = quantised(1, 8, 8, seed=2)[0], quantised(1, 16, 4, seed=3)[0]
    body = json.dumps({"images": [image_to_png_b64(small), image_to_png_b64(tall), image_to_png_b64(small)],
                       "prompts": ["x", "y", "z"]}).encode()
    status, data = raw_post(server, body)
    assert status == 200
    assert data["rewards"] == pytest.approx([small.mean().item(), tall.mean().item(), small.mean().item()])


def test_service_health_auth_and_size_errors(service):
    server, _ = service
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200
    assert json.loads(resp.read()) == {"status": "ok", "reward": "brightness", "max_batch": 3, "max_bytes": 200_000}
    conn.close()
    images, prompts = quantised(2), ["a", "b"]
    with pytest.raises(RemoteRewardError, match=r"HTTP 401: .*missing or wrong bearer token.*set the reward's 'token'"):
        RemoteReward(server.url)(images, prompts)
    with pytest.raises(RemoteRewardError, match="HTTP 401"):
        RemoteReward(server.url, token="wrong")(images, prompts)
    big = quantised(16, 64, 64, seed=4)  # 16 x ~16 kB of incompressible base64 PNG > 200 kB
    with pytest.raises(RemoteRewardError, match=r"HTTP 413: .*exceeds the limit of 200000 bytes.*lower 'batch_size'"):
        RemoteReward(server.url, token="s3cret", batch_size=16)(big, ["p"] * 16)
    out = RemoteReward(server.url, token="s3cret", batch_size=2)(big, ["p"] * 16)  # small chunks fit
    assert torch.allclose(out, big.mean(dim=(1, 2, 3)), atol=1e-6)


def test_service_rejects_malformed_bodies_with_400(service):
    server, _ = service
    png = image_to_png_b64(quantised(1)[0])
    cases = [
        (b"{not json", "malformed request"),
        (json.dumps([1, 2]).encode(), "JSON object"),
        (json.dumps({"images": [png]}).encode(), "'prompts' must be a list of strings"),
        (json.dumps({"images": [png], "prompts": ["a", "b"]}).encode(), "1 images but 2 prompts"),
        (json.dumps({"images": ["%%%"], "prompts": ["a"]}).encode(), r"images\[0\]: not valid base64"),
        (json.dumps({"images": [png], "prompts": ["a"], "metadata": ["x"]}).encode(), "'metadata' must be a list"),
        (json.dumps({"images": [png], "prompts": ["a"], "pickle": "x"}).encode(), r"unknown key\(s\) \['pickle'\]"),
    ]
    for body, message in cases:
        status, data = raw_post(server, body)
        assert status == 400, (body, data)
        assert re.search(message, data["error"]), (message, data)
    status, data = raw_post(server, b"{}", path="/predict")
    assert status == 404 and "POST /score" in data["error"]
    with socket.create_connection(server.address, timeout=5) as sock:  # chunked: no Content-Length
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 411")


def test_reward_exception_is_500_and_client_goes_on(service, caplog):
    server, _ = service
    client = RemoteReward(server.url, token="s3cret", batch_size=2, retries=2, backoff=0.01)
    images = quantised(4)
    with caplog.at_level(logging.WARNING, logger="flowgrpo.rewards.remote"):
        out = client(images, ["boom", "b", "c", "d"])
    assert torch.isnan(out[:2]).all()  # the chunk with the failing prompt
    assert torch.allclose(out[2:], images[2:].mean(dim=(1, 2, 3)), atol=1e-6)
    assert client.stats["failed_requests"] == 1 and client.stats["failed_samples"] == 2
    assert client.stats["retries"] == 2
    assert any("2 sample(s) scored NaN" in r.message and "HTTP 500" in r.message for r in caplog.records)


def test_batching_scorer_merges_concurrent_requests():
    reward = Brightness()
    scorer = BatchingScorer(reward, max_batch=4, wait_s=0.3)
    images = list(quantised(6))
    results = {}

    def request(k, idx):
        futures = scorer.submit([images[i] for i in idx], [f"p{i}" for i in idx], [{} for _ in idx])
        results[k] = [v for f in futures for v in f.result()]

    threads = [threading.Thread(target=request, args=(k, idx)) for k, idx in enumerate([[0], [1, 2], [3, 4, 5]])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    scorer.close()
    expected = torch.stack(images).mean(dim=(1, 2, 3)).tolist()
    assert results[0] == pytest.approx(expected[:1]) and results[1] == pytest.approx(expected[1:3])
    assert results[2] == pytest.approx(expected[3:])
    assert sum(reward.batches) == 6 and max(reward.batches) <= 4 and len(reward.batches) < 3  # merged


# ---------------------------------------------------------------- stand-in server that misbehaves on cue

class ScriptedServer(ThreadingHTTPServer):
    """Answers POST /score per a script of behaviours, one per request; 'ok' once the script runs out."""

    daemon_threads = True

    def __init__(self, script):
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.script, self.seen = list(script), []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://%s:%d" % self.server_address[:2]

    def die(self):
        threading.Thread(target=lambda: (self.shutdown(), self.server_close())).start()


class _ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        action = self.server.script.pop(0) if self.server.script else "ok"
        self.server.seen.append(action)
        rewards = [png_b64_to_image(b).mean().item() for b in body["images"]]
        if action == "drop_and_die":  # crash mid-batch: no answer, then nobody listens on the port
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            self.server.die()
            return
        if action == "reset":  # drop the connection with a TCP reset, as an overflowing listen backlog does
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        if action == "sleep":
            time.sleep(1.0)
        if action.isdigit():  # an error status
            status, payload = int(action), json.dumps({"error": f"scripted {action}"}).encode()
        else:
            status, payload = 200, {
                "ok": json.dumps({"rewards": rewards}), "sleep": json.dumps({"rewards": rewards}),
                "garbage": "<html>502 Bad Gateway</html>", "short": json.dumps({"rewards": rewards[:-1]}),
                "strings": json.dumps({"rewards": ["high"] * len(rewards)}),
            }[action].encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def scripted():
    servers = []

    def start(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for s in servers:
        if s.socket.fileno() != -1:
            s.shutdown()
            s.server_close()


def test_client_retries_through_500_garbage_and_bad_answers(scripted):
    server = scripted(["500", "garbage", "short", "strings", "ok"])
    client = RemoteReward(server.url, retries=4, backoff=0.01)
    images = quantised(3)
    out = client(images, ["a", "b", "c"])
    assert torch.allclose(out, images.mean(dim=(1, 2, 3)), atol=1e-6)
    assert server.seen == ["500", "garbage", "short", "strings", "ok"]
    assert client.stats["retries"] == 4 and client.stats["failed_requests"] == 0 and client.stats["nan"] == 0


def test_client_retries_resets_and_overload_answers(scripted):
    server = scripted(["reset", "429", "503", "reset", "502", "ok"])
    client = RemoteReward(server.url, retries=5, backoff=0.01)
    images = quantised(3)
    out = client(images, ["a", "b", "c"])
    assert torch.allclose(out, images.mean(dim=(1, 2, 3)), atol=1e-6)
    assert server.seen == ["reset", "429", "503", "reset", "502", "ok"]
    assert client.stats["retries"] == 5 and client.stats["failed_requests"] == 0 and client.stats["nan"] == 0


def test_client_backoff_is_bounded_and_ends_in_nan(scripted, caplog):
    server = scripted(["reset"] * 4)
    client = RemoteReward(server.url, retries=3, backoff=10.0, max_backoff=0.05)  # steps of 10, 20, 40 s capped
    images = quantised(2)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flowgrpo.rewards.remote"):
        out = client(images, ["a", "b"])
    assert time.monotonic() - start < 1.0
    assert torch.isnan(out).all() and server.seen == ["reset"] * 4
    assert client.stats["retries"] == 3 and client.stats["failed_requests"] == 1 and client.stats["failed_samples"] == 2
    assert any("2 sample(s) scored NaN" in r.message and "ConnectionResetError" in r.message for r in caplog.records)


def test_client_retries_refused_connections_then_scores_nan():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = RemoteReward(f"http://127.0.0.1:{port}", retries=2, backoff=0.01)
    out = client(quantised(3), ["a", "b", "c"])
    assert torch.isnan(out).all()
    assert client.stats["retries"] == 2 and client.stats["failed_requests"] == 1 and client.stats["failed_samples"] == 3


@pytest.mark.parametrize("status, hint", [("400", ""), ("404", "without /score"), ("408", "raise --read-timeout"),
                                          ("413", "lower 'batch_size'")])
def test_client_never_retries_other_4xx(scripted, status, hint):
    server = scripted([status, "ok"])
    client = RemoteReward(server.url, retries=3, backoff=0.01)
    with pytest.raises(RemoteRewardError, match=rf"HTTP {status}: .*scripted {status}.*{re.escape(hint)}"):
        client(quantised(2), ["a", "b"])
    assert server.seen == [status] and client.stats["retries"] == 0


def test_client_survives_timeouts(scripted):
    server = scripted(["sleep", "ok"])
    client = RemoteReward(server.url, timeout=0.3, retries=1, backoff=0.01)
    images = quantised(2)
    assert torch.allclose(client(images, ["a", "b"]), images.mean(dim=(1, 2, 3)), atol=1e-6)
    assert client.stats["retries"] == 1
    server = scripted(["sleep"] * 3)
    client = RemoteReward(server.url, timeout=0.3, retries=2, backoff=0.01)
    start = time.monotonic()
    out = client(images, ["a", "b"])
    assert torch.isnan(out).all() and client.stats["failed_requests"] == 1 and client.stats["failed_samples"] == 2
    assert time.monotonic() - start < 2.5  # 3 attempts x 0.3 s timeout + backoff, not 3 x 1 s


def test_client_survives_server_dying_mid_batch(scripted, caplog):
    server = scripted(["ok", "drop_and_die"])
    client = RemoteReward(server.url, batch_size=2, retries=2, backoff=0.01)
    images = quantised(6)
    with caplog.at_level(logging.WARNING, logger="flowgrpo.rewards.remote"):
        out = client(images, list("abcdef"))
    assert torch.allclose(out[:2], images[:2].mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.isnan(out[2:]).all()
    assert client.stats["failed_requests"] == 2 and client.stats["failed_samples"] == 4 and client.stats["nan"] == 4
    assert sum("scored NaN" in r.message for r in caplog.records) == 2


def test_client_rejects_non_json_metadata_and_bad_url():
    with pytest.raises(ValueError, match="http://host:8000"):
        RemoteReward("localhost:8000")
    client = RemoteReward("http://127.0.0.1:9")
    with pytest.raises(TypeError, match="metadata must be plain JSON"):
        client(quantised(1), ["a"], [{"t": torch.zeros(1)}])


# ---------------------------------------------------------------- the CLI end to end

def test_config_argument_inline_json_or_file(tmp_path):
    (tmp_path / "ocr.yaml").write_text("num_threads: 1\ncase_sensitive: true\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert load_config_arg('{"num_threads": 2}') == {"num_threads": 2}
    assert load_config_arg(str(tmp_path / "ocr.yaml")) == {"num_threads": 1, "case_sensitive": True}
    assert load_config_arg(None) == {}
    with pytest.raises(FileNotFoundError, match="neither inline JSON nor an existing file"):
        load_config_arg(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config_arg(str(tmp_path / "list.json"))


def render(words):
    img = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(img).text((12, 24), words, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def test_serve_reward_cli_serves_ocr_with_token(monkeypatch):
    env = {**os.environ, "FLOWGRPO_TEST_TOKEN": "tok-123", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flowgrpo.cli", "serve-reward", "ocr", "--port", "0",
                             "--token", "env:FLOWGRPO_TEST_TOKEN", "--reward-options", '{"num_threads": 1}'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "flowgrpo serve-reward: ocr on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split(" on ")[1].strip()
        monkeypatch.setenv("FLOWGRPO_TEST_TOKEN", "tok-123")
        client = build_reward("remote", url=url, token="env:FLOWGRPO_TEST_TOKEN", timeout=30)
        out = client(torch.stack([render("HELLO"), render("HELLO")]),
                     ['a sign that says "HELLO"', "no quotes here"])
        assert out[0].item() == 1.0 and math.isnan(out[1].item())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, "-m", "flowgrpo.cli", "serve-reward", "nope"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "unknown reward 'nope'; known rewards:" in bad.stderr
