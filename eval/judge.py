"""Judges for UniGenBench: an OpenAI-compatible multimodal chat endpoint, and the shared result type.

A judge is any callable `judge(image: PIL.Image.Image, row: PromptRow) -> JudgeResult` with one 0/1
score per testpoint of the row, or `scores=None` and an `error` when it could not judge. It may have
`name` (recorded with each result, so a resumed run cannot mix judges) and `validate(rows)` (called
once before judging, to fail fast on rows it cannot handle).
"""
from __future__ import annotations

import ast
import base64
import io
import json
import re
from dataclasses import dataclass

from PIL import Image

from flowgrpo.eval.unigenbench_data import PromptRow, Testpoint
from flowgrpo.rewards.http_client import HttpStatusError, RequestFailed, post_json
from flowgrpo.rewards.openai_chat import answer_text


@dataclass(frozen=True)
class JudgeResult:
    """Scores (one 0/1 per testpoint) or None with `error`; `raw` is the judge's last answer."""

    scores: list[int] | None
    raw: str
    error: str | None = None
    attempts: int = 1


class JudgeConfigError(RuntimeError):
    """The endpoint refuses every request (bad URL, model name or key): retrying will not help."""


# What each dimension checks, in the benchmark's sense (paraphrased from the UniGenBench release).
EXPLANATIONS = {
    "en": {
        ("Relationship", "Comparison"): "How an attribute of one entity compares with that of another",
        ("Relationship", "Composition"): "An entity made up of one or more other entities",
        ("Relationship", "Inclusion"): "A container (possibly flat, like a painting on a wall) holding an entity",
        ("Relationship", "Similarity"): "Resemblances between different entities",
        ("Compound", "Imagination"): "Things that cannot happen in real life",
        ("Compound", "Feature Matching"): "Several entities, each with its own kind of attributes",
        ("Attribute", "Size"): "Size, height, length, thickness or width of the subject",
        ("Attribute", "Expression"): "Facial expressions that show a clear emotion (not mere facial movements)",
        ("Attribute", "Quantity"): "Exact numbers of items, especially three or more",
        ("Attribute", "Material"): "Materials and textures",
        ("Attribute", "Color"): "Colours of entities",
        ("Attribute", "Shape"): "Shapes of entities",
        ("Entity Layout", "Two-Dimensional Space"): "Placement of entities relative to each other in the image plane",
        ("Entity Layout", "Three-Dimensional Space"): "Placement of entities in depth and 3D space",
        ("Action", "Full-body (Character/Anthropomorphic)"): "Whole-body actions of people or personified beings (running, diving, swinging)",
        ("Action", "Hand (Character/Anthropomorphic)"): "Hand actions; fingers must be complete and not distorted",
        ("Action", "Animal"): "Actions performed by animals",
        ("Action", "Contact Interaction"): "Entities physically touching or acting on each other",
        ("Action", "Non-contact Interaction"): "Interactions without touch, such as two people looking at each other",
        ("Action", "State"): "An ongoing state of an entity, usually given by a verb",
        ("Grammar", "Negation"): "Whether negated content is correctly left out",
        ("Grammar", "Pronoun Reference"): "Whether ambiguous pronouns are attached to the right entity",
        ("Grammar", "Consistency"): "An attribute shared by several entities",
        ("World Knowledge", None): "Famous people, buildings, basic domain knowledge, internet slang",
        ("Style", None): "Art, painting, photography and design styles, and artists' styles",
        ("Text Generation", None): "Rendered text must match exactly, with nothing missing or added",
        ("Logical Reasoning", None): "The prompt's intent must be understood and reasoned about",
    },
    "zh": {
        ("关系", "比较关系"): "两个实体之间某种属性的对比",
        ("关系", "构成关系"): "一个实体由一种或几种其他实体构成",
        ("关系", "包含关系"): "容器（也可以是平面，如墙上的画）包含某个实体",
        ("关系", "相似关系"): "不同实体之间的相似之处",
        ("复合考点", "想象力"): "现实中不可能发生的事物",
        ("复合考点", "不同实体特征匹配"): "多个实体各自带有不同类别的属性",
        ("属性", "大小"): "主体的大小、高低、长短、粗细、宽窄",
        ("属性", "表情"): "能体现明确情绪的表情（而非单纯的面部动作）",
        ("属性", "数量"): "数量是否准确，尤其是三个及以上",
        ("属性", "材质"): "不同的材质与质感",
        ("属性", "形状"): "实体的形状",
        ("属性", "颜色"): "实体的颜色",
        ("实体布局", "二维空间"): "实体在画面平面内的相对位置",
        ("实体布局", "三维空间"): "实体在纵深与三维空间中的摆放",
        ("动作", "人物/拟人全身动作"): "人物或拟人角色的全身动作，如奔跑、跳水、荡秋千",
        ("动作", "人物/拟人手部动作"): "手部动作，手指不能缺失或崩坏",
        ("动作", "动物动作"): "动物的动作",
        ("动作", "实体间有接触互动"): "实体之间有身体接触的互动",
        ("动作", "实体间无接触互动"): "实体之间无接触的互动，例如两人对视",
        ("动作", "状态"): "实体持续的状态，通常由一个动词表达",
        ("语法", "否定"): "被否定的内容是否确实没有出现",
        ("语法", "代词指代"): "有歧义的代词是否对应到正确的实体",
        ("语法", "统一性"): "多个实体共有的属性",
        ("世界知识", None): "名人、建筑、基础领域知识、网络流行语",
        ("风格", None): "艺术、绘画、摄影、设计风格及对应艺术家",
        ("逻辑推理", None): "需要理解提示词意图并进行推理",
        ("文本生成", None): "生成的文字须准确，不缺字、不多字",
    },
}

