"""Reward contracts and the registry of reward constructors.

Pointwise: ``reward(images[B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]`` (float32, NaN = could not
score). Pairwise: ``judge.prefer(prompt, images_a, images_b) -> Tensor[B]`` = P(a ≻ b) in [0, 1].
Registered constructors import their heavy dependencies (open_clip, transformers, rapidocr) only when built.
"""
from __future__ import annotations

import importlib
import inspect
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

# Tolerance on the [0, 1] range check: resampling can overshoot by a hair.
_RANGE_SLACK = 1e-3


class RewardFn(Protocol):
    """Anything with a ``name`` that maps (images, prompts, metadata) to a [B] tensor."""

    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor: ...


def check_images(images: torch.Tensor, what: str = "images") -> None:
    """Raise a clear error unless ``images`` is a float [B,3,H,W] tensor with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor [B,3,H,W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must have shape [B,3,H,W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{what} must be a float tensor in [0, 1], got dtype {images.dtype}")
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise ValueError(
                f"{what} must lie in [0, 1], got min {lo:.3f} max {hi:.3f} (decoded latents in [-1, 1] need (x + 1) / 2)"
            )


def check_batch(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None) -> list[dict]:
    """Validate one pointwise batch; returns the metadata list (empty dicts when ``metadata`` is None)."""
    check_images(images)
    batch = images.shape[0]
    if isinstance(prompts, str) or len(prompts) != batch:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"need one prompt per image: {batch} images but {got}")
    if metadata is None:
        return [{} for _ in range(batch)]
    if len(metadata) != batch:
        raise ValueError(f"need one metadata dict per image: {batch} images but {len(metadata)} entries")
    return list(metadata)


def require_file(path: str | Path | None, option: str, what: str) -> Path:
    """``path`` as a Path if it is an existing local file, else an error naming the option and the path."""
    return _require(path, option, what, Path.is_file, "file")


def require_dir(path: str | Path | None, option: str, what: str) -> Path:
    """``path`` as a Path if it is an existing local directory, else an error naming the option and the path."""
    return _require(path, option, what, Path.is_dir, "directory")


def _require(path: str | Path | None, option: str, what: str, test: Callable[[Path], bool], kind: str) -> Path:
    if not path:
        raise ValueError(f"option {option!r} is required: the local path of the {what}")
    p = Path(path).expanduser()
    if not test(p):
        raise FileNotFoundError(f"{what} not found: {option}={str(path)!r} is not an existing local {kind}")
    return p


class _Counted:
    """Thread-safe failure/usage counters shared by rewards and judges (``stats``, updated through ``count``)."""

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n


class Reward(_Counted):
    """Base class for pointwise rewards: validates the batch, runs ``score`` without grad, counts NaNs.

    Subclasses set ``name`` and implement ``score``. ``stats`` holds counters (``samples``, ``nan`` and
    reward-specific failure counts); it is safe to update from worker threads through ``count``.
    """

    name = "reward"

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        metadata = check_batch(images, prompts, metadata)
        with torch.no_grad():
            out = self.score(images, list(prompts), metadata)
        out = torch.as_tensor(out).detach().to(device="cpu", dtype=torch.float32)
        if out.shape != (images.shape[0],):
            raise RuntimeError(f"reward {self.name!r} returned shape {tuple(out.shape)}, expected ({images.shape[0]},)")
        self.count("samples", out.numel())
        self.count("nan", int(out.isnan().sum()))
        return out


class PairwiseJudge(_Counted):
    """Base class for pairwise judges: ``prefer`` returns P(a ≻ b) per pair, validated to [B] in [0, 1]."""

    name = "judge"

    def compare(
        self, prompt: str, images_a: torch.Tensor, images_b: torch.Tensor, metadata: dict
    ) -> torch.Tensor:
        raise NotImplementedError

    def prefer(
        self, prompt: str, images_a: torch.Tensor, images_b: torch.Tensor, metadata: dict | None = None
    ) -> torch.Tensor:
        """P(images_a[i] ≻ images_b[i]) for each i, all generated from the same ``prompt``."""
        if not isinstance(prompt, str):
            raise TypeError(f"prefer takes one prompt string shared by the pairs, got {type(prompt).__name__}")
        check_images(images_a, "images_a")
        check_images(images_b, "images_b")
        if images_a.shape[0] != images_b.shape[0]:
            raise ValueError(f"images_a and images_b must pair up: {images_a.shape[0]} vs {images_b.shape[0]}")
        with torch.no_grad():
            p = self.compare(prompt, images_a, images_b, dict(metadata or {}))
        p = torch.as_tensor(p).detach().to(device="cpu", dtype=torch.float32)
        if p.shape != (images_a.shape[0],) or bool(((p < 0) | (p > 1) | p.isnan()).any()):
            raise RuntimeError(f"judge {self.name!r} must return [{images_a.shape[0]}] probabilities, got {p}")
        self.count("pairs", p.numel())
        return p


class UnknownNameError(KeyError):
    """A reward or judge name that is not registered (the message lists the known names)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Lazy:
    """A constructor named by ``"module:attr"``, imported on first use so the registry stays import-light."""

    def __init__(self, target: str) -> None:
        self.target = target

    def resolve(self) -> Callable[..., Any]:
        module, attr = self.target.split(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):  # also reaches ``Class.from_config``
            obj = getattr(obj, part)
        return obj

    def __call__(self, **config: Any) -> Any:
        return self.resolve()(**config)

    def __repr__(self) -> str:
        return f"<lazy {self.target}>"


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "shapes": _Lazy("flowgrpo.rewards.shapes:ShapesReward"),
    "geneval": _Lazy("flowgrpo.rewards.geneval:GenevalReward"),
    "clipscore": _Lazy("flowgrpo.rewards.clip_score:ClipScore"),
    "pickscore": _Lazy("flowgrpo.rewards.pickscore:PickScore"),
    "aesthetic": _Lazy("flowgrpo.rewards.aesthetic:AestheticScore"),
    "ocr": _Lazy("flowgrpo.rewards.ocr:OcrReward"),
    "remote": _Lazy("flowgrpo.rewards.remote:RemoteReward"),
    "vlm": _Lazy("flowgrpo.rewards.vlm:VlmScore"),
    "weighted": _Lazy("flowgrpo.rewards.combine:WeightedSum.from_config"),
}

