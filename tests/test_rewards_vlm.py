"""VLM judges against a stand-in OpenAI-compatible server that really looks at the images it is sent.

The stand-in prefers brighter images and answers in the formats real judges use (plain 'Score: N',
<think>/<answer> blocks, UnifiedReward's 'Image 1 is better'), plus malformed answers chosen by a tag in
the caption.
"""
import functools
import base64
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from flowgrpo.rewards import build_judge, build_reward, preference_matrix
from flowgrpo.rewards.http_client import HttpStatusError
from flowgrpo.rewards.vlm import VlmPairwiseJudge, parse_score, parse_verdict


def brightness_of(data_url):
    assert data_url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    return float(np.asarray(img.convert("RGB"), dtype=np.float64).mean() / 255)


class Judge(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api_key=None):
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.api_key, self.requests = api_key, []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def base_url(self):
        return "http://%s:%d/v1" % self.server_address[:2]


def pointwise_answer(mode, b):
    return {
        "plain": f"The composition is fine and the colours match.\nScore: {10 * b:.2f}",
        "think": f"<think>At first I thought Score: 3 but looking again it is better.</think>\n<answer>{10 * b:.2f}</answer>",
        "refuse": "I cannot rate this image.",
        "range": "Score: 42",
    }[mode]


def pairwise_answer(mode, b1, b2):
    winner = 1 if b1 > b2 else 2
    think = (f"<think>\n1. Semantic consistency: Image 1 ({round(9 * b1)}/10); Image 2 ({round(9 * b2)}/10)\n"
             f"Total score:\nImage 1: {round(9 * b1)}\nImage 2: {round(9 * b2)}\n</think>\n")
    return {
        "think": think + f"<answer>Image {winner} is better</answer>",
        "plain": f"Image {winner} is better.",
        "tie": think + "<answer>Both images are equally good</answer>",
        "garbled": "Image 1 is better in colour, but Image 2 is better overall.",
        "first": think + "<answer>Image 1 is better</answer>",  # position bias: always picks the first
    }[mode]


class _JudgeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status, payload):
        body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(req)
        if self.path != "/v1/chat/completions":
            return self._reply(404, {"error": {"message": "not found"}})
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            return self._reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        assert req["model"] == "judge-7b" and req["messages"][0]["role"] == "user"
        parts = req["messages"][0]["content"]
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        images = [brightness_of(p["image_url"]["url"]) for p in parts if p["type"] == "image_url"]
        mode = re.search(r"mode=(\w+)", text).group(1)
        if mode == "error500":
            return self._reply(500, {"error": {"message": "model overloaded"}})
        if mode == "nochoices":
            return self._reply(200, {"object": "error", "message": "context length exceeded"})
        if mode == "notjson":
            return self._reply(200, "upstream connect error")
        content = pointwise_answer(mode, images[0]) if len(images) == 1 else pairwise_answer(mode, *images)
        self._reply(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": req["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": content}}],
                          "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})


@pytest.fixture
def judge():
    server = Judge()
    yield server
    server.shutdown()
    server.server_close()


def flat(values):
    return torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 4, 4).clone()


def test_parse_score_and_verdict_hand_cases():
    assert parse_score("Looks good.\nScore: 7", 10) == 7
    assert parse_score("Score: 7/10", 10) == 7
    assert parse_score("**Score:** 8.5", 10) == 8.5  # markdown bold around the label is common
    assert parse_score("score = 3\nfinal Score: 9", 10) == 9  # the last one counts
    assert parse_score("<think>Score: 2</think><answer>6</answer>", 10) == 6
    assert parse_score("Score: 11", 10) is None and parse_score("no number", 10) is None
    strict = functools.partial(parse_verdict, rule="strict")
    assert strict("<think>Image 2 is better at colour</think><answer>Image 1 is better</answer>") == 1.0
    assert strict("Image 2 is better.") == 0.0
    assert strict("<answer>The two are equal</answer>") == 0.5
    assert strict("Image 1 is better here, Image 2 is better there") is None
    assert strict("<answer>hard to say</answer>") is None
    with pytest.raises(ValueError, match="verdict rule"):
        parse_verdict("x", rule="loose")
    with pytest.raises(ValueError, match="verdict_rule must be one of"):
        VlmPairwiseJudge("http://127.0.0.1:9", "m", verdict_rule="loose")


# UnifiedReward-style replies and Pref-GRPO's verdict for each (_pairwise_win_rate: _extract_answer, then
# `better_1 in answer`, `elif better_2 in answer`, else 0.5; no answer block: 0.5), against the strict rule
REPLY_SHAPES = [
    ("<think>Image 2 is better at colour</think><answer>Image 1 is better</answer>", 1.0, 1.0),  # tagged
    ("<think>...</think>\n<answer> Image 2 is better </answer>", 0.0, 0.0),  # tagged, padded
    ("<answer>image 1 is better</answer>", 0.5, 1.0),  # mixed case: not the reference's phrase
    ("<answer>Image 1 is better. Image 2 is better in detail.</answer>", 1.0, None),  # both: the first check wins
    ("Image 1 is better", None, 1.0),  # untagged: the reference has no answer, a tie
    ("<answer>They are equal</answer>", 0.5, 0.5),
    ("<answer>Image 2 is better</answer><answer>Image 1 is better</answer>", 0.0, 0.0),  # the first block
    ("<answer>hard to say</answer>", 0.5, None),
]


