"""VLM judges over an OpenAI-compatible chat endpoint: a pointwise score and a pairwise preference.

Pointwise (``vlm``): the judge rates image-vs-prompt on 0..``max_score``; the reward is score / max_score in
[0, 1]. Answers without a readable score are NaN and counted (``stats["unparseable"]``); requests that keep
failing are NaN and counted (``stats["failed_requests"]``).

Pairwise (``vlm_pairwise``): an UnifiedReward-Think-style prompt asks for reasoning in <think> and a verdict
"Image 1 is better" / "Image 2 is better" in <answer>, read as Pref-GRPO's code reads it (`parse_verdict`).
Image 1 is ``images_a[i]``. Ties, unreadable verdicts and failed requests count as 0.5 (no preference) and are
counted separately.
"""
from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor

import torch

from flowgrpo.rewards.base import PairwiseJudge, Reward
from flowgrpo.rewards.http_client import RequestFailed
from flowgrpo.rewards.openai_chat import ChatClient, image_part, text_part

logger = logging.getLogger(__name__)

POINTWISE_TEMPLATE = (
    "You are grading an image produced by a text-to-image model.\n"
    'Prompt: "{prompt}"\n'
    "Judge how completely and accurately the image shows what the prompt asks for (objects, counts, colours, "
    "positions, text) and how good it looks. Give a brief justification, then finish with one line exactly of "
    "the form 'Score: N' where N is a number from 0 to {max_score}."
)

PAIRWISE_TEMPLATE = (
    "You are given a text caption and two images generated from it. Compare the two images carefully on "
    "several dimensions: semantic consistency (how well the content matches the caption), aesthetics "
    "(composition, colour, artistic quality), authenticity (realism, detail) and anything else that matters. "
    "For each dimension give both images a score from 1 to 10 (e.g. Image 1: 8/10, Image 2: 6/10) with a short "
    "reason, then add up each image's total. Put all of this step-by-step reasoning inside <think> and </think>. "
    "After that, inside <answer> and </answer>, write exactly one of 'Image 1 is better' or 'Image 2 is better', "
    "following the totals, and nothing else.\n\n"
    "Example of the format (the numbers and verdict are placeholders):\n"
    "<think>\n1. Semantic consistency: Image 1 (9/10) - ...; Image 2 (7/10) - ...\n...\n"
    "Total score:\nImage 1: 9+8+7=24\nImage 2: 7+6+8=21\n</think>\n<answer>Image 1 is better</answer>\n\n"
    "Caption: [{prompt}]"
)

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER_ONLY = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+(?:\.\d+)?)?\s*$")
_IMAGE_BETTER = re.compile(r"image\s*([12])\s+is\s+better", re.IGNORECASE)
_TIE = re.compile(r"\b(tie|equal(ly)?|same|neither|both)\b", re.IGNORECASE)


def parse_score(text: str, max_score: float) -> float | None:
    """The score in [0, max_score] from a judge answer, or None.

    Reads the <answer> block when there is one (a bare number or 'Score: N'); otherwise the last 'Score: N'.
    """
    block = _ANSWER.search(text)
    region = block.group(1) if block else text
    bare = _NUMBER_ONLY.match(region)
    hits = [bare.group(1)] if bare else _SCORE.findall(region)
    if not hits:
        return None
    value = float(hits[-1])
    return value if 0 <= value <= max_score else None


VERDICT_RULES = ("reference", "strict")
_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_verdict(text: str, rule: str = "reference") -> float | None:
    """1.0 if Image 1 wins, 0.0 if Image 2 wins, 0.5 for a tie, None if unreadable.

    ``reference`` (Pref-GRPO's UnifiedReward-Think parsing, fastvideo/rewards/unifiedreward_think.py): the first
    <answer> block, stripped; "Image 1 is better" in it wins, else "Image 2 is better", else a tie; exact case; no
    <answer> block is unreadable (the reference counts it 0.5, as the judge does). ``strict``: case-insensitive,
    the <answer> block or else the whole text, which must name a single winner; a stated tie in <answer> is 0.5.
    """
    if rule == "reference":
        block = _FIRST_ANSWER.search(text)
        if block is None:
            return None
        answer = block.group(1).strip()
        return 1.0 if "Image 1 is better" in answer else 0.0 if "Image 2 is better" in answer else 0.5
    if rule != "strict":
        raise ValueError(f"verdict rule must be one of {VERDICT_RULES}, got {rule!r}")
    block = _ANSWER.search(text)
    region = block.group(1) if block else text
    winners = {m.group(1) for m in _IMAGE_BETTER.finditer(region)}
    if winners == {"1"}:
        return 1.0
    if winners == {"2"}:
        return 0.0
    if not winners and block and _TIE.search(region):
        return 0.5
    return None


