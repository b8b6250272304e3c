"""Policy adapter for Hugging Face causal LMs: actions are tokens.

Gives the GRPO trainer what ``flowgrpo.core`` needs as plain tensors: batched sampling with a KV
cache (left-padded prompts, temperature / top-p, EOS and stop strings), completion masks, and
per-token log-probs ``logp[B, T]`` of the completion under ``softmax(logits / temperature)`` —
for the policy and for a reference (LoRA adapter disabled, or a frozen copy).

Log-probs are those of the tempered full distribution, also when top-p truncates sampling (as in
TRL); the sampler records the same quantity so the two can be compared token by token.

Each row samples its tokens by inverse CDF from its own uniforms, drawn up front from a generator keyed by the
row's global sample (``keys``) or from one ``generator``: a completion then does not depend on the batch it is
sampled in, nor on how many processes share the run. For the trainer (`flowgrpo.update`) the completion tokens
are one column chunk per forward pass, with the k3 KL to the reference.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from flowgrpo.core import k3_kl
from flowgrpo.policies.chunks import Chunk, grid_chunks
from flowgrpo.policies.state import load_trainable, trainable_state_dict
from flowgrpo.samplers.noise import keyed_generator

__all__ = ["SamplingConfig", "TokenRollout", "LLMPolicy", "load_causal_lm", "Prompt"]

# A prompt is plain text, or a chat (list of {"role", "content"} messages) rendered with the
# tokenizer's chat template and its generation prompt.
Prompt = str | list[dict]


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled. ``stop`` strings end a completion (the text keeps them)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    max_prompt_len: int | None = None  # keep the last N prompt tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (log-probs use logits / temperature), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1 or None, got {self.max_prompt_len}")


@dataclass(frozen=True)
class TokenRollout:
    """One batch of sampled completions.

    prompt_ids/prompt_mask: [B, P], left-padded. completion_ids/completion_mask: [B, T]; the mask
    covers the generated tokens up to and including the EOS token or the token that completes a
    stop string, never padding or prompt tokens. sample_logp: [B, T] float32 log-probs recorded
    while sampling (0 outside the mask). stopped: [B] True if ended by EOS / stop string, False if
    cut at max_new_tokens.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    sample_logp: Tensor
    completions: list[str]
    stopped: Tensor

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: slice | Tensor) -> "TokenRollout":
        """The rollout restricted to ``rows`` (a slice or indices; same padding widths, so log-probs are unchanged)."""
        pick = (lambda v: v[rows]) if isinstance(rows, slice) else (
            lambda v: v[rows.to(v.device)] if isinstance(v, Tensor) else [v[i] for i in rows.tolist()])
        return TokenRollout(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})


def load_causal_lm(
    path: str | Path, *, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
    lora_rank: int | None = None, lora_alpha: float | None = None,
    lora_target_modules: str | list[str] = "all-linear",
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from a LOCAL directory (never the hub).

    ``gguf_file``: name of a GGUF file inside ``path`` (dequantised by transformers; needs the
    ``gguf`` package). ``lora_rank``: wrap the model in a peft LoRA (alpha defaults to 2 × rank)
    so only the adapter trains and the reference is the model with the adapter disabled.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (models load from local paths only)")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {path / gguf_file} does not exist")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if gguf_file is not None:
        model = _plain_copy(model, dtype)
    if lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank,
                            target_modules=lora_target_modules, lora_dropout=0.0)
        model = get_peft_model(model, config)
    return model, tokenizer


def _plain_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The same weights in a model without transformers' "gguf quantized" tag.

    transformers dequantises GGUF weights to ``dtype`` but keeps the tag, which blocks
    ``save_pretrained`` and ``Trainer``; the weights themselves are ordinary tensors.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def _eos_ids(model: PreTrainedModel, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if source is not None:
            ids.update([source] if isinstance(source, int) else source)
    if not ids:
        raise ValueError("neither the tokenizer nor the generation config defines an EOS token")
    return ids


def _cache_kwarg(model: PreTrainedModel) -> str:
    # transformers >= 5.2x renamed the forward argument `past_key_values` to `cache`
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _distinct_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(rows of the distinct prompts (first occurrence), each row's index among them)."""
    key = torch.where(prompt_mask, prompt_ids, -1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((int(inverse.max()) + 1,), len(key), device=key.device)
    return first.scatter_reduce(0, inverse, rows, "amin"), inverse


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Token of each row [B] whose cumulative mass first exceeds u x the row's total (u in [0, 1) per row)."""
    cdf = probs.cumsum(dim=-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1).to(cdf.dtype), right=True).squeeze(1)
    return tok.clamp(max=probs.shape[-1] - 1)


def _top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero the tail of each row outside the smallest set of tokens with mass >= top_p."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # mass before this token already enough
    return probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))


