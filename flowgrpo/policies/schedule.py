"""Co-GRPO's schedule policy: the inference schedule of a masked diffusion model as a trainable Gaussian policy.

Per step t, the four schedule variables (`flowgrpo.samplers.unmasking.SCHEDULE_VARIABLES`: unmask ratio, sampling
temperature, remasking temperature, CFG scale) are drawn as u ~ N(mean[t], exp(log_std[t])^2) independently, then
squashed into their ranges, value = low + (high - low) * sigmoid(u). The log-prob of an action is the Gaussian
log-density of u before squashing (the squash does not depend on the parameters, so importance ratios are those of
the squashed values). The last step's ratio and remasking temperature have no effect (it commits every position
left) and are left out of the log-prob. The policy starts as the hand-set schedule: mean[t] = unsquash(default[t]).
It is a diffusers model (`save_pretrained` / `from_pretrained`), saved with the MDM in its ``schedule/`` folder.
"""
from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from flowgrpo.samplers.unmasking import CFG, RATIO, REMASK, SCHEDULE_VARIABLES, TEMPERATURE, default_schedule

EDGE = 1e-4  # default values on a range's edge (the last step's ratio 1 and remasking 0) start this far inside


class SchedulePolicy(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, init: list[list[float]], low: list[float], high: list[float], init_std: float = 0.3):
        super().__init__()
        values, self._low, self._high = torch.tensor(init), torch.tensor(low), torch.tensor(high)
        if values.ndim != 2 or values.shape[1] != len(SCHEDULE_VARIABLES):
            raise ValueError(f"init must be [steps, {len(SCHEDULE_VARIABLES)}] {SCHEDULE_VARIABLES}, got "
                             f"{tuple(values.shape)}")
        if not bool((self._high > self._low).all()):
            raise ValueError(f"every range needs low < high, got low {low}, high {high}")
        frac = ((values - self._low) / (self._high - self._low)).clamp(EDGE, 1 - EDGE)
        self.mean = nn.Parameter(torch.logit(frac))
        self.log_std = nn.Parameter(torch.full_like(self.mean, math.log(init_std)))

    @classmethod
    def default(cls, num_steps: int, guidance: float, *, init_std: float = 0.3, remask: float = 2.0,
                temperature: float = 1.0) -> "SchedulePolicy":
        """The hand-set schedule (`default_schedule`); each range puts its default in the middle (the ratio's is
        (0, 1)), so the policy can move either way."""
        init = default_schedule(num_steps, guidance, remask, temperature)
        low, high = [0.0] * 4, [0.0] * 4
        high[RATIO], high[TEMPERATURE], high[REMASK], high[CFG] = 1.0, 2 * temperature, 2 * remask, 2 * guidance
        return cls(init.tolist(), low, high, init_std)

    @property
    def num_steps(self) -> int:
        return self.mean.shape[0]

    def active(self) -> Tensor:
        """[T, 4] bool: the variables that act (all but the last step's ratio and remasking temperature)."""
        out = torch.ones(self.mean.shape, dtype=torch.bool, device=self.mean.device)
        out[-1, RATIO] = out[-1, REMASK] = False
        return out

    def squash(self, u: Tensor) -> Tensor:
        """Schedule values [..., T, 4] of pre-squash actions u."""
        low, high = self._low.to(u.device), self._high.to(u.device)
        return low + (high - low) * torch.sigmoid(u)

    @torch.no_grad()
    def sample(self, eps: Tensor) -> Tensor:
        """Pre-squash actions [B, T, 4] from standard normal noise ``eps`` [B, T, 4]."""
        return self.mean + self.log_std.exp() * eps.to(self.mean.device)

    def log_prob(self, u: Tensor, steps: slice = slice(None)) -> Tensor:
        """[B, len(steps)]: the Gaussian log-density of actions ``u`` [B, len(steps), 4] at those steps, summed over
        the active variables."""
        mean, log_std = self.mean[steps], self.log_std[steps]
        z = (u.to(mean.device) - mean) / log_std.exp()
        density = -0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)
        return (density * self.active()[steps]).sum(dim=-1)

    def kl(self, ref_mean: Tensor, ref_log_std: Tensor, steps: slice = slice(None)) -> Tensor:
        """[len(steps)]: KL(this step's Gaussian || the reference's), summed over the active variables."""
        mean, log_std = self.mean[steps], self.log_std[steps]
        var, ref_var = (2 * log_std).exp(), (2 * ref_log_std).exp()
        kl = ref_log_std - log_std + (var + (mean - ref_mean) ** 2) / (2 * ref_var) - 0.5
        return (kl * self.active()[steps]).sum(dim=-1)

    def mean_schedule(self) -> Tensor:
        """[T, 4] the schedule at the means (what evaluation samples with)."""
        return self.squash(self.mean.detach())