@pytest.mark.parametrize("reply, reference, strict", REPLY_SHAPES)
def test_verdicts_of_unifiedreward_style_replies(reply, reference, strict):
    assert parse_verdict(reply) == reference
    assert parse_verdict(reply, rule="strict") == strict


def test_vlm_pointwise_scores_from_real_answers(judge):
    reward = build_reward("vlm", base_url=judge.base_url, model="judge-7b", concurrency=4, retries=1, backoff=0.01)
    images = flat([0.2, 0.8, 0.5, 0.5, 0.5, 0.5, 0.5])
    prompts = ["a cat mode=plain", "a dog mode=think", "mode=refuse", "mode=range", "mode=error500",
               "mode=nochoices", "mode=notjson"]
    out = reward(images, prompts, None)
    assert out[:2].tolist() == pytest.approx([0.2, 0.8], abs=1e-3)  # 10*b/10, read from Score: / <answer>
    assert torch.isnan(out[2:]).all()
    assert reward.stats["unparseable"] == 2 and reward.stats["failed_requests"] == 3
    assert reward.stats["retries"] == 3 and reward.stats["nan"] == 5
    sent = judge.requests[0]["messages"][0]["content"]
    assert [p["type"] for p in sent] == ["image_url", "text"]
    assert "Score: N" in sent[1]["text"] and "from 0 to 10" in sent[1]["text"]


def test_vlm_pairwise_judge_prefers_what_the_judge_says(judge):
    vj = build_judge("vlm_pairwise", base_url=judge.base_url, model="judge-7b", concurrency=4, retries=0)
    a, b = flat([0.9, 0.1, 0.6]), flat([0.3, 0.7, 0.2])
    assert vj.prefer("three cats mode=think", a, b).tolist() == [1.0, 0.0, 1.0]
    assert vj.prefer("mode=plain", a, b).tolist() == [0.5, 0.5, 0.5]  # Pref-GRPO's rule reads <answer> only
    assert vj.prefer("mode=tie", a, b).tolist() == [0.5, 0.5, 0.5]
    assert vj.prefer("mode=garbled", a, b).tolist() == [0.5, 0.5, 0.5]
    assert vj.prefer("mode=error500", a[:1], b[:1]).tolist() == [0.5]
    assert vj.stats["ties"] == 3 and vj.stats["unparseable"] == 6 and vj.stats["failed_requests"] == 1
    assert vj.stats["pairs"] == 13
    strict = build_judge("vlm_pairwise", base_url=judge.base_url, model="judge-7b", retries=0, verdict_rule="strict")
    assert strict.prefer("mode=plain", a, b).tolist() == [1.0, 0.0, 1.0]
    text = judge.requests[0]["messages"][0]["content"][2]["text"]
    assert "'Image 1 is better' or 'Image 2 is better'" in text and "Caption: [three cats mode=think]" in text
    assert [p["type"] for p in judge.requests[0]["messages"][0]["content"]] == ["image_url", "image_url", "text"]


def test_both_orders_cancels_position_bias(judge):
    biased = build_judge("vlm_pairwise", base_url=judge.base_url, model="judge-7b", retries=0)
    fair = build_judge("vlm_pairwise", base_url=judge.base_url, model="judge-7b", retries=0, both_orders=True)
    a, b = flat([0.9, 0.1]), flat([0.3, 0.7])
    assert biased.prefer("mode=first", a, b).tolist() == [1.0, 1.0]
    assert fair.prefer("mode=first", a, b).tolist() == [0.5, 0.5]
    assert fair.prefer("mode=think", a, b).tolist() == [1.0, 0.0]


def test_preference_matrix_from_the_vlm_judge(judge):
    vj = build_judge("vlm_pairwise", base_url=judge.base_url, model="judge-7b", retries=0)
    levels = torch.tensor([0.4, 0.9, 0.1])
    s = preference_matrix(vj, "mode=think", flat(levels.tolist()))
    expected = (levels[:, None] > levels[None, :]).float().fill_diagonal_(0.5)
    assert torch.equal(s, expected)
    win_rate = (s.sum(1) - 0.5) / 2  # Pref-GRPO: mean preference over the other G-1 images
    assert win_rate.tolist() == [0.5, 1.0, 0.0]


def test_api_key_errors_are_clear():
    server = Judge(api_key="sk-test")
    try:
        ok = build_reward("vlm", base_url=server.base_url, model="judge-7b", api_key="sk-test", retries=0)
        assert ok(flat([0.4]), ["mode=plain"]).tolist() == pytest.approx([0.4], abs=1e-3)  # 102/255 survives PNG
        bad = build_reward("vlm", base_url=server.base_url, model="judge-7b", api_key="sk-wrong", retries=0)
        with pytest.raises(HttpStatusError, match="HTTP 401: .*Incorrect API key"):
            bad(flat([0.3]), ["mode=plain"])
        with pytest.raises(ValueError, match="FLOWGRPO_NO_SUCH_KEY is not set"):
            build_reward("vlm", base_url=server.base_url, model="judge-7b", api_key="env:FLOWGRPO_NO_SUCH_KEY")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="base_url must start with http"):
        build_judge("vlm_pairwise", base_url="localhost:8000/v1", model="m")
    with pytest.raises(ValueError, match=r"\{prompt\} placeholder"):
        build_reward("vlm", base_url="http://127.0.0.1:1/v1", model="m", template="Rate it.")
