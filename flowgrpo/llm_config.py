"""The frozen configuration of LLM GRPO training: the shared GRPO settings plus sampling, with TRL's names accepted.

Batch sizes are global (over all processes), as everywhere in flowgrpo; `GRPOSettings.layout` validates them for the
number of processes a run has.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from flowgrpo.policies.llm import SamplingConfig
from flowgrpo.settings import ConfigError, GRPOSettings, opt

__all__ = ["GRPOConfig", "TRL_NAMES"]

# TRL / earlier names -> flowgrpo's one name per concept (and how their "off" values read here)
TRL_NAMES = {
    "num_generations": "group_size", "prompts_per_step": "prompts_per_iter", "micro_batch_size": "micro_batch",
    "num_iterations": "inner_epochs", "eps_low": "clip_low", "epsilon": "clip_low", "eps_high": "clip_high",
    "epsilon_high": "clip_high", "learning_rate": "lr", "max_grad_norm": "grad_clip", "output_dir": "out",
    "advantage_opts": "advantage_options", "max_completion_length": "max_new_tokens",
}
_OFF = {"micro_batch": 0, "grad_clip": 0.0, "out": "", "adv_clip": 0.0}  # None in TRL's API means "off"


@dataclass(frozen=True)
class GRPOConfig(GRPOSettings):
    """LLM GRPO settings. Each inner epoch makes `optimizer_steps` optimizer steps over the batch of
    ``prompts_per_iter x group_size`` completions, accumulated over micro-batches."""

    # shared settings with LLM defaults
    out: str = opt("", "directory for checkpoints ('' = none are written)")
    prompts_per_iter: int = opt(4, "prompts per step, over all processes")
    micro_batch: int = opt(0, "completions per forward pass on one process (0 = all rows of its optimizer step)")
    adv_clip: float = opt(0.0, "clip advantages to [-c, c]; 0 = no clipping")
    loss_agg: str = opt("seq-mean-token-mean", "loss aggregation")
    clip_low: float = opt(0.2, "PPO clip: lower epsilon")
    clip_high: float = opt(0.2, "PPO clip: upper epsilon")
    beta: float = opt(0.0, "k3 KL coefficient; 0 = the reference is never run")
    lr: float = opt(1e-6, "learning rate")
    save_every: int = opt(0, "steps between checkpoints in out (0 = only at the end of train())")
    # rewards and sampling
    reward_weights: tuple = opt(None, "one weight per reward function (None = equal sum)")
    max_new_tokens: int = opt(64, "completion length limit")
    temperature: float = opt(1.0, "sampling temperature (log-probs use logits / temperature)")
    top_p: float = opt(1.0, "nucleus sampling mass")
    stop: tuple = opt((), "strings that end a completion (kept in its text)")
    max_prompt_len: int | None = opt(None, "keep the last N prompt tokens")

    def __post_init__(self) -> None:
        # normalise list inputs so the config stays immutable and JSON round-trips compare equal
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.reward_weights is not None:
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))
        object.__setattr__(self, "advantage_options", dict(self.advantage_options))
        super().__post_init__()
        if self.advantage == "stratified" and "alpha" not in self.advantage_options:
            raise ConfigError("advantage 'stratified' needs advantage_options={'alpha': ...} and a 'strata' column")
        if self.save_every and not self.out:
            raise ConfigError(f"save_every={self.save_every} needs an out directory (TRL: output_dir)")
        try:
            _ = self.sampling  # builds (so validates) the sampling settings
        except ValueError as e:
            raise ConfigError(str(e)) from e

    @classmethod
    def from_kwargs(cls, base: "GRPOConfig | None" = None, **kwargs: Any) -> "GRPOConfig":
        """A config from flowgrpo's names or TRL's (``num_generations``, ``learning_rate``, ``eps_low``, ...)."""
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}
        known = {f.name for f in fields(cls)}
        for name, value in kwargs.items():
            canonical = TRL_NAMES.get(name, name)
            if canonical not in known:
                raise TypeError(f"unknown GRPO setting {name!r}; see flowgrpo.llm.GRPOConfig")
            values[canonical] = _OFF[canonical] if value is None and canonical in _OFF else value
        return cls(**values)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, stop=self.stop, max_prompt_len=self.max_prompt_len)
