"""MaskedDiffusionPolicy: an aMUSEd-style masked diffusion model (diffusers AmusedPipeline) and its inference schedule
as one Co-GRPO policy.

Generation is `flowgrpo.samplers.unmasking` under a per-row schedule drawn from the `SchedulePolicy`; the MDP's
action at step t is (the schedule's action, the tokens committed), so the trainer sees 2T elements per sample,
interleaved: column 2t is the model's mean log-prob of the tokens committed at step t, column 2t + 1 the schedule's
log-prob of its action at t. Each is its own PPO-clip term; ``mode`` picks which train (`model`, `schedule`,
`joint`) and freezes the other part. Training recomputes the model columns from the stored final tokens and commit
steps in the same micro-batches and CFG calls as sampling, so the first inner step's importance ratio is exactly 1.
The model and the schedule live in one module (`CoModule`), what data parallelism wraps.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flowgrpo.core import k3_kl
from flowgrpo.policies.chunks import Chunk, grid_chunks
from flowgrpo.policies.schedule import SchedulePolicy
from flowgrpo.policies.state import load_trainable, trainable_state_dict
from flowgrpo.samplers.unmasking import (CFG, TEMPERATURE, default_schedule, guided_logits, keyed_gumbels,
                                         sample_unmasking, token_log_probs, tokens_at)

MODES = ("model", "schedule", "joint")
SCHEDULE_DIR = "schedule"


def is_mdm(path: str | Path) -> bool:
    """Whether a model directory holds an aMUSEd-style masked diffusion pipeline."""
    import json

    index = Path(path) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "AmusedPipeline"


@dataclass
class MaskRollout:
    prompts: list[str]
    metadata: list[dict]
    group_ids: Tensor  # [B]
    tokens: Tensor  # [B, N] final tokens
    commit_step: Tensor  # [B, N] step at which each position was committed
    actions: Tensor  # [B, T, 4] the schedule's pre-squash actions
    schedule: Tensor  # [B, T, 4] their squashed values (what sampling used)
    token_logp: Tensor  # [B, T] sampled mean log-prob of each step's committed tokens
    schedule_logp: Tensor  # [B, T] sampled log-prob of each step's schedule action
    counts: Tensor  # [B, T] positions committed per step
    images: Tensor  # [B, 3, H, W] in [0, 1]
    train_steps: Tensor | None = None  # [k] steps whose model column trains (set by the task)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.actions.shape[1]

    def sampled_log_probs(self) -> Tensor:
        """[B, 2T]: the columns' sampled log-probs, model and schedule interleaved."""
        return torch.stack([self.token_logp, self.schedule_logp], dim=2).flatten(1)


class CoModule(nn.Module):
    """Every trained parameter of a Co-GRPO policy: the MDM transformer and the schedule policy."""

    def __init__(self, transformer: nn.Module, schedule: SchedulePolicy):
        super().__init__()
        self.transformer, self.schedule = transformer, schedule

    def forward(self, tokens: Tensor | None = None, cond: tuple[Tensor, Tensor, Tensor] | None = None,
                actions: Tensor | None = None, steps: slice = slice(None)) -> tuple[Tensor | None, Tensor | None]:
        """(transformer logits [b, V, h, w] at ``tokens`` [b, h, w], or None; schedule log-probs of ``actions``, or
        None). ``cond`` = (pooled text, text hidden states, micro-conditions)."""
        logits = None
        if tokens is not None:
            pooled, hidden, micro = cond
            logits = self.transformer(tokens, encoder_hidden_states=hidden, pooled_text_emb=pooled, micro_conds=micro)
        return logits, self.schedule.log_prob(actions, steps) if actions is not None else None


