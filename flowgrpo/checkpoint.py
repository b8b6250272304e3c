"""All training state in one place, saved and restored exactly.

A checkpoint directory holds `weights.safetensors` (trainable weights: the full transformer or
the LoRA parameters), `optimizer.pt` (the optimizer state, loaded with weights_only=True),
`ema.safetensors` (the weights' moving average, when the run keeps one) and `state.json` (iteration,
training time, every RNG stream, the prompt-stat tracker, the EMA's update count, history).
A run stopped after any checkpoint resumes as if it had never stopped.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flowgrpo.core import PromptStatTracker
from flowgrpo.ema import WeightEMA

FORMAT = 1


@dataclass
class TrainState:
    iteration: int
    train_seconds: float
    rollout_rng: torch.Generator  # rollout noise (per process)
    prompt_rng: np.random.Generator  # data position: which prompts come next
    tracker: PromptStatTracker
    history: dict = field(default_factory=lambda: {"eval": [], "train": []})
    ema: WeightEMA | None = None  # the weights' moving average (evaluation and export use it)

    @classmethod
    def fresh(cls, seed: int, process_index: int = 0) -> "TrainState":
        stream = seed * 1000 + process_index  # each process its own streams
        return cls(0, 0.0, torch.Generator().manual_seed(stream), np.random.default_rng(stream), PromptStatTracker())

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "iteration": self.iteration,
            "train_seconds": self.train_seconds,
            "rollout_rng": base64.b64encode(self.rollout_rng.get_state().numpy().tobytes()).decode(),
            "prompt_rng": self.prompt_rng.bit_generator.state,
            "tracker": self.tracker.state_dict(),
            "ema_updates": self.ema.updates if self.ema is not None else None,
            "history": self.history,
        }

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        if d.get("format") != FORMAT:
            raise ValueError(f"unsupported checkpoint format {d.get('format')!r} (expected {FORMAT})")
        g = torch.Generator()
        g.set_state(torch.frombuffer(bytearray(base64.b64decode(d["rollout_rng"])), dtype=torch.uint8))
        rng = np.random.default_rng()
        rng.bit_generator.state = d["prompt_rng"]
        tracker = PromptStatTracker()
        tracker.load_state_dict(d["tracker"])
        return cls(int(d["iteration"]), float(d["train_seconds"]), g, rng, tracker, d["history"])


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    """Write atomically: into a temporary directory, then rename over the old checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), tmp / "weights.safetensors")
    if state.ema is not None:
        save_file({n: t.contiguous() for n, t in state.ema.shadow.items()}, tmp / "ema.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state.to_json()))
    if path.exists():
        old = path.with_name(path.name + ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, path)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    ema: WeightEMA | None = None) -> TrainState:
    """Restore weights, optimizer and (if given) the EMA in place; return the training state.
    Clear errors for bad checkpoints."""
    path = Path(path)
    files = ("weights.safetensors", "optimizer.pt", "state.json") + (("ema.safetensors",) if ema is not None else ())
    missing = [n for n in files if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {missing}")
    try:
        weights = load_file(path / "weights.safetensors")
        state = json.loads((path / "state.json").read_text())
    except Exception as e:  # safetensors and json raise several types for corrupt files
        raise ValueError(f"checkpoint {path} is corrupt: {e}") from e
    expected = trainable_state_dict(model)
    if set(weights) != set(expected):
        diff = sorted(set(weights) ^ set(expected))[:5]
        raise ValueError(f"checkpoint {path} does not match the model's trainable parameters (e.g. {diff})")
    for name, p in model.named_parameters():
        if name in weights:
            if weights[name].shape != p.shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(weights[name].shape)}, model {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(weights[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    restored = TrainState.from_json(state)
    if ema is not None:
        shadow = load_file(path / "ema.safetensors")
        if set(shadow) != set(ema.shadow) or state.get("ema_updates") is None:
            raise ValueError(f"checkpoint {path}: its EMA does not match the run's trainable parameters")
        for n, t in shadow.items():
            ema.shadow[n].copy_(t)
        ema.updates = int(state["ema_updates"])
        restored.ema = ema
    return restored
