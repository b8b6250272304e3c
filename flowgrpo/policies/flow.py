"""FlowPolicy: a diffusers flow-matching pipeline as a GRPO policy.

Rollouts integrate the SDE/ODE samplers of `flowgrpo.samplers` with the pipeline's transformer;
training recomputes each step's log-prob from the stored (x_t, x_next) with the same batch
composition (same micro-batch chunks, conditional and unconditional branches as separate calls),
so the importance ratio is exactly 1 before the first update. The unconditional CFG branch never
enters the backward graph. `autocast` runs the transformer in mixed precision (e.g. bf16) while the
sampler's and the loss's maths stay fp32. Prompt conditioning is cached: the text encoders are frozen.

For the trainer (`flowgrpo.update`) the policy exposes its trained elements as a grid of rows x trained steps:
`chunks` (one step per forward), `log_prob`, `reference_out` and `kl` (the Gaussian-mean KL of the step).
`bind` makes training forwards go through the data-parallel wrapper of the transformer. Rollout strategies sample
through a narrow interface: `cond`, `velocity_fn`, `velocity`, `decode`, `latent_shape`, `sigmas` and `rollout`
(one trajectory per row); what a strategy samples otherwise (G²RPO's branches, DenseGRPO's completions) is its own.
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flowgrpo.core import gaussian_mean_kl
from flowgrpo.policies.chunks import Chunk, grid_chunks
from flowgrpo.policies.families import Cond, Family, family_for
from flowgrpo.policies.state import load_trainable, trainable_state_dict
from flowgrpo.samplers.noise import KeyedNoise
from flowgrpo.samplers.rollout import sample_trajectory
from flowgrpo.samplers.steps import band_project, gaussian_log_prob, transition_mean_std

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def empty_components(path: Path) -> dict[str, None]:
    """Components saved as null (e.g. SD3 without T5) must be passed as None to `from_pretrained`."""
    index = json.loads((path / "model_index.json").read_text())
    return {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}


MODEL_OPTIONS_FILE = "flowgrpo.json"


def model_family_options(path: Path) -> dict:
    """Sampling options a model directory declares for itself (e.g. the Shapes model's T5 length of 1)."""
    f = path / MODEL_OPTIONS_FILE
    if not f.is_file():
        return {}
    try:
        return dict(json.loads(f.read_text())["family_options"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f} is malformed: expected {{\"family_options\": {{...}}}} ({e})") from e


@dataclass
class Rollout:
    """A batch of sampled trajectories with everything training needs."""

    prompts: list[str]
    metadata: list[dict]
    group_ids: Tensor  # [B]
    latents: Tensor  # [B, T + 1, ...]
    log_probs: Tensor  # [B, T] (0 at ODE steps)
    sde_mask: Tensor  # [T] bool, or [B, T] when each row has its own SDE steps (G²RPO branches)
    sigmas: Tensor  # [T + 1]
    kind: str
    noise_level: float | Tensor  # one level, or [T] per step
    images: Tensor  # [B, 3, H, W] in [0, 1]
    noise_freqs: int = 0  # > 0: the SDE noise lived in the lowest noise_freqs x noise_freqs DCT frequencies
    guidance: float = 1.0  # the CFG scale sampling used (training recomputes with it)
    train_steps: Tensor | None = None  # [B, S] the steps each row trains on (chosen by the rollout strategy)
    means: Tensor | None = None  # [B, T, ...] the sampler's SDE step means, kept for GRPO-Guard

    def __len__(self) -> int:
        return len(self.prompts)

    def trained_log_probs(self) -> Tensor:
        """[B, S] the sampled log-probs of the trained steps."""
        return self.log_probs.gather(1, self.train_steps)

    def level(self, step: Tensor) -> float:
        """The noise level of ``step`` (one step index for the rows evaluated together)."""
        if not torch.is_tensor(self.noise_level):
            return self.noise_level
        if not bool((step == step[0]).all()):
            raise ValueError("rows with per-step noise levels are evaluated one step at a time")
        return float(self.noise_level[int(step[0])])


def _cat(conds: list[Cond]) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def _rows(cond: Cond, rows: slice) -> Cond:
    return {k: v[rows] for k, v in cond.items()}


class FlowPolicy:
    def __init__(self, pipe, family: Family, *, height: int, width: int, micro_batch: int,
                 negative_prompt: str = "", family_options: dict | None = None):
        self.pipe, self.family = pipe, family
        self.family_options = dict(family_options or {})  # what `family` was built with; exports carry them
        self.height, self.width, self.micro_batch = height, width, micro_batch
        self.negative_prompt = negative_prompt
        self._cache: dict[str, Cond] = {}
        self._negative: Cond | None = None
        self._reference = None
        self._train_only = False  # train_only() chose a subset of the transformer's parameters
        self.autocast: torch.dtype | None = None  # transformer compute dtype under torch.autocast; None = its own
        self._forward = pipe.transformer  # what forwards go through: the transformer, or its data-parallel wrapper
        self._dtype, self._config = pipe.transformer.dtype, pipe.transformer.config
        for module in (getattr(pipe, n, None) for n in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")):
            if module is not None:
                module.requires_grad_(False).eval()

    def to(self, device: torch.device | str) -> "FlowPolicy":
        """Move the pipeline (and the cached conditioning) to ``device``."""
        self.pipe.to(device)
        self._cache = {p: {k: v.to(device) for k, v in c.items()} for p, c in self._cache.items()}
        self._negative = None
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, *, height: int | None = None, width: int | None = None,
                        micro_batch: int = 8, dtype: torch.dtype = torch.float32, family_options: dict | None = None,
                        **kw) -> "FlowPolicy":
        from diffusers import DiffusionPipeline

        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, **empty_components(path))
        family_options = {**model_family_options(path), **(family_options or {})}
        family = family_for(pipe, **family_options)
        # FluxPipeline has no transformer sample_size; SD3 and Sana pipelines derive their default from it.
        latent_size = getattr(pipe, "default_sample_size", None) or pipe.transformer.config.sample_size
        size = latent_size * pipe.vae_scale_factor
        return cls(pipe, family, height=height or size, width=width or size, micro_batch=micro_batch,
                   family_options=family_options, **kw)

    @property
    def transformer(self):
        return self.pipe.transformer

    def add_lora(self, rank: int, alpha: float | None = None, targets: list[str] | None = None, *,
                 seed: int = 0) -> None:
        """LoRA adapters on the attention projections; B starts at 0 (the policy starts as the base model)
        and A is drawn with the global generator temporarily seeded with `seed` (a run never depends on global RNG)."""
        from peft import LoraConfig

        present = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
                   for n, _ in self.transformer.named_modules()}
        targets = [t for t in (targets or LORA_TARGETS) if t in present]
        self.transformer.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator
            torch.manual_seed(seed)
            self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets,
                                                    init_lora_weights="gaussian"))

    @property
    def uses_lora(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    def train_only(self, pattern: str) -> list[str]:
        """Full fine-tuning of the transformer parameters whose names match the regex `pattern` (re.search);
        the rest stay frozen. Returns the names selected."""
        if self.uses_lora:
            raise ValueError("train_only selects parameters for full fine-tuning; with LoRA only the adapters train")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"trainable pattern {pattern!r} is not a regular expression: {e}") from e
        names = [n for n, _ in self.transformer.named_parameters() if regex.search(n)]
        if not names:
            raise ValueError(f"trainable pattern {pattern!r} matches no transformer parameter "
                             f"(e.g. {next(self.transformer.named_parameters())[0]})")
        for n, p in self.transformer.named_parameters():
            p.requires_grad_(n in names)
        self._train_only = True
        return names

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if not self.uses_lora and not self._train_only:
            self.transformer.requires_grad_(True)
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def trainable_module(self) -> torch.nn.Module:
        """The module whose parameters train (what data parallelism wraps)."""
        self.trainable_parameters()  # full fine-tuning: make sure its parameters require grad before wrapping
        return self.transformer

    def bind(self, module: torch.nn.Module, in_step=None) -> None:
        """Run training forwards through ``module`` (the transformer wrapped by DDP, or itself when sharded)."""
        self._forward = module

    def shard_units(self) -> list[torch.nn.Module]:
        """The transformer's blocks, each sharded on its own under FSDP."""
        tr = self.transformer
        return [*getattr(tr, "transformer_blocks", []), *getattr(tr, "single_transformer_blocks", [])]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return trainable_state_dict(self.transformer)

    def load_trainable_state_dict(self, tensors: dict[str, Tensor], where: str = "checkpoint") -> None:
        load_trainable(self.transformer, tensors, where)

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference policy: LoRA disabled, or a frozen copy made on first use."""
        if self.uses_lora:
            self.transformer.disable_adapters()
            try:
                yield self.transformer
            finally:
                self.transformer.enable_adapters()
            return
        if self._reference is None:
            self.freeze_reference()
        yield self._reference

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the current weights as the KL reference (full fine-tuning). Call it before
        restoring a checkpoint, so a resumed run keeps the base model as its reference."""
        if not self.uses_lora:
            self._reference = copy.deepcopy(self.transformer).requires_grad_(False).eval()

    # ---------------------------------------------------------- conditioning
    @torch.no_grad()
    def cond(self, prompts: list[str]) -> Cond:
        # One prompt per encoder call: batched text encoders differ in the last bits with the batch's other
        # prompts, and a resumed run's cache holds other batches, so it would not continue exactly.
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                self._cache[p] = self.family.encode(self.pipe, [p])
        return _cat([self._cache[p] for p in prompts])

    @torch.no_grad()
    def negative_cond(self, n: int) -> Cond:
        """Conditioning of the unconditional CFG branch (the negative prompt), repeated n times."""
        if self._negative is None:
            self._negative = self.family.encode_negative(self.pipe, [self.negative_prompt])
        return _cat([self._negative] * n)

    def sigmas(self, num_steps: int) -> Tensor:
        """The sigma grid the model's own pipeline samples on at this resolution (the family decides)."""
        return self.family.sigmas(self.pipe, num_steps, self.height, self.width)

    def latent_shape(self) -> tuple[int, ...]:
        return self.family.latent_shape(self.pipe, self.height, self.width)

    # -------------------------------------------------------------- velocity
    @contextlib.contextmanager
    def precision(self, dtype: torch.dtype | None):
        """Inside the block the transformer runs under autocast to `dtype` (None = in its own dtype)."""
        saved, self.autocast = self.autocast, dtype
        try:
            yield
        finally:
            self.autocast = saved

    def _call(self, tr, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        def run():
            return self.family.velocity(tr, x, sigma, cond, dtype=self._dtype, config=self._config).float()

        if self.autocast is None:
            return run()
        with torch.autocast(x.device.type, dtype=self.autocast):
            return run()

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, guidance: float, *, transformer=None,
                 grad: bool = False) -> Tensor:
        """CFG velocity for one micro-batch; only the conditional branch may carry gradients. Forwards with
        gradient go through the bound (data-parallel) module, the others through the plain transformer: a
        DDP forward is a collective, and sampling or evaluation need not run in step on every process."""
        plain = transformer if transformer is not None else self.transformer
        with torch.set_grad_enabled(grad):
            v_c = self._call(self._forward if grad and transformer is None else plain, x, sigma, cond)
        if guidance == 1.0:
            return v_c
        with torch.no_grad():
            neg = self.negative_cond(x.shape[0])
            v_u = self._call(plain, x, sigma, neg)
        return v_u + guidance * (v_c - v_u)

    @torch.no_grad()
    def _joint_velocity(self, x: Tensor, sigma: Tensor, cond: Cond, guidance: float) -> Tensor:
        """CFG velocity with both branches in one call of 2n rows (sampling steps no update recomputes)."""
        if guidance == 1.0:
            return self._call(self.transformer, x, sigma, cond)
        both = _cat([cond, self.negative_cond(x.shape[0])])
        v = self._call(self.transformer, torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        v_c, v_u = v[: x.shape[0]], v[x.shape[0]:]
        return v_u + guidance * (v_c - v_u)

    def velocity_fn(self, cond: Cond, guidance: float, *, exact: bool = True):
        """``fn(x, sigma, index=None)``: velocities in micro-batches, row i conditioned on ``cond`` row ``index[i]``
        (default i). ``exact``: the CFG branches as the separate calls training repeats (steps whose log-prob
        trains); else one call for both (deterministic steps). With ``cond``, ``decode``, ``latent_shape`` and
        ``velocity`` this is what rollout strategies sample through."""
        def fn(x: Tensor, sigma: Tensor, index: Tensor | None = None) -> Tensor:
            c = cond if index is None else {k: v[index.to(v.device)] for k, v in cond.items()}
            out = []
            for s in range(0, x.shape[0], self.micro_batch):
                rows = slice(s, s + self.micro_batch)
                step = self.velocity if exact else self._joint_velocity
                out.append(step(x[rows], sigma[rows], _rows(c, rows), guidance))
            return torch.cat(out)
        return fn

    # --------------------------------------------------------------- sampling
    @torch.no_grad()
    def rollout(self, prompts: list[str], metadata: list[dict], group_ids: Tensor, x_init: Tensor, *,
                sigmas: Tensor, sde_mask: Tensor, guidance: float, kind: str, noise_level: float,
                noise: KeyedNoise | None = None, generator: torch.Generator | None = None, antithetic: bool = False,
                noise_freqs: int = 0, ode_solver: str = "euler", keep_means: bool = False) -> Rollout:
        """Sample trajectories from ``x_init``; SDE noise from per-row ``noise`` (training) or one ``generator``;
        ``keep_means``: the rollout keeps the sampler's SDE step means (GRPO-Guard)."""
        cond = self.cond(prompts)
        traj = sample_trajectory(self.velocity_fn(cond, guidance, exact=False), x_init.to(self.device), sigmas,
                                 sde_mask=sde_mask, kind=kind, noise_level=noise_level, generator=generator,
                                 noise=noise, antithetic=antithetic, noise_freqs=noise_freqs,
                                 exact_velocity_fn=self.velocity_fn(cond, guidance), ode_solver=ode_solver,
                                 keep_means=keep_means)
        return Rollout(prompts, metadata, group_ids, traj.latents, traj.log_probs, traj.sde_mask, traj.sigmas,
                       kind, traj.noise_level, self.decode(traj.latents[:, -1]), noise_freqs, guidance,
                       means=traj.means)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return torch.cat([self.family.decode(self.pipe, latents[s : s + self.micro_batch], self.height, self.width)
                          for s in range(0, latents.shape[0], self.micro_batch)])

    def eval_noise(self, n: int, generator: torch.Generator) -> Tensor:
        """Initial latents [n, ...] of evaluation images."""
        return torch.randn((n, *self.latent_shape()), generator=generator)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, num_steps: int, guidance: float, generator: torch.Generator | None = None,
                 x_init: Tensor | None = None) -> Tensor:
        """Deterministic (ODE) samples for evaluation from ``x_init`` (or noise drawn from ``generator`` on CPU):
        images [B, 3, H, W] in [0, 1]."""
        sigmas = self.sigmas(num_steps)
        x = x_init if x_init is not None else torch.randn((len(prompts), *self.latent_shape()), generator=generator)
        traj = sample_trajectory(self.velocity_fn(self.cond(prompts), guidance), x.to(self.device), sigmas,
                                 sde_mask=torch.zeros(num_steps, dtype=torch.bool))
        return self.decode(traj.latents[:, -1])

    # --------------------------------------------------------------- training
    def step_log_prob(self, ro: Rollout, rows: slice | Tensor, step: int | Tensor, guidance: float | None = None, *,
                      transformer=None, grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(log_prob [b], mean, std) of the stored transition at `step` (one index, or one per row [b])
        for rows (a slice or indices) of the rollout, with the rollout's CFG scale unless ``guidance`` is given."""
        idx = torch.arange(len(ro))[rows] if isinstance(rows, slice) else rows
        step = torch.as_tensor(step).expand(len(idx))
        x, x_next = ro.latents[idx, step], ro.latents[idx, step + 1]
        sigma, sigma_next = ro.sigmas[step].to(x.device), ro.sigmas[step + 1].to(x.device)
        v = self.velocity(x, sigma, self.cond([ro.prompts[i] for i in idx.tolist()]),
                          ro.guidance if guidance is None else guidance, transformer=transformer, grad=grad)
        mean, std = transition_mean_std(ro.kind, x, v, sigma, sigma_next, ro.level(step),
                                        sigma_max=float(ro.sigmas[1]), noise_freqs=ro.noise_freqs)
        return gaussian_log_prob(x_next, mean, std, ro.noise_freqs), mean, std

    def chunks(self, ro: Rollout, rows: slice, micro_batch: int) -> list[Chunk]:
        """The trained elements of ``rows`` as the sampler evaluated them: micro-batches of rows, one trained step
        (column) each."""
        return grid_chunks(rows, micro_batch, [slice(k, k + 1) for k in range(ro.train_steps.shape[1])])

    def log_prob(self, ro: Rollout, chunk: Chunk) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """log-probs [n, 1] of the chunk's trained steps (with gradient), and (mean, std) for the KL."""
        logp, mean, std = self.step_log_prob(ro, chunk.rows, ro.train_steps[chunk.rows, chunk.cols.start])
        return logp[:, None], (mean, std)

    def mean_shift(self, ro: Rollout, chunk: Chunk, kl_in: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """GRPO-Guard's terms of the chunk's elements, [n, 1] each: the mean over the step's stochastic coordinates
        of (mean - the sampler's mean)^2, and the step's std (``kl_in``: the trained (mean, std))."""
        mean, std = kl_in
        if ro.means is None:
            raise ValueError("GRPO-Guard needs the sampler's step means: roll out with keep_means=True")
        diff = mean.float() - ro.means[chunk.rows, ro.train_steps[chunk.rows, chunk.cols.start]].to(mean.device)
        if ro.noise_freqs:
            diff = band_project(diff, ro.noise_freqs)
        s = torch.as_tensor(std, dtype=diff.dtype, device=diff.device).expand_as(mean).flatten(1)[:, :1]
        return diff.pow(2).flatten(1).mean(dim=1, keepdim=True), s

    def reference_out(self, ro: Rollout, chunk: Chunk) -> Tensor:
        """The reference policy's step mean for the same elements (no gradient)."""
        with self.reference() as ref:
            return self.step_log_prob(ro, chunk.rows, ro.train_steps[chunk.rows, chunk.cols.start], transformer=ref,
                                      grad=False)[1]

    def kl(self, kl_in: tuple[Tensor, Tensor], ref_mean: Tensor) -> Tensor:
        """KL of the step's Gaussian to the reference's, [b, 1] (means differ, std is shared)."""
        mean, std = kl_in
        return gaussian_mean_kl(mean, ref_mean, std)[:, None]

    # ---------------------------------------------------------------- export
    def whole_state_dict(self) -> dict[str, Tensor] | None:
        """Every transformer weight as a whole tensor when they are sharded (a collective: every process calls it;
        process 0 receives them), else None: `save` reads the module itself."""
        from torch.distributed.tensor import DTensor

        if not any(isinstance(p, DTensor) for p in self.transformer.parameters()):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self, path: str | Path, whole: dict[str, Tensor] | None = None) -> Path:
        """Full fine-tuning: a complete pipeline directory (`from_pretrained` loads it), with the family options
        (e.g. the Shapes model's T5 length) in flowgrpo.json so it samples as this policy does.
        LoRA: diffusers LoRA weights that `pipe.load_lora_weights(path)` reads. ``whole``: the weights of a sharded
        transformer (`whole_state_dict`)."""
        path = Path(path)
        if self.uses_lora:
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(self.transformer, state_dict=whole)
            type(self.pipe).save_lora_weights(path, transformer_lora_layers=layers)
        else:
            sharded = self.pipe.transformer
            if whole is not None:  # an unsharded copy to write
                self.pipe.transformer = type(sharded).from_config(sharded.config).to(self._dtype)
                self.pipe.transformer.load_state_dict(whole)
            try:
                self.pipe.save_pretrained(path, safe_serialization=True)
            finally:
                self.pipe.transformer = sharded
            if self.family_options:
                (path / MODEL_OPTIONS_FILE).write_text(json.dumps({"family_options": self.family_options}))
        return path
