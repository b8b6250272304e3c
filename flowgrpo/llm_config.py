"""The frozen configuration of LLM GRPO training, with every derived batch size validated here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowgrpo.core import ADVANTAGES, AGGREGATIONS
from flowgrpo.policies.llm import SamplingConfig

__all__ = ["GRPOConfig"]


@dataclass(frozen=True)
class GRPOConfig:
    """LLM GRPO settings. One optimizer step per inner iteration over the whole batch of
    ``prompts_per_step × num_generations`` completions, accumulated over micro-batches."""

    # groups and batches
    num_generations: int = 8          # G completions per prompt
    prompts_per_step: int = 4
    micro_batch_size: int | None = None  # None = the whole batch in one forward/backward
    num_iterations: int = 1           # inner PPO epochs (optimizer steps) per batch of rollouts
    # advantages (flowgrpo.core.compute_advantages)
    advantage: str = "grpo"
    advantage_opts: dict[str, Any] = field(default_factory=dict)  # e.g. {"scale": "none"} = Dr.GRPO
    reward_weights: tuple[float, ...] | None = None  # one per reward function
    adv_clip: float | None = None
    zero_std: str = "keep"
    # loss
    loss_agg: str = "seq-mean-token-mean"
    beta: float = 0.0                 # k3 KL coefficient; 0 = the reference is never run
    eps_low: float = 0.2
    eps_high: float = 0.2
    # optimizer (AdamW, constant learning rate)
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    # sampling
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    max_prompt_len: int | None = None
    # run
    seed: int = 0
    output_dir: str | None = None
    save_every: int = 0               # steps between checkpoints in output_dir (0 = only at the end)

    def __post_init__(self) -> None:
        # normalise list inputs so the config stays immutable and JSON round-trips compare equal
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.reward_weights is not None:
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))
        object.__setattr__(self, "advantage_opts", dict(self.advantage_opts))
        self._validate()

    def _validate(self) -> None:
        for name in ("num_generations", "prompts_per_step", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"unknown advantage {self.advantage!r}; choose from {sorted(ADVANTAGES)}")
        if self.num_generations < 2 and self.advantage != "spo":
            raise ValueError(f"advantage {self.advantage!r} compares completions within a group: "
                             f"num_generations must be >= 2, got {self.num_generations} (only 'spo' needs no group)")
        if self.advantage == "stratified" and "alpha" not in self.advantage_opts:
            raise ValueError("advantage 'stratified' needs advantage_opts={'alpha': ...} and a 'strata' column")
        reserved = {"tracker", "prompt_keys", "strata"} & set(self.advantage_opts)
        if reserved:
            raise ValueError(f"advantage_opts {sorted(reserved)} are supplied by the trainer, not the config")
        if self.loss_agg not in AGGREGATIONS:
            raise ValueError(f"unknown loss_agg {self.loss_agg!r}; choose from {sorted(AGGREGATIONS)}")
        if self.zero_std not in ("keep", "drop"):
            raise ValueError(f"zero_std must be 'keep' or 'drop', got {self.zero_std!r}")
        if self.micro_batch_size is not None:
            if self.micro_batch_size < 1:
                raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
            if self.batch_size % self.micro_batch_size:
                raise ValueError(
                    f"micro_batch_size={self.micro_batch_size} does not divide batch_size={self.batch_size} "
                    f"(= prompts_per_step {self.prompts_per_step} × num_generations {self.num_generations})")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.save_every < 0 or (self.save_every and self.output_dir is None):
            raise ValueError(f"save_every={self.save_every} needs save_every >= 0 and an output_dir")
        _ = self.sampling  # builds (so validates) the sampling settings

    @property
    def batch_size(self) -> int:
        """Completions per optimizer step."""
        return self.prompts_per_step * self.num_generations

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // self.micro_batch

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, stop=self.stop, max_prompt_len=self.max_prompt_len)
