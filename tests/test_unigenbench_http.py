"""Judging through a real local HTTP server speaking the OpenAI chat-completions API.

The server is a stand-in for a vLLM-served judge: it decodes the image it is sent, recognises which
benchmark image it is, checks the prompt text, and answers in the UniGenBench format — or, on plan,
with wrong-length scores, no tags, HTTP 500, a reply slower than the client's timeout, or not at all.
It counts the valid answers it delivers per image, which is how "judged exactly once" is checked.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from flowgrpo.eval.judge import ChatJudge
from flowgrpo.eval.unigenbench import run_unigenbench
from flowgrpo.eval.unigenbench_data import PromptRow, load_prompts

FIXTURES = Path(__file__).parent / "fixtures"
PROMPTS = FIXTURES / "unigenbench_en_small.csv"
MODEL = "unified-reward-7b"


def expected_scores(index: int, j: int, count: int) -> list[int]:
    return [int((index + j + k) % 3 != 0) for k in range(count)]


def pixel_key(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def make_images(rows: list[PromptRow], folder: Path, n: int) -> dict[str, tuple[int, int]]:
    """Distinct pictures {index}_{j}.png; returns pixel hash -> (index, j) for the server."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = {}
    for r in rows:
        for j in range(n):
            img = Image.new("RGB", (20, 20), (40 * j, 25 * r.index, 90))
            ImageDraw.Draw(img).ellipse((2 + r.index, 2 + j, 12 + r.index, 12 + j), fill=(250, 200 - 30 * j, 10 * r.index))
            img.save(folder / f"{r.index}_{j}.png")
            keys[pixel_key(img)] = (r.index, j)
    assert len(keys) == len(rows) * n
    return keys


class StandInJudge:
    """OpenAI-compatible judge on 127.0.0.1 with a per-image plan of misbehaviours."""

    def __init__(self, rows, keys, plan=None, api_key=None, slow_seconds=3.0, deliver_limit=None, die_after=None):
        self.rows, self.keys, self.plan = {r.index: r for r in rows}, keys, plan or {}
        self.api_key, self.slow_seconds = api_key, slow_seconds
        self.deliver_limit, self.die_after = deliver_limit, die_after
        self.hits: dict[tuple[int, int], list[str]] = defaultdict(list)
        self.lock, self.release = threading.Lock(), threading.Event()
        self.server = None

    def delivered(self, key) -> int:
        return self.hits[key].count("ok")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, port: int = 0) -> StandInJudge:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_json(self, status, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed

            def do_POST(self):
                judge.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()  # new connections are refused from here on

    def handle(self, h):
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        if h.path != "/v1/chat/completions":
            return h.send_json(404, {"error": {"message": f"no route {h.path}"}})
        if self.api_key and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return h.send_json(401, {"error": {"message": "invalid api key"}})
        if body.get("model") != MODEL:
            return h.send_json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
        (content,) = [m["content"] for m in body["messages"] if m["role"] == "user"]
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        text = next(p["text"] for p in content if p["type"] == "text")
        assert url.startswith("data:image/png;base64,")
        key = self.keys[pixel_key(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))]
        row = self.rows[key[0]]
        if row.prompt not in text or not all(f"{t.name}: {d}" in text for t, d in zip(row.testpoints, row.descriptions)):
            return h.send_json(400, {"error": {"message": "prompt text does not describe the testpoints"}})
        with self.lock:
            todo = self.plan.get(key)
            kind = todo.pop(0) if todo else "ok"
            if kind == "ok" and self.deliver_limit is not None and sum(map(self.delivered, list(self.hits))) >= self.deliver_limit:
                kind = "blocked"
            self.hits[key].append(kind)
            dying = kind == "ok" and self.die_after is not None and sum(map(self.delivered, list(self.hits))) >= self.die_after
        scores = expected_scores(*key, len(row.testpoints))
        if kind == "blocked":
            self.release.wait(60)
            return h.send_json(503, {"error": {"message": "stopped"}})
        if kind == "500":
            return h.send_json(500, {"error": {"message": "CUDA out of memory"}})
        if kind == "slow":
            time.sleep(self.slow_seconds)
        answer = {
            "ok": scores, "slow": scores, "short": scores + [1],
        }.get(kind)
        analysis = json.dumps([f"checked {t.name}" for t in row.testpoints])
        content = ("The picture shows shapes." if kind == "notags" else
                   f"<description>\n<prompt>{row.prompt}</prompt>\n<analysis>{analysis}</analysis>\n"
                   f"<score>{json.dumps(answer)}</score>\n</description>")
        h.send_json(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                       "finish_reason": "stop"}]})
        if dying:
            threading.Thread(target=self.stop).start()


@pytest.fixture
def bench(tmp_path):
    rows = load_prompts(PROMPTS)
    return rows, make_images(rows, tmp_path / "images", 4)