def _chat_client(base_url: str, model: str, api_key: str | None, timeout: float, retries: int, backoff: float,
                 max_tokens: int, temperature: float) -> ChatClient:
    return ChatClient(base_url, model, api_key=api_key, timeout=timeout, retries=retries, backoff=backoff,
                      max_tokens=max_tokens, temperature=temperature)


class VlmScore(Reward):
    """Pointwise VLM judge: one chat request per image, ``concurrency`` requests in flight."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_score: float = 10.0,
                 template: str = POINTWISE_TEMPLATE, concurrency: int = 8, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0, max_tokens: int = 1024, temperature: float = 0.0, name: str = "vlm") -> None:
        super().__init__()
        if max_score <= 0 or concurrency < 1:
            raise ValueError(f"need max_score > 0 and concurrency >= 1, got {max_score}, {concurrency}")
        if "{prompt}" not in template:
            raise ValueError("template must contain a {prompt} placeholder")
        self.client = _chat_client(base_url, model, api_key, timeout, retries, backoff, max_tokens, temperature)
        self.max_score, self.template, self.concurrency, self.name = float(max_score), template, concurrency, name

    def _one(self, image: torch.Tensor, prompt: str) -> float:
        text = self.template.format(prompt=prompt, max_score=f"{self.max_score:g}")
        try:
            answer = self.client.complete([image_part(image), text_part(text)],
                                          on_retry=lambda reason: self.count("retries"))
        except RequestFailed as exc:
            self.count("failed_requests")
            logger.warning("vlm reward %s: request failed, sample scored NaN: %s", self.name, exc)
            return float("nan")
        value = parse_score(answer, self.max_score)
        if value is None:
            self.count("unparseable")
            logger.warning("vlm reward %s: no score in answer %r, sample scored NaN", self.name, answer[-200:])
            return float("nan")
        return value / self.max_score

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            scores = list(pool.map(self._one, images.cpu(), prompts))
        return torch.tensor(scores, dtype=torch.float32)


class VlmPairwiseJudge(PairwiseJudge):
    """Pairwise VLM judge; ``both_orders`` also asks with the images swapped and averages (cancels position bias);
    ``verdict_rule``: how an answer is read (`parse_verdict`: Pref-GRPO's own rule by default, or strict)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, template: str = PAIRWISE_TEMPLATE,
                 both_orders: bool = False, concurrency: int = 8, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0, max_tokens: int = 2048, temperature: float = 0.0,
                 verdict_rule: str = "reference", name: str = "vlm_pairwise") -> None:
        super().__init__()
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if verdict_rule not in VERDICT_RULES:
            raise ValueError(f"verdict_rule must be one of {VERDICT_RULES}, got {verdict_rule!r}")
        self.verdict_rule = verdict_rule
        if "{prompt}" not in template:
            raise ValueError("template must contain a {prompt} placeholder")
        self.client = _chat_client(base_url, model, api_key, timeout, retries, backoff, max_tokens, temperature)
        self.template, self.both_orders, self.concurrency, self.name = template, both_orders, concurrency, name

    def _ask(self, prompt: str, first: torch.Tensor, second: torch.Tensor) -> float:
        """P(first ≻ second) from one request."""
        parts = [image_part(first), image_part(second), text_part(self.template.format(prompt=prompt))]
        try:
            answer = self.client.complete(parts, on_retry=lambda reason: self.count("retries"))
        except RequestFailed as exc:
            self.count("failed_requests")
            logger.warning("judge %s: request failed, pair counted as 0.5: %s", self.name, exc)
            return 0.5
        verdict = parse_verdict(answer, self.verdict_rule)
        if verdict is None:
            self.count("unparseable")
            logger.warning("judge %s: no verdict in answer %r, pair counted as 0.5", self.name, answer[-200:])
            return 0.5
        if verdict == 0.5:
            self.count("ties")
        return verdict

    def compare(self, prompt: str, images_a: torch.Tensor, images_b: torch.Tensor, metadata: dict) -> torch.Tensor:
        a, b = images_a.cpu(), images_b.cpu()
        jobs = [(prompt, a[i], b[i]) for i in range(len(a))]
        if self.both_orders:
            jobs += [(prompt, b[i], a[i]) for i in range(len(a))]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            p = torch.tensor(list(pool.map(lambda job: self._ask(*job), jobs)), dtype=torch.float32)
        if self.both_orders:
            n = len(a)
            return (p[:n] + 1 - p[n:]) / 2
        return p
