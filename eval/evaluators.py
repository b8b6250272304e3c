"""One evaluation interface for every trainer. A run picks its evaluator once, from its evaluation prompts:

- `GenevalEvaluator`: GenEval-format metadata, scored by the exact Shapes verifier (per-tag accuracy);
- `RewardEvaluator`: any other prompts, scored by the run's reward (mean with its standard error);
- (text) `flowgrpo.llm_eval.TextEvaluator`: held-out prompts scored by reward functions (mean reward, pass@k).

`evaluator.run(policy, dist)` gives a result that supplies its own record (`summary`, kept in the run's history),
tracker scalars (`metrics`), console line (`line`), report files (`write`) and grid (`grid_image`); the evaluator
turns records into the base-vs-trained table (`table`) and the run's last line (`change`). Images are made with fixed
noise, split over the processes (any number of processes gives the result of one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from flowgrpo.eval.geneval import evaluate, markdown_table, report_markdown
from flowgrpo.eval.reward_eval import evaluate_reward, is_geneval


class EvalResult(Protocol):
    def summary(self) -> dict: ...
    def metrics(self) -> dict[str, float]: ...
    def line(self) -> str: ...
    def write(self, out, name: str = "model"): ...
    def grid_image(self): ...


class Evaluator(Protocol):
    name: str  # what ``score`` measures, for plots
    def run(self, policy, dist) -> EvalResult: ...
    def table(self, records: dict[str, dict], brief: bool = False) -> str: ...
    def change(self, base: dict, last: dict) -> str: ...
    def score(self, record: dict) -> tuple[float, float]: ...  # the headline value and its standard error


@dataclass(frozen=True)
class ImageSampling:
    """How evaluation images are made: ``images_per_prompt`` per entry, ``num_steps`` ODE steps at CFG ``guidance``
    (None for both: a masked diffusion model's own schedule), noise from ``seed``."""

    images_per_prompt: int
    num_steps: int | None
    guidance: float | None
    seed: int

    def kwargs(self, dist) -> dict:
        return dict(images_per_prompt=self.images_per_prompt, num_steps=self.num_steps, guidance=self.guidance,
                    seed=self.seed, dist=dist)


@dataclass(frozen=True)
class GenevalEvaluator:
    entries: list[dict]
    sampling: ImageSampling
    name = "overall accuracy (%)"

    def run(self, policy, dist):
        return evaluate(policy, self.entries, **self.sampling.kwargs(dist))

    def table(self, records: dict[str, dict], brief: bool = False) -> str:
        """Accuracy per tag and the image guards; unless ``brief``, also why images failed and (counting prompts)
        how many objects too many or too few they draw."""
        return markdown_table(records) + "\n" if brief else report_markdown(records)

    def change(self, base: dict, last: dict) -> str:
        return f"overall accuracy {100 * base['accuracy']['overall']:.1f}% -> {100 * last['accuracy']['overall']:.1f}%"

    def score(self, record: dict) -> tuple[float, float]:
        return 100 * record["accuracy"]["overall"], 100 * record["stderr"]["overall"]


@dataclass(frozen=True)
class RewardEvaluator:
    entries: list[dict]
    reward_fn: Any
    sampling: ImageSampling
    name = "eval reward"

    def run(self, policy, dist):
        return evaluate_reward(policy, self.entries, self.reward_fn, **self.sampling.kwargs(dist))

    def table(self, records: dict[str, dict], brief: bool = False) -> str:
        """The mean reward with its standard error, and per tag when the prompts carry tags."""
        tags = list(next(iter(records.values())).get("reward_by_tag", {}))
        rows = [["model", "eval reward", *tags], ["---"] * (2 + len(tags))]
        rows += [[name, f"{rec['reward']:.4f} ± {rec['reward_stderr']:.4f}",
                  *(f"{rec['reward_by_tag'][t]:.4f}" for t in tags)] for name, rec in records.items()]
        return "".join("| " + " | ".join(row) + " |\n" for row in rows)

    def change(self, base: dict, last: dict) -> str:
        return f"eval reward {base['reward']:.4f} -> {last['reward']:.4f}"

    def score(self, record: dict) -> tuple[float, float]:
        return record["reward"], record["reward_stderr"]


def image_evaluator(entries: list[dict], reward_fn, sampling: ImageSampling) -> GenevalEvaluator | RewardEvaluator:
    """GenEval accuracy when every entry carries GenEval metadata, else the mean of ``reward_fn``."""
    if is_geneval(entries):
        return GenevalEvaluator(entries, sampling)
    return RewardEvaluator(entries, reward_fn, sampling)