class LLMPolicy:
    """A causal LM + tokenizer as a GRPO policy.

    ``ref_model``: frozen reference; leave None for a peft model (the reference is the model with
    its adapter disabled). The reference is only run through ``ref_log_prob``, which the trainer
    never calls when beta = 0.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer, sampling: SamplingConfig = SamplingConfig(), *,
        ref_model: PreTrainedModel | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.ref_model = ref_model
        self._forward = model  # training forwards: the model, or its data-parallel wrapper (`bind`)
        self._in_step = None  # sharded models: keep decoding until every process is done (`bind`)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- prompts -----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[Prompt]) -> tuple[Tensor, Tensor]:
        """Token ids [B, P] and bool mask, left-padded with the pad id."""
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        seqs = []
        for p in prompts:
            if isinstance(p, str):
                ids = self.tokenizer(p)["input_ids"]
            elif isinstance(p, list):
                text = self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                raise TypeError(f"a prompt must be a str or a list of chat messages, got {type(p).__name__}")
            if not ids:
                raise ValueError(f"prompt {p!r} encodes to no tokens")
            if self.sampling.max_prompt_len is not None:
                ids = ids[-self.sampling.max_prompt_len:]
            seqs.append(ids)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = True
        return ids.to(self.device), mask.to(self.device)

    # ---- sampling ----------------------------------------------------------------------------
    def _decode(self, ids: Tensor) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    def _first_stop(self, text: str) -> int | None:
        """End index of the earliest stop string in ``text`` (None if none occurs)."""
        ends = [text.find(s) + len(s) for s in self.sampling.stop if s in text]
        return min(ends) if ends else None

    def _prefill(self, model: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[dict, Tensor, Tensor]:
        """Run each distinct prompt once and share its KV cache with every row that repeats it
        (a group's G completions): returns (cache kwargs, logits [B, V] for the first completion
        token, positions [B, 1] of that token). Differentiable: gradients of the shared prompt
        activations sum over the rows, exactly as if each row had been run alone."""
        first, inverse = _distinct_prompts(prompt_ids, prompt_mask)
        attn = prompt_mask[first].long()
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)  # `model` may be a data-parallel wrapper: read the policy's
        name = _cache_kwarg(self.model)
        out = model(input_ids=prompt_ids[first], attention_mask=attn, position_ids=pos, use_cache=True,
                    logits_to_keep=1, **{name: cache})
        cache.batch_select_indices(inverse)
        return {name: cache}, out.logits[inverse, -1], pos[inverse, -1:] + 1

    def _uniforms(self, b: int, generator: torch.Generator | None, keys: Sequence[Sequence[int]] | None) -> Tensor:
        n = self.sampling.max_new_tokens
        if (generator is None) == (keys is None):
            raise ValueError("give exactly one of generator= or keys=")
        if keys is None:
            return torch.rand((b, n), generator=generator, dtype=torch.float64)
        if len(keys) != b:
            raise ValueError(f"{len(keys)} keys for {b} prompts")
        return torch.stack([torch.rand(n, generator=keyed_generator(*k), dtype=torch.float64) for k in keys])

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Prompt], generator: torch.Generator | None = None, *,
                keys: Sequence[Sequence[int]] | None = None, greedy: bool = False) -> TokenRollout:
        """Sample one completion per prompt (repeat a prompt G times for a group), from one ``generator`` or
        from per-row ``keys``; ``greedy``: the most probable token at every step instead (evaluation)."""
        cfg = self.sampling
        prompt_ids, prompt_mask = self.encode_prompts(prompts)
        b = prompt_ids.shape[0]
        device = prompt_ids.device
        uniforms = self._uniforms(b, generator, keys).to(device)
        cache, logits, next_pos = self._prefill(self.model, prompt_ids, prompt_mask)
        attn = prompt_mask.long()
        eos = torch.tensor(sorted(self.eos_ids), device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, logps, masks = [], [], []
        texts: list[str | None] = [None] * b
        for t in range(cfg.max_new_tokens):
            logp_all = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)
            probs = logp_all.exp()
            if cfg.top_p < 1:
                probs = _top_p_filter(probs, cfg.top_p)
            tok = probs.argmax(dim=-1) if greedy else _inverse_cdf(probs, uniforms[:, t])
            tok = torch.where(done, self.pad_id, tok)
            masks.append(~done)
            tokens.append(tok)
            logps.append(torch.where(done, 0.0, logp_all.gather(1, tok[:, None]).squeeze(1)))
            done = done | torch.isin(tok, eos)
            if cfg.stop:
                so_far = torch.stack(tokens, dim=1)
                for i in torch.nonzero(~done).squeeze(1).tolist():
                    text = self._decode(so_far[i])
                    end = self._first_stop(text)
                    if end is not None:
                        done[i], texts[i] = True, text[:end]
            finished = bool(done.all())
            if self._in_step is not None:  # a sharded model's forwards are collectives: stop together
                finished = not self._in_step(not finished)
            if finished:
                break
            attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=device)], dim=1)
            logits = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos,
                                use_cache=True, **cache).logits[:, -1]
            next_pos = next_pos + 1
        completion_ids = torch.stack(tokens, dim=1)
        completion_mask = torch.stack(masks, dim=1)
        completions = [
            t if t is not None else self._decode(completion_ids[i][completion_mask[i]])
            for i, t in enumerate(texts)
        ]
        return TokenRollout(prompt_ids, prompt_mask, completion_ids, completion_mask,
                            torch.stack(logps, dim=1), completions, done)

    # ---- log-probs ---------------------------------------------------------------------------
    def _token_logp(self, model: PreTrainedModel, r: TokenRollout) -> Tensor:
        cache, first_logits, pos0 = self._prefill(model, r.prompt_ids, r.prompt_mask)
        t = r.completion_ids.shape[1]
        logits = first_logits[:, None]
        if t > 1:  # completion tokens 0..T-2 predict tokens 1..T-1
            attn = torch.cat([r.prompt_mask, r.completion_mask[:, :-1]], dim=1).long()
            pos = pos0 + torch.arange(t - 1, device=pos0.device)
            rest = model(input_ids=r.completion_ids[:, :-1], attention_mask=attn, position_ids=pos,
                         use_cache=True, **cache).logits
            logits = torch.cat([logits, rest], dim=1)
        logits = logits.float() / self.sampling.temperature
        picked = logits.gather(2, r.completion_ids[:, :, None]).squeeze(2)
        logp = picked - torch.logsumexp(logits, dim=2)
        return logp.masked_fill(~r.completion_mask, 0.0)  # never NaN/garbage outside the mask

    def log_prob(self, rollout: TokenRollout, chunk: Chunk | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Completion token log-probs [B, T] under the current policy (differentiable; 0 outside the mask).
        For a trainer ``chunk``: its rows' log-probs, through the bound training module, and the same tensor as the
        KL input."""
        if chunk is None:
            return self._token_logp(self.model, rollout)
        logp = self._token_logp(self._forward, rollout.select(chunk.rows))[:, chunk.cols]
        return logp, logp

    def chunks(self, rollout: TokenRollout, rows: slice, micro_batch: int) -> list[Chunk]:
        """Micro-batches of rows, all completion tokens of a row in one forward pass."""
        return grid_chunks(rows, micro_batch, [slice(0, rollout.completion_ids.shape[1])])

    def reference_out(self, rollout: TokenRollout, chunk: Chunk) -> Tensor:
        return self.ref_log_prob(rollout.select(chunk.rows))[:, chunk.cols]

    def kl(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        return k3_kl(logp, ref_logp)

    @contextmanager
    def reference(self) -> Iterator[PreTrainedModel]:
        """The reference model: the frozen copy, or this model with its LoRA adapter disabled."""
        if self.ref_model is not None:
            yield self.ref_model
        elif self.is_peft:
            with self.model.disable_adapter():
                yield self.model
        else:
            raise RuntimeError("no reference policy: pass ref_model= or use a peft LoRA model")

    @torch.no_grad()
    def ref_log_prob(self, rollout: TokenRollout) -> Tensor:
        """Completion token log-probs [B, T] under the reference policy."""
        with self.reference() as ref:
            return self._token_logp(ref, rollout)

    # ---- parameters --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        return params

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def bind(self, module: torch.nn.Module, in_step=None) -> None:
        """Run training forwards through ``module`` (the model wrapped by DDP, or itself when sharded); ``in_step``
        (``Dist.in_step``) keeps sampling in step with the other processes."""
        self._forward = module
        self._in_step = in_step

    def shard_units(self) -> list[torch.nn.Module]:
        """The decoder layers (the largest list of blocks), each sharded on its own under FSDP."""
        lists = [m for m in self.model.modules() if isinstance(m, torch.nn.ModuleList)]
        return list(max(lists, key=len)) if lists else []

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Copies of the trainable parameters by name (tied weights appear once)."""
        return trainable_state_dict(self.model)

    def load_trainable_state_dict(self, tensors: dict[str, Tensor], where: str = "checkpoint") -> None:
        load_trainable(self.model, tensors, where)