def expected_tallies(rows, n, skip=()):
    tallies: dict[str, list[int]] = {}
    for r in rows:
        for j in range(n):
            if (r.index, j) in skip:
                continue
            for tp, s in zip(r.testpoints, expected_scores(r.index, j, len(r.testpoints))):
                t = tallies.setdefault(tp.primary, [0, 0])
                t[0] += s
                t[1] += 1
    return {k: tuple(v) for k, v in sorted(tallies.items())}


def test_malformed_answers_are_retried_and_failures_never_scored(tmp_path, bench):
    rows, keys = bench
    plan = {(0, 0): ["short", "ok"], (1, 0): ["notags", "ok"], (2, 1): ["500", "500", "ok"],
            (3, 0): ["slow", "ok"], (4, 1): ["short", "notags", "short"]}
    server = StandInJudge(rows, keys, plan, slow_seconds=2.5).start()
    judge = ChatJudge(server.url, MODEL, timeout=1.0, max_attempts=3, backoff=0.01)
    try:
        summary = run_unigenbench(rows, tmp_path / "out", judge, images_dir=tmp_path / "images", n=2, concurrency=3)
        first_hits = {k: list(v) for k, v in server.hits.items()}
        with open(tmp_path / "out" / "results.csv", newline="") as f:
            results = {(int(r["index"]), int(r["j"])): r for r in csv.DictReader(f)}
        report = (tmp_path / "out" / "report.md").read_text()
        # Rerun: only the failed image is sent again, and now gets a valid answer.
        again = run_unigenbench(rows, tmp_path / "out", judge, images_dir=tmp_path / "images", n=2, concurrency=3)
    finally:
        server.stop()
    assert first_hits[(0, 0)] == ["short", "ok"] and first_hits[(2, 1)] == ["500", "500", "ok"]
    assert first_hits[(3, 0)] == ["slow", "ok"] and first_hits[(4, 1)] == ["short", "notags", "short"]
    assert summary["images"] == {"expected": 10, "judged": 9, "failed": 1}
    (failure,) = summary["failures"]
    assert (failure["index"], failure["j"]) == (4, 1) and "unparseable answer: 3 scores for 2 testpoints" in failure["error"]
    got = {k: (v["correct"], v["total"]) for k, v in summary["primary_dimensions"].items()}
    assert got == expected_tallies(rows, 2, skip={(4, 1)})
    assert sum(t for _, t in got.values()) == 2 * 14 - 2  # testpoints x judged images
    assert len(results) == 10 and results[(4, 1)]["scores"] == "" and "gave up after 3 attempts" in results[(4, 1)]["error"]
    assert results[(0, 0)]["attempts"] == "2" and json.loads(results[(0, 0)]["scores"]) == expected_scores(0, 0, 4)
    assert "<score>[0, 1, 1, 0]</score>" in results[(0, 0)]["judge_output"]
    assert "`4_1.png`" in report and "failed: 1" in report
    # After the rerun every image has exactly one valid answer delivered, and all are scored.
    assert all(server.delivered((r.index, j)) == 1 for r in rows for j in range(2))
    assert server.hits[(4, 1)] == ["short", "notags", "short", "ok"]
    assert again["images"] == {"expected": 10, "judged": 10, "failed": 0}
    got = {k: (v["correct"], v["total"]) for k, v in again["primary_dimensions"].items()}
    assert got == expected_tallies(rows, 2)
    accs = [c / t for c, t in got.values()]
    assert again["overall"] == pytest.approx(sum(accs) / len(accs))
    assert len((tmp_path / "out" / "progress.jsonl").read_text().splitlines()) == 11  # 10 + the retried failure


def test_server_dying_mid_run_then_restarting(tmp_path, bench):
    rows, keys = bench
    server = StandInJudge(rows, keys, die_after=6).start()
    judge = ChatJudge(server.url, MODEL, timeout=2.0, max_attempts=2, backoff=0.01)
    first = run_unigenbench(rows, tmp_path / "out", judge, images_dir=tmp_path / "images", n=4, concurrency=2)
    done = sum(server.delivered((r.index, j)) for r in rows for j in range(4))
    assert done >= 6 and first["images"] == {"expected": 20, "judged": done, "failed": 20 - done}
    assert all("gave up after 2 attempts" in f["error"] for f in first["failures"])
    server.die_after = None
    server.start(port=server.port)  # same URL: the same call resumes
    try:
        second = run_unigenbench(rows, tmp_path / "out", judge, images_dir=tmp_path / "images", n=4, concurrency=2)
    finally:
        server.stop()
    assert [server.delivered((r.index, j)) for r in rows for j in range(4)] == [1] * 20
    assert second["images"] == {"expected": 20, "judged": 20, "failed": 0}
    assert {k: (v["correct"], v["total"]) for k, v in second["primary_dimensions"].items()} == expected_tallies(rows, 4)


