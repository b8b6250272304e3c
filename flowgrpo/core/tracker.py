"""Per-prompt running statistics shared by the stateful advantage estimators (bnpo, spo).

Each prompt key holds a decayed Beta evidence (successes/failures, for rewards in [0, 1]) and an
EMA of its reward. Everything is a plain Python number so ``state_dict()`` is JSON-serialisable
and ``load_state_dict(json.loads(json.dumps(sd)))`` restores the exact same floats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

__all__ = ["PromptStats", "PromptStatTracker"]


@dataclass
class PromptStats:
    """Statistics of one prompt. ``value`` is None until the EMA has seen a reward."""

    count: int = 0
    successes: float = 0.0
    failures: float = 0.0
    value: float | None = None


def _check_key(key: str) -> None:
    # JSON object keys are strings; accepting ints would silently change type on a round trip.
    if not isinstance(key, str):
        raise TypeError(f"prompt keys must be str, got {type(key).__name__} {key!r}")


def _check_decay(decay: float) -> float:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    return float(decay)


def _check_prior(prior: Iterable[float]) -> tuple[float, float]:
    a0, b0 = (float(p) for p in prior)
    if not (a0 > 0 and b0 > 0):
        raise ValueError(f"Beta prior must be positive, got {tuple(prior)}")
    return a0, b0


def _finite_floats(rewards: Iterable[float]) -> list[float]:
    values = [float(r) for r in rewards]
    if any(math.isnan(v) for v in values):
        raise ValueError("tracker rewards must not contain NaN; drop unscorable samples first")
    return values


class PromptStatTracker:
    """Running per-prompt statistics keyed by a string prompt key.

    ``prior`` = (a0, b0) is the Beta prior added to the evidence, so an unseen prompt has
    ``beta_mean = a0 / (a0 + b0)`` (0.5 for the default uniform prior).
    """

    def __init__(self, prior: tuple[float, float] = (1.0, 1.0)) -> None:
        self.prior = _check_prior(prior)
        self._stats: dict[str, PromptStats] = {}

    def __len__(self) -> int:
        return len(self._stats)

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def keys(self) -> list[str]:
        return list(self._stats)

    def stats(self, key: str) -> PromptStats:
        """A copy of the statistics of ``key`` (defaults for an unseen key)."""
        _check_key(key)
        return PromptStats(**asdict(self._stats.get(key, PromptStats())))

    def beta_params(self, key: str) -> tuple[float, float]:
        """Posterior Beta parameters: prior + (decayed) evidence."""
        s = self.stats(key)
        return self.prior[0] + s.successes, self.prior[1] + s.failures

    def beta_mean(self, key: str) -> float:
        """Posterior mean success rate; strictly inside (0, 1) thanks to the prior."""
        a, b = self.beta_params(key)
        return a / (a + b)

    def value(self, key: str) -> float | None:
        """EMA value of the prompt's reward, or None if never observed."""
        return self.stats(key).value

    def observe_beta(self, key: str, rewards: Iterable[float], *, decay: float = 1.0) -> None:
        """Add rewards in [0, 1] as Beta evidence after scaling the old evidence by ``decay``.

        ``decay`` = 1 keeps all history, 0 keeps only this call's rewards.
        """
        _check_key(key)
        decay = _check_decay(decay)
        values = _finite_floats(rewards)
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"Beta evidence needs rewards in [0, 1], got {values} for {key!r}")
        if not values:
            return
        s = self._stats.setdefault(key, PromptStats())
        s.successes = decay * s.successes + sum(values)
        s.failures = decay * s.failures + sum(1.0 - v for v in values)
        s.count += len(values)

    def observe_value(self, key: str, rewards: Iterable[float], *, decay: float = 0.9) -> None:
        """EMA update with the mean of ``rewards``: v <- decay * v + (1 - decay) * mean.

        The first observation sets v to the mean directly.
        """
        _check_key(key)
        decay = _check_decay(decay)
        values = _finite_floats(rewards)
        if not values:
            return
        mean = sum(values) / len(values)
        s = self._stats.setdefault(key, PromptStats())
        s.value = mean if s.value is None else decay * s.value + (1.0 - decay) * mean
        s.count += len(values)

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state."""
        return {"prior": list(self.prior), "stats": {k: asdict(s) for k, s in self._stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` (also after a JSON round trip)."""
        prior = _check_prior(state["prior"])
        stats = {}
        for key, s in state["stats"].items():
            _check_key(key)
            value = s["value"]
            stats[key] = PromptStats(
                count=int(s["count"]),
                successes=float(s["successes"]),
                failures=float(s["failures"]),
                value=None if value is None else float(value),
            )
        self.prior = prior
        self._stats = stats