_TEMPLATES = {
    "en": (
        "You are a precise, objective judge of text-to-image results. You are given an image generated "
        "from the prompt 「{prompt}」 and a list of checkpoints. Judge each checkpoint on its own, "
        "using only what is directly visible in the image; do not guess at hidden content or backstory.\n\n"
        "What each checkpoint type means:「{explanations}\n」\n"
        "What each checkpoint requires for this prompt:「{descriptions}\n」\n\n"
        "For every checkpoint, first analyse the image, then give 1 if the image satisfies the checkpoint "
        "and 0 if it does not. Answer in exactly this format, with one list element per checkpoint, "
        "in the order given ({count} checkpoints):\n"
        "<description>\n<prompt>{prompt}</prompt>\n<checkpoint>{names}</checkpoint>\n"
        '<analysis>["analysis of checkpoint 1", ...]</analysis>\n<score>[0 or 1, ...]</score>\n</description>'
    ),
    "zh": (
        "你是一个精确、客观的文生图结果评审。下面的图像由提示词「{prompt}」生成，并附有一组考点。"
        "请逐个考点独立判断，只依据图像中直接可见的内容，不要推测画面之外的信息或背景故事。\n\n"
        "各类考点的含义：「{explanations}\n」\n"
        "各考点在本提示词中的具体要求：「{descriptions}\n」\n\n"
        "请先逐个考点分析图像，再给出分数：满足考点要求为1，否则为0。严格按以下格式回答，"
        "列表按考点顺序、每个考点一个元素（共{count}个考点）：\n"
        "<description>\n<prompt>{prompt}</prompt>\n<checkpoint>{names}</checkpoint>\n"
        '<analysis>["考点1的分析", ...]</analysis>\n<score>[0或1, ...]</score>\n</description>'
    ),
}


def _explanation(tp: Testpoint, lang: str) -> str:
    try:
        return EXPLANATIONS[lang][(tp.primary, tp.sub)]
    except KeyError:
        known = ", ".join(p if s is None else f"{p} - {s}" for p, s in EXPLANATIONS[lang])
        raise ValueError(f"unknown {lang} testpoint {tp.name!r}; the judge prompt knows: {known}") from None