def cli(out: Path, images: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flowgrpo.cli", "eval", "unigenbench", "--prompts", str(PROMPTS),
            "--images", str(images), "--out", str(out), "--judge-url", url, "--judge-model", MODEL,
            "--judge-api-key-env", "UGB_TEST_KEY", "--concurrency", "3", "--judge-timeout", "5",
            "--judge-attempts", "3", "--judge-backoff", "0.05", *extra]


def test_killed_cli_run_resumes_without_judging_twice(tmp_path, bench):
    rows, keys = bench
    server = StandInJudge(rows, keys, plan={(0, 1): ["notags", "ok"], (2, 2): ["500", "ok"]},
                          api_key="sekret", deliver_limit=7).start()
    env = {**os.environ, "UGB_TEST_KEY": "sekret", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = cli(tmp_path / "out", tmp_path / "images", server.url)
    progress = tmp_path / "out" / "progress.jsonl"
    try:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (progress.exists() and len(progress.read_text().splitlines()) >= 7):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # the run dies with requests in flight
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert len(progress.read_text().splitlines()) == 7
        server.deliver_limit = None
        server.release.set()
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.release.set()
        server.stop()
    assert rerun.returncode == 0, rerun.stderr
    assert "20/20 images judged, 0 failed" in rerun.stdout
    assert [server.delivered((r.index, j)) for r in rows for j in range(4)] == [1] * 20
    assert server.hits[(0, 1)][0] == "notags" and server.hits[(2, 2)][0] == "500"
    lines = [json.loads(x) for x in progress.read_text().splitlines()]
    assert sorted((x["index"], x["j"]) for x in lines) == [(r.index, j) for r in rows for j in range(4)]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    got = {k: (v["correct"], v["total"]) for k, v in summary["primary_dimensions"].items()}
    assert got == expected_tallies(rows, 4) and sum(t for _, t in got.values()) == 4 * 14
    assert sum(v["total"] for v in summary["sub_dimensions"].values()) == 4 * 14
    assert summary["overall"] == pytest.approx(sum(c / t for c, t in got.values()) / len(got))
    assert all(" " not in (k[0] + k[-1]) for k in list(summary["primary_dimensions"]) + list(summary["sub_dimensions"]))


def test_cli_configuration_errors(tmp_path, bench, monkeypatch, capsys):
    from flowgrpo.cli import main

    rows, keys = bench
    server = StandInJudge(rows, keys, api_key="sekret").start()
    args = lambda out, images=tmp_path / "images": cli(tmp_path / out, images, server.url)[3:]  # noqa: E731
    try:
        monkeypatch.setenv("UGB_TEST_KEY", "wrong")
        assert main(args("a")) == 2 and "HTTP 401" in capsys.readouterr().err
        monkeypatch.setenv("UGB_TEST_KEY", "sekret")
        command = args("b")
        command[command.index(MODEL)] = "no-such-model"
        assert main(command) == 2 and "The model `no-such-model` does not exist" in capsys.readouterr().err
    finally:
        server.stop()
    assert sum(map(len, server.hits.values())) == 0  # refused before any image was judged
    assert main(args("d", tmp_path / "nowhere") + ["--images-per-prompt", "2"]) == 2
    assert "10 of 10 images missing" in capsys.readouterr().err
    monkeypatch.delenv("UGB_TEST_KEY")
    assert main(args("c")) == 2 and "UGB_TEST_KEY: that environment variable is not set" in capsys.readouterr().err
    bare = ["eval", "unigenbench", "--prompts", str(PROMPTS), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "e")]
    assert main(bare + ["--judge-backend", "chat"]) == 2 and "needs --judge-url and --judge-model" in capsys.readouterr().err
    # Without a judge URL the default is the Shapes verifier, which only takes Shapes prompts.
    assert main(bare) == 2 and "prompt 0 has no Shapes metadata" in capsys.readouterr().err


def test_unreachable_judge_records_failures_not_scores(tmp_path, bench):
    rows, _ = bench
    probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = probe.server_address[1]
    probe.server_close()  # nothing listens on this port now
    judge = ChatJudge(f"http://127.0.0.1:{port}/v1", MODEL, timeout=1.0, max_attempts=2, backoff=0.01)
    summary = run_unigenbench(rows[:2], tmp_path / "out", judge, images_dir=tmp_path / "images", n=1)
    assert summary["images"] == {"expected": 2, "judged": 0, "failed": 2}
    assert summary["primary_dimensions"] == {} and summary["overall"] is None
    assert all("gave up after 2 attempts" in f["error"] for f in summary["failures"])
    assert "n/a" in (tmp_path / "out" / "report.md").read_text()