JUDGES: dict[str, Callable[..., PairwiseJudge]] = {
    "shapes": _Lazy("flowgrpo.rewards.shapes:shapes_judge"),
    "vlm_pairwise": _Lazy("flowgrpo.rewards.vlm:VlmPairwiseJudge"),
    "pointwise": _Lazy("flowgrpo.rewards.pairwise:PointwiseAsPairwise.from_config"),
}


def _constructor(registry: dict[str, Callable[..., Any]], kind: str, name: str, config: dict[str, Any]) -> Callable[..., Any]:
    """The registered constructor of ``name``, once its options are known to fit its signature."""
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise UnknownNameError(f"unknown {kind} {name!r}; known {kind}s: {known}")
    ctor = registry[name]
    ctor = ctor.resolve() if isinstance(ctor, _Lazy) else ctor
    params = inspect.signature(ctor).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(config) - set(params))
    accepted = ", ".join(p for p in params if p != "self")
    if unknown and not takes_any:
        raise TypeError(f"{kind} {name!r} got unknown option(s) {unknown}; accepted options: {accepted}")
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in config]
    if missing:
        raise TypeError(f"{kind} {name!r} needs option(s) {missing}; accepted options: {accepted}")
    return ctor


def check_options(kind: str, name: str, config: dict[str, Any]) -> None:
    """Check that ``kind`` ('reward' or 'judge') ``name`` exists and takes ``config``, without building it."""
    _constructor({"reward": REWARDS, "judge": JUDGES}[kind], kind, name, config)


def build_reward(name: str, **config: Any) -> RewardFn:
    """Build the registered pointwise reward ``name`` from its config options."""
    return _constructor(REWARDS, "reward", name, config)(**config)


def build_judge(name: str, **config: Any) -> PairwiseJudge:
    """Build the registered pairwise judge ``name`` from its config options."""
    return _constructor(JUDGES, "judge", name, config)(**config)


def register_reward(name: str, constructor: Callable[..., RewardFn], *, overwrite: bool = False) -> None:
    """Add a pointwise reward constructor (``constructor(**config) -> reward``) to the registry."""
    if name in REWARDS and not overwrite:
        raise KeyError(f"reward {name!r} is already registered (pass overwrite=True to replace it)")
    REWARDS[name] = constructor


def register_judge(name: str, constructor: Callable[..., PairwiseJudge], *, overwrite: bool = False) -> None:
    """Add a pairwise judge constructor (``constructor(**config) -> judge``) to the registry."""
    if name in JUDGES and not overwrite:
        raise KeyError(f"judge {name!r} is already registered (pass overwrite=True to replace it)")
    JUDGES[name] = constructor