def build_judge_prompt(row: PromptRow) -> str:
    """The UniGenBench-style instruction for one row: each testpoint's meaning and its description."""
    names = [tp.name for tp in row.testpoints]
    explanations = "".join(f"\n{tp.name}: {_explanation(tp, row.lang)}" for tp in dict.fromkeys(row.testpoints))
    descriptions = "".join(f"\n{tp.name}: {d}" for tp, d in zip(row.testpoints, row.descriptions))
    return _TEMPLATES[row.lang].format(
        prompt=row.prompt, explanations=explanations, descriptions=descriptions,
        names=json.dumps(names, ensure_ascii=False), count=len(names),
    )


def parse_judge_answer(text: str, n_testpoints: int) -> list[int]:
    """Scores from `<analysis>...</analysis><score>[0/1, ...]</score>`; ValueError says what is wrong."""
    if not re.search(r"<analysis>.*?</analysis>", text, re.DOTALL):
        raise ValueError("no <analysis>...</analysis> block")
    blocks = re.findall(r"<score>(.*?)</score>", text, re.DOTALL)
    if not blocks:
        raise ValueError("no <score>...</score> block")
    try:
        scores = ast.literal_eval(blocks[-1].strip())  # a literal parser, never eval
    except (ValueError, SyntaxError):
        raise ValueError(f"score block is not a list: {blocks[-1].strip()[:80]!r}") from None
    if not isinstance(scores, list) or any(type(s) is not int or s not in (0, 1) for s in scores):
        raise ValueError(f"score block must be a list of 0/1 integers, got {blocks[-1].strip()[:80]!r}")
    if len(scores) != n_testpoints:
        raise ValueError(f"{len(scores)} scores for {n_testpoints} testpoints")
    return list(scores)


def png_data_url(image: Image.Image) -> str:
    """The image as a `data:image/png;base64,...` URL (the OpenAI image content-part form)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ChatJudge:
    """UniGenBench judging through an OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang, APIs).

    Transport errors (connection, timeout, HTTP 5xx/429, unreadable body) and answers that do not parse
    or have the wrong number of scores are retried up to `max_attempts` times with exponential backoff
    (`flowgrpo.rewards.http_client.post_json`, shared with the reward clients); then the result is a failure
    with the reason, never a guessed score. Other HTTP 4xx answers raise JudgeConfigError at once.
    Thread-safe: one request per call, no shared connection.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, *, timeout: float = 120.0,
                 max_attempts: int = 4, backoff: float = 2.0, max_backoff: float = 30.0,
                 max_tokens: int = 2048, temperature: float | None = None):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_attempts, self.backoff, self.max_backoff = max_attempts, backoff, max_backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self.name = f"chat:{model}"

    def validate(self, rows: list[PromptRow]) -> None:
        """Fail before any request if a row has a testpoint the prompt cannot explain."""
        for row in rows:
            build_judge_prompt(row)

    def _payload(self, image: Image.Image, row: PromptRow) -> dict:
        content = [
            {"type": "image_url", "image_url": {"url": png_data_url(image)}},
            {"type": "text", "text": build_judge_prompt(row)},
        ]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": self.max_tokens}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def __call__(self, image: Image.Image, row: PromptRow) -> JudgeResult:
        last = {"raw": "", "attempts": 1}

        def parse(answer) -> list[int]:
            last["raw"] = answer_text(answer)
            try:
                return parse_judge_answer(last["raw"], len(row.testpoints))
            except ValueError as err:
                raise ValueError(f"unparseable answer: {err}") from None

        def retried(_reason: str) -> None:
            last["attempts"] += 1

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            scores = post_json(self.url, self._payload(image, row), headers=headers, timeout=self.timeout,
                               retries=self.max_attempts - 1, backoff=self.backoff, max_backoff=self.max_backoff,
                               validate=parse, on_retry=retried)
        except HttpStatusError as err:
            raise JudgeConfigError(f"{self.url} answered HTTP {err.status} for model {self.model!r}: "
                                   f"{err.body[:300]}") from None
        except RequestFailed as err:
            return JudgeResult(None, last["raw"], f"gave up after {err.attempts} attempts; last error: {err.reason}",
                               err.attempts)
        return JudgeResult(scores, last["raw"], None, last["attempts"])
