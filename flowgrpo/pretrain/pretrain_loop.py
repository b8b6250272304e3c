"""The loop both Shapes pretrainings share (the flow model and the masked diffusion model): AdamW with linear warm-up
and cosine decay, an EMA of the weights (what checkpoints hold), checkpoints with a record every ``eval_every`` steps,
a per-invocation time budget, and a run state written whole that resumes the run exactly."""
from __future__ import annotations

import copy
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from flowgrpo.pretrain.pretrain_config import RUN_CONTROL, PretrainConfig
from flowgrpo.pretrain.sampling import summarize
from flowgrpo.shapes import world as W
from flowgrpo.shapes.verify import verify

STATE_FILE = "state.pt"


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_state(out: Path, cfg: PretrainConfig) -> dict | None:
    """The saved state to resume from (None for a new run); refuses to overwrite a run or to resume a different one."""
    path = out / STATE_FILE
    if not cfg.resume:
        if path.exists():
            raise ValueError(f"{out} already holds a pretraining run; pass --resume to continue it or choose another --out")
        return None
    if not path.exists():
        raise ValueError(f"--resume: no {STATE_FILE} in {out} to continue from")
    try:
        state = torch.load(path, weights_only=True)
        saved = state["config"]
    except Exception as e:  # truncated or foreign file: say which, keep it for inspection
        raise ValueError(f"--resume: cannot read {path} as a pretraining state ({e})") from e
    now = asdict(cfg)
    changed = [f"{k}: {v!r} -> {now.get(k)!r}" for k, v in saved.items() if k not in RUN_CONTROL and now.get(k) != v]
    if changed:
        raise ValueError(f"--resume must keep the run's options; changed: {', '.join(changed)}")
    return state


def mini_eval_entries(test: list[dict], per_tag: int) -> list[dict]:
    """The first ``per_tag`` test entries of every tag: what a checkpoint's mini-evaluation draws, one image each."""
    return [e for tag in W.TAGS for e in [x for x in test if x["tag"] == tag][:per_tag]]


def score(entries: list[dict], images: np.ndarray) -> dict:
    """Per-tag accuracy, overall, and the malformed / empty image rates of uint8 ``images`` for their entries."""
    passed, malformed, empty = defaultdict(list), 0, 0
    for e, img in zip(entries, images):
        v = verify(img, e)
        passed[e["tag"]].append(v.passed)
        malformed += v.malformed > 0
        empty += len(v.detections) == 0
    out = summarize(passed)
    out.update(malformed=malformed / len(entries), empty=empty / len(entries))
    return out


class PretrainRun:
    """What a run trains and resumes: the weights, their EMA, AdamW, and the data (numpy) and noise (torch)
    generators, restored from ``state`` when resuming."""

    def __init__(self, model: nn.Module, cfg: PretrainConfig, out: Path, state: dict | None):
        self.cfg, self.out, self.model = cfg, out, model.train()
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.first, self.minutes_before = 0, 0.0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
            self.rng.bit_generator.state = state["rng"]
            self.gen.set_state(state["gen"])
            self.first, self.minutes_before = state["step"], state["minutes"]

    def update(self, loss: torch.Tensor, step: int) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        decay = min(self.cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(pm, 1 - decay)

    def save_state(self, step: int, minutes: float) -> None:
        tmp = self.out / (STATE_FILE + ".tmp")  # written whole, then renamed: a stop mid-write keeps the old state
        torch.save({"step": step, "minutes": minutes, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                    "opt": self.opt.state_dict(), "rng": self.rng.bit_generator.state, "gen": self.gen.get_state(),
                    "config": asdict(self.cfg)}, tmp)
        tmp.replace(self.out / STATE_FILE)

    def train(self, desc: str, next_loss: Callable[[], torch.Tensor], measure: Callable[[], dict],
              save_checkpoint: Callable[[Path], None]) -> Path:
        """Steps ``first`` .. ``steps``: ``next_loss()`` draws a batch from the run's generators and returns its loss;
        every ``eval_every`` steps ``measure()`` adds to the record and ``save_checkpoint(dir)`` writes the EMA
        pipeline; ``max_minutes`` stops this invocation cleanly."""
        cfg = self.cfg
        with open(self.out / "log.jsonl", "a") as log:
            start = time.time()
            bar = tqdm(range(self.first, cfg.steps), desc=desc, mininterval=5, initial=self.first, total=cfg.steps)
            for step in bar:
                loss = next_loss()
                self.update(loss, step)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                elapsed = (time.time() - start) / 60
                minutes = self.minutes_before + elapsed
                out_of_time = cfg.max_minutes and elapsed >= cfg.max_minutes  # this invocation's budget
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                    record = {"step": step + 1, "minutes": minutes, "loss": loss.item(), **measure()}
                    print(json.dumps(record), file=log, flush=True)
                    tqdm.write(json.dumps(record))
                    ckpt = self.out / f"step{step + 1:06d}"
                    save_checkpoint(ckpt)
                    record_file = ckpt / "flowgrpo_pretrain.json"
                    record_file.write_text(json.dumps({"config": asdict(cfg), "record": record}, indent=1))
                    self.save_state(step + 1, minutes)
                elif out_of_time:
                    self.save_state(step + 1, minutes)
                if out_of_time and step + 1 < cfg.steps:
                    tqdm.write(f"stopped at step {step + 1} after {cfg.max_minutes:g} minutes; --resume continues")
                    break
        return self.out
