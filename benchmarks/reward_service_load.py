"""Concurrent clients against `flowgrpo serve-reward shapes`: failed requests and images/s, next to the reward's
own in-process batch throughput on the same images, both measured in one run.

    HF_HUB_OFFLINE=1 python benchmarks/reward_service_load.py --clients 128 --requests 3 --images 8 \
        --out benchmarks/results/reward_service_load.json

Each client is a thread posting 8 rendered Shapes images (test-split prompts with their GenEval metadata) per
request through the project's HTTP client with no retries, so a reset or refused connection counts as a failed
request. All clients start together behind a barrier, as every rank of a run does. Images are PNG-encoded before
the clock starts; the server (started here as a subprocess, or one already running at --url) decodes and scores
them. Every answer is checked against the in-process rewards of the same images. The in-process figure is the
reward alone, called in batches of --max-batch on already decoded images in this process, measured before and
after the load (their gap is the machine's drift during the run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from flowgrpo.prompts.shapes import load_split
from flowgrpo.rewards import build_reward
from flowgrpo.rewards.http_client import HttpStatusError, RequestFailed, image_to_png_b64, post_json
from flowgrpo.rewards.remote import parse_rewards
from flowgrpo.shapes.render import render


def shapes_images(n: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """n rendered test-split images [n,3,32,32] in [0,1] (8-bit values, so PNG round trips exactly) and the metadata
    they are scored against: every other image is drawn for another prompt, so the rewards vary."""
    entries = load_split("test")
    rng = np.random.default_rng(seed)
    drawn, asked = rng.integers(len(entries), size=(2, n))
    pixels = np.stack([render(entries[i], rng) for i in drawn])
    metadata = [entries[a if k % 2 else d] for k, (d, a) in enumerate(zip(drawn, asked))]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, metadata


def in_process(reward, images: torch.Tensor, metadata: list[dict], batch: int) -> tuple[list[float], float]:
    """Rewards of every image and images/s, calling the reward on batches of ``batch`` after one warm-up batch."""
    prompts = [m["prompt"] for m in metadata]
    reward(images[:batch], prompts[:batch], metadata[:batch])
    start = time.perf_counter()
    values = [v for s in range(0, len(images), batch)
              for v in reward(images[s:s + batch], prompts[s:s + batch], metadata[s:s + batch]).tolist()]
    return values, len(images) / (time.perf_counter() - start)


def start_server(max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "flowgrpo.cli", "serve-reward", "shapes", "--port", "0", "--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise RuntimeError(f"serve-reward did not start: {line!r}")
    return proc, line.split(" on ")[1].strip()


def run_clients(url: str, payloads: list[list[dict]], timeout: float) -> tuple[list[dict], float]:
    """One thread per client, each posting its payloads in turn; all start together. Returns one record per request
    (client, request, ok, rewards or reason, seconds) and the wall time from the barrier to the last answer."""
    records: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(payloads) + 1)

    def client(c: int) -> None:
        barrier.wait()
        for r, payload in enumerate(payloads[c]):
            t0 = time.perf_counter()
            try:
                values = post_json(url + "/score", payload, timeout=timeout, retries=0,
                                   validate=lambda a, n=len(payload["images"]): parse_rewards(a, n))
                record = {"client": c, "request": r, "ok": True, "rewards": values}
            except RequestFailed as exc:
                record = {"client": c, "request": r, "ok": False, "reason": exc.reason.split(":")[0]}
            except HttpStatusError as exc:
                record = {"client": c, "request": r, "ok": False, "reason": f"HTTP {exc.status}"}
            record["seconds"] = time.perf_counter() - t0
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(payloads))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return records, time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "unknown")
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=128, help="concurrent clients (threads)")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after the other")
    ap.add_argument("--images", type=int, default=8, help="images per request")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch and the in-process batch")
    ap.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, seconds")
    ap.add_argument("--url", help="load an already running service instead of starting `flowgrpo serve-reward shapes`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the figures and the machine as JSON")
    args = ap.parse_args()

    info = machine()
    n = args.clients * args.requests * args.images
    images, metadata = shapes_images(n, args.seed)
    reward = build_reward("shapes")
    expected, reward_ips = in_process(reward, images, metadata, args.max_batch)
    encoded = [image_to_png_b64(img) for img in images]

    def first(c: int, r: int) -> int:  # index of the first image of client c's request r
        return (c * args.requests + r) * args.images

    payloads = [[{"images": encoded[first(c, r):first(c, r) + args.images],
                  "prompts": [m["prompt"] for m in metadata[first(c, r):first(c, r) + args.images]],
                  "metadata": metadata[first(c, r):first(c, r) + args.images]} for r in range(args.requests)]
                for c in range(args.clients)]

    proc, url = (None, args.url) if args.url else start_server(args.max_batch)
    try:
        post_json(url + "/score", payloads[0][0], timeout=args.timeout, retries=5)  # warm-up, once the server answers
        pids = {"clients": os.getpid(), **({"server": proc.pid} if proc else {})}
        cpu_before = {k: cpu_seconds(pid) for k, pid in pids.items()}
        records, wall = run_clients(url, payloads, args.timeout)
        cores_busy = {k: (cpu_seconds(pid) - cpu_before[k]) / wall for k, pid in pids.items()}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    _, reward_ips_after = in_process(reward, images, metadata, args.max_batch)  # the machine's drift over the run

    ok = [r for r in records if r["ok"]]
    wrong = sum(r["rewards"] != expected[first(r["client"], r["request"]):][:args.images] for r in ok)
    latencies = sorted(r["seconds"] for r in records)
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "clients": args.clients, "requests_per_client": args.requests, "images_per_request": args.images,
        "requests": len(records), "failed": len(records) - len(ok), "wrong_rewards": wrong,
        "mean_reward": sum(expected) / len(expected),
        "failure_reasons": dict(Counter(r["reason"] for r in records if not r["ok"])),
        "wall_seconds": wall, "service_images_per_s": len(ok) * args.images / wall,
        "in_process_images_per_s": {"before": reward_ips, "after": reward_ips_after},
        "cores_busy_during_load": cores_busy,  # CPU seconds per wall second of this process and the server's
        "latency_s": {"p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))],
                      "max": latencies[-1]},
        "machine": {**info, "load_average_at_end": os.getloadavg()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
