"""One worker thread that runs a reward, merging queued requests into batches.

The reward is never called concurrently (a GPU reward holds one model), and requests that arrive together share
one call: the worker waits up to ``wait_s`` after the first queued job for more, up to ``max_batch`` images.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from flowgrpo.rewards.base import RewardFn


@dataclass
class _Job:
    images: list[torch.Tensor]
    prompts: list[str]
    metadata: list[dict]
    future: Future = field(default_factory=Future)


class BatchingScorer:
    """Runs the reward on one worker thread, merging queued jobs into batches of at most ``max_batch`` images."""

    def __init__(self, reward: RewardFn, max_batch: int = 32, wait_s: float = 0.005) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.reward, self.max_batch, self.wait_s = reward, max_batch, wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._carry: _Job | None = None
        self._worker = threading.Thread(target=self._run, name="reward-worker", daemon=True)
        self._worker.start()

    def submit(self, images: list[torch.Tensor], prompts: list[str], metadata: list[dict]) -> list[Future]:
        """Queue one request, split into jobs of at most ``max_batch`` images; each future gives its jobs' rewards
        (a list of floats, NaN = unscorable) or the reward's exception."""
        jobs = [_Job(images[s:s + self.max_batch], prompts[s:s + self.max_batch], metadata[s:s + self.max_batch])
                for s in range(0, len(images), self.max_batch)]
        for job in jobs:
            self._queue.put(job)
        return [job.future for job in jobs]

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _next_batch(self) -> list[_Job] | None:
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch, total = [first], len(first.images)
        deadline = time.monotonic() + self.wait_s
        while total < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            if total + len(job.images) > self.max_batch:
                self._carry = job  # starts the next batch
                break
            batch.append(job)
            total += len(job.images)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                results = self._score([img for j in batch for img in j.images], [p for j in batch for p in j.prompts],
                                      [m for j in batch for m in j.metadata])
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].future.set_exception(exc)
                    continue
                # Score each request on its own so one bad request does not fail the others merged with it.
                for job in batch:
                    try:
                        job.future.set_result(self._score(job.images, job.prompts, job.metadata))
                    except Exception as job_exc:
                        job.future.set_exception(job_exc)
                continue
            start = 0
            for job in batch:
                job.future.set_result(results[start:start + len(job.images)])
                start += len(job.images)

    def _score(self, images: list[torch.Tensor], prompts: list[str], metadata: list[dict]) -> list[float]:
        out = [math.nan] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape[1:]), []).append(i)
        for idx in by_size.values():  # the reward contract needs one [B,3,H,W] tensor per call
            values = self.reward(torch.stack([images[i] for i in idx]), [prompts[i] for i in idx],
                                 [metadata[i] for i in idx])
            for i, v in zip(idx, values.tolist()):
                out[i] = v
        return out