class MaskedDiffusionPolicy:
    def __init__(self, pipe, schedule: SchedulePolicy, *, micro_batch: int, mode: str = "joint"):
        self.pipe, self.micro_batch = pipe, micro_batch
        self.module = CoModule(pipe.transformer, schedule)
        self._forward = self.module
        config = pipe.transformer.config
        self.grid = (config.sample_size, config.sample_size)
        self.vocab, self.mask_id = config.codebook_size, pipe.scheduler.config.mask_token_id
        size = config.sample_size * pipe.vae_scale_factor
        self._micro = torch.tensor([[size, size, 0, 0, 6]], dtype=torch.float32)  # aMUSEd's micro-conditions
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._reference: tuple[nn.Module, Tensor, Tensor] | None = None
        for part in (pipe.vqvae, pipe.text_encoder):
            part.requires_grad_(False).eval()
        self.set_mode(mode)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, micro_batch: int = 8, num_steps: int = 12, guidance: float = 4.0,
                        mode: str = "joint", schedule_std: float = 0.0) -> "MaskedDiffusionPolicy":
        """An AmusedPipeline directory with its schedule (``schedule/``), or — a model without one, e.g. a real
        aMUSEd checkpoint — the hand-set schedule of ``num_steps`` steps at CFG ``guidance``. ``schedule_std`` > 0
        sets the schedule's exploration std (pre-squash)."""
        from diffusers import AmusedPipeline

        path = Path(path)
        if not is_mdm(path):
            raise FileNotFoundError(f"{path} is not an AmusedPipeline directory (model_index.json)")
        pipe = AmusedPipeline.from_pretrained(path)
        if (path / SCHEDULE_DIR).is_dir():
            schedule = SchedulePolicy.from_pretrained(path / SCHEDULE_DIR)
        else:
            schedule = SchedulePolicy.default(num_steps, guidance)
        if schedule_std > 0:
            with torch.no_grad():
                schedule.log_std.fill_(float(torch.tensor(schedule_std).log()))
        return cls(pipe, schedule, micro_batch=micro_batch, mode=mode)

    @property
    def schedule(self) -> SchedulePolicy:
        return self.module.schedule

    @property
    def transformer(self) -> nn.Module:
        return self.module.transformer

    @property
    def device(self) -> torch.device:
        return self.schedule.mean.device

    def to(self, device) -> "MaskedDiffusionPolicy":
        self.pipe.to(device)
        self.module.to(device)
        self._cache = {p: tuple(t.to(device) for t in c) for p, c in self._cache.items()}
        return self

    # ---------------------------------------------------------------- parts and modes
    def set_mode(self, mode: str) -> None:
        """Train the ``model``, the ``schedule`` or both (``joint``); the other part is frozen."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.transformer.requires_grad_(mode != "schedule")
        self.schedule.requires_grad_(mode != "model")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def param_groups(self, schedule_lr: float, lr: float) -> list[dict]:
        """Optimizer groups: the transformer at ``lr``, the schedule at ``schedule_lr`` (its ``lr_scale`` keeps the
        ratio when the trainer schedules the learning rate)."""
        groups = []
        model = [p for p in self.transformer.parameters() if p.requires_grad]
        schedule = [p for p in self.schedule.parameters() if p.requires_grad]
        if model:
            groups.append({"params": model})
        if schedule:
            groups.append({"params": schedule, "lr": schedule_lr, "lr_scale": schedule_lr / lr})
        return groups

    def trainable_module(self) -> nn.Module:
        return self.module

    def bind(self, module: nn.Module, in_step=None) -> None:
        """Run training forwards through ``module`` (the `CoModule` wrapped by DDP)."""
        self._forward = module

    def shard_units(self) -> list[nn.Module]:
        return []  # trained with DDP only (the config refuses sharding)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return trainable_state_dict(self.module)

    def load_trainable_state_dict(self, tensors: dict[str, Tensor], where: str = "checkpoint") -> None:
        load_trainable(self.module, tensors, where)

    def freeze_reference(self) -> None:
        """Keep the current model and schedule as the KL reference (call before restoring a checkpoint)."""
        self._reference = (copy.deepcopy(self.transformer).requires_grad_(False).eval(),
                           self.schedule.mean.detach().clone(), self.schedule.log_std.detach().clone())

    # ---------------------------------------------------------------- conditioning and logits
    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[Tensor, Tensor]:
        tok = self.pipe.tokenizer
        ids = tok([prompt], return_tensors="pt", padding="max_length", truncation=True,
                  max_length=tok.model_max_length).input_ids.to(self.device)
        out = self.pipe.text_encoder(ids, return_dict=True, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]  # as AmusedPipeline conditions its transformer

    def cond(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(pooled, hidden states, micro-conditions) of ``prompts``, each encoded alone and cached."""
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                self._cache[p] = self._encode(p)
        pooled, hidden = (torch.cat([self._cache[p][k] for p in prompts]) for k in (0, 1))
        return pooled, hidden, self._micro.to(self.device).expand(len(prompts), -1)

    def _logits(self, transformer, tokens: Tensor, cond) -> Tensor:
        """[b, N, V] logits of ``transformer`` at ``tokens`` [b, N]."""
        pooled, hidden, micro = cond
        out = transformer(tokens.view(-1, *self.grid), encoder_hidden_states=hidden, pooled_text_emb=pooled,
                          micro_conds=micro)
        return out.float().flatten(2).transpose(1, 2)

    def guided(self, tokens: Tensor, cond, scale: Tensor, *, transformer=None) -> Tensor:
        """CFG logits of one micro-batch: the conditional call (through ``transformer`` or the plain model), then the
        unconditional one, separately, as training repeats them."""
        plain = transformer if transformer is not None else self.transformer
        with torch.no_grad():
            uncond = self._logits(plain, tokens, self.cond([""] * len(tokens)))
            c = self._logits(plain, tokens, cond)
        return guided_logits(c, uncond, scale.to(c.device))

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], values: Tensor, keys: Sequence[Sequence[int]]):
        """Unmask one image per prompt under the per-row schedule ``values`` [b, T, 4], row i's noise keyed by
        ``keys[i]``: (final tokens, commit steps, token log-probs, counts), in micro-batches (as training
        recomputes them)."""
        parts = []
        n = self.grid[0] * self.grid[1]
        for s in range(0, len(prompts), self.micro_batch):
            rows = slice(s, s + self.micro_batch)
            cond, v, k = self.cond(prompts[rows]), values[rows], list(keys[rows])
            start = torch.full((len(k), n), self.mask_id, dtype=torch.long, device=self.device)
            parts.append(sample_unmasking(lambda x, t: self.guided(x, cond, v[:, t, CFG]), start, self.mask_id, v,
                                          lambda t: keyed_gumbels(k, t, n, self.vocab)))
        return tuple(torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "commit_step", "log_probs", "counts"))

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Token grids [b, N] -> images [b, 3, H, W] in [0, 1] through the VQ decoder."""
        b = tokens.shape[0]
        shape = (b, *self.grid, self.pipe.vqvae.config.latent_channels)
        return self.pipe.vqvae.decode(tokens.view(b, *self.grid), force_not_quantize=True, shape=shape).sample.clamp(0, 1)

    @torch.no_grad()
    def rollout(self, prompts: list[str], metadata: list[dict], group_ids: Tensor, eps: Tensor,
                keys: Sequence[Sequence[int]]) -> MaskRollout:
        """Training rollouts: schedule actions from standard normal ``eps`` [b, T, 4], token noise keyed by ``keys``."""
        actions = self.schedule.sample(eps)
        values = self.schedule.squash(actions)
        tokens, commit_step, token_logp, counts = self.sample(prompts, values, keys)
        return MaskRollout(prompts, metadata, group_ids, tokens, commit_step, actions, values, token_logp,
                           self.schedule.log_prob(actions), counts, self.decode(tokens))

    def precision(self, dtype: torch.dtype | None):
        """A masked diffusion model always runs in fp32 (the flow policies' autocast has nothing to change here)."""
        return contextlib.nullcontext()

    def eval_noise(self, n: int, generator: torch.Generator) -> Tensor:
        """Per-image seeds [n] of evaluation images (the token noise of image i is keyed by its seed)."""
        return torch.randint(0, 2**62, (n,), generator=generator)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, num_steps: int | None = None, guidance: float | None = None,
                 generator: torch.Generator | None = None, x_init: Tensor | None = None) -> Tensor:
        """Images [b, 3, H, W] in [0, 1] under the schedule's means (the learned schedule); with ``num_steps`` or
        ``guidance``, the hand-set schedule of that length and CFG instead. ``x_init``: per-image seeds
        (`eval_noise`), else drawn from ``generator``."""
        if num_steps is None and guidance is None:
            values = self.schedule.mean_schedule()
        else:
            own = self.schedule.mean_schedule()
            values = default_schedule(num_steps or self.schedule.num_steps,
                                      float(own[:, CFG].mean()) if guidance is None else guidance)
        seeds = x_init if x_init is not None else self.eval_noise(len(prompts), generator or torch.Generator())
        tokens = self.sample(prompts, values.to(self.device).expand(len(prompts), -1, -1),
                             [(int(s),) for s in seeds])[0]
        return self.decode(tokens)

    # ---------------------------------------------------------------- training
    def chunks(self, ro: MaskRollout, rows: slice, micro_batch: int) -> list[Chunk]:
        """Schedule mode: all rows and schedule columns at once (no model forward). Otherwise micro-batches of rows
        (as sampled) x one trained step each (model column, plus its schedule column in joint mode), after the
        joint mode's schedule columns of untrained steps: the last backward of an optimizer step then reaches every
        trained parameter (what DDP's gradient reduction waits for)."""
        t_all = ro.num_steps
        if self.mode == "schedule":
            return [Chunk(torch.arange(rows.start, rows.stop), slice(1, 2 * t_all, 2), ("schedule", rows.start))]
        trained = sorted(ro.train_steps.tolist())
        cols = [slice(2 * t + 1, 2 * t + 2) for t in range(t_all) if t not in trained] if self.mode == "joint" else []
        cols += [slice(2 * t, 2 * t + (2 if self.mode == "joint" else 1)) for t in trained]
        return grid_chunks(rows, micro_batch, cols)

    def log_prob(self, ro: MaskRollout, chunk: Chunk) -> tuple[Tensor, dict]:
        """[n, c] log-probs of the chunk's columns (with gradient) and what the KL needs."""
        cols = list(range(chunk.cols.start, chunk.cols.stop, chunk.cols.step or 1))
        rows, kl_in = chunk.rows, {"rows": len(chunk.rows)}
        model_step = cols[0] // 2 if cols[0] % 2 == 0 else None
        sched = [c // 2 for c in cols if c % 2 == 1]
        steps = slice(sched[0], sched[-1] + 1) if sched else None
        tokens = cond = None
        if model_step is not None:
            tokens = tokens_at(ro.tokens[rows], ro.commit_step[rows], model_step, self.mask_id)
            cond = self.cond([ro.prompts[i] for i in rows.tolist()])
        logits, sched_logp = self._forward(tokens.view(-1, *self.grid) if tokens is not None else None, cond,
                                           ro.actions[rows, steps] if steps is not None else None, steps or slice(0))
        out = []
        if model_step is not None:
            c = logits.float().flatten(2).transpose(1, 2)
            with torch.no_grad():
                uncond = self._logits(self.transformer, tokens, self.cond([""] * len(rows)))
            guided = guided_logits(c, uncond, ro.schedule[rows, model_step, CFG])
            committed = ro.commit_step[rows] == model_step
            per_token = token_log_probs(guided, ro.tokens[rows], committed, ro.schedule[rows, model_step, TEMPERATURE])
            out.append(per_token.sum(dim=1, keepdim=True) / committed.sum(dim=1, keepdim=True).clamp(min=1))
            kl_in.update(model_step=model_step, per_token=per_token, committed=committed)
        if steps is not None:
            out.append(sched_logp)
            kl_in["steps"] = steps
        return torch.cat(out, dim=1), kl_in

    def reference_out(self, ro: MaskRollout, chunk: Chunk) -> dict:
        """The reference's per-token log-probs (model column) and Gaussians (schedule columns), no gradient."""
        if self._reference is None:
            raise RuntimeError("no KL reference: call freeze_reference() first")
        ref, ref_mean, ref_log_std = self._reference
        cols = list(range(chunk.cols.start, chunk.cols.stop, chunk.cols.step or 1))
        out, rows = {}, chunk.rows
        if cols[0] % 2 == 0:
            t = cols[0] // 2
            tokens = tokens_at(ro.tokens[rows], ro.commit_step[rows], t, self.mask_id)
            guided = self.guided(tokens, self.cond([ro.prompts[i] for i in rows.tolist()]), ro.schedule[rows, t, CFG],
                                 transformer=ref)
            out["per_token"] = token_log_probs(guided, ro.tokens[rows], ro.commit_step[rows] == t,
                                               ro.schedule[rows, t, TEMPERATURE])
        sched = [c // 2 for c in cols if c % 2 == 1]
        if sched:
            steps = slice(sched[0], sched[-1] + 1)
            out["schedule"] = (ref_mean[steps], ref_log_std[steps])
        return out

    def kl(self, kl_in: dict, ref: dict) -> Tensor:
        """[n, c]: the mean k3 KL of the committed tokens (model column), the Gaussians' KL (schedule columns)."""
        out = []
        if "per_token" in kl_in:
            committed = kl_in["committed"]
            k3 = k3_kl(kl_in["per_token"], ref["per_token"]) * committed
            out.append(k3.sum(dim=1, keepdim=True) / committed.sum(dim=1, keepdim=True).clamp(min=1))
        if "steps" in kl_in:  # the schedule does not depend on the row
            out.append(self.schedule.kl(*ref["schedule"], kl_in["steps"])[None].expand(kl_in["rows"], -1))
        return torch.cat(out, dim=1)

    # ---------------------------------------------------------------- export
    def whole_state_dict(self) -> None:
        return None  # never sharded: `save` reads the modules themselves

    def save(self, path: str | Path, whole: None = None) -> Path:
        """The pipeline directory (`AmusedPipeline.from_pretrained` loads it) with the schedule in ``schedule/``."""
        path = Path(path)
        self.pipe.save_pretrained(path, safe_serialization=True)
        self.schedule.save_pretrained(path / SCHEDULE_DIR)
        return path
