"""Checkpoints of every trainer: crash-safe on disk, exact on resume, the same for images and text.

A checkpoint is a directory ``iter-NNNNNN/`` holding ``weights.safetensors`` (the trainable parameters by name),
``optimizer.pt`` (loaded with weights_only=True), optionally ``ema.safetensors`` and ``strategy.safetensors`` (the
tensors a strategy carries, e.g. DiffusionNFT's old policy), ``state.json`` (iteration, time,
tracker, strategy state, history) and, written last, ``COMPLETE``: a manifest of every file's size and SHA-256.
It is written into ``iter-NNNNNN.tmp/`` with every file fsync'd, then renamed into place, so a kill at any instant
leaves either the previous checkpoints alone or the new one complete. The newest ``keep`` complete checkpoints stay;
older ones are deleted marker first, so a half-deleted one is never taken for complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowgrpo.core import PromptStatTracker
from flowgrpo.policies.state import CheckpointError

FORMAT = 2
MARKER = "COMPLETE"
_NAME = re.compile(r"^iter-(\d{6,})$")


# ---------------------------------------------------------------------------------------------- training state
@dataclass
class TrainState:
    """Everything of a run that is not a tensor. Randomness needs no state: every draw is keyed by
    (seed, iteration, sample), see `flowgrpo.samplers.noise`."""

    iteration: int = 0
    train_seconds: float = 0.0
    tracker: PromptStatTracker = field(default_factory=PromptStatTracker)
    history: dict = field(default_factory=lambda: {"eval": [], "train": []})
    strategy: dict = field(default_factory=dict)  # the rollout strategy's own state (e.g. a calibrated noise scale)
    unscorable_streak: int = 0  # consecutive iterations without a scorable sample (their updates were skipped)

    def to_json(self) -> dict:
        return {"format": FORMAT, "iteration": self.iteration, "train_seconds": self.train_seconds,
                "tracker": self.tracker.state_dict(), "history": self.history, "strategy": self.strategy,
                "unscorable_streak": self.unscorable_streak}

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        tracker = PromptStatTracker()
        tracker.load_state_dict(d["tracker"])
        return cls(int(d["iteration"]), float(d["train_seconds"]), tracker, d["history"], d["strategy"],
                   int(d["unscorable_streak"]))


# ---------------------------------------------------------------------------------------------- optimizer state
def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, whole (a collective when sharded; process 0 gets it), so a
    checkpoint resumes with any number of processes and either sharding."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, where: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    try:
        set_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer), optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: its optimizer state does not fit this run's parameters ({e})") from e


# ---------------------------------------------------------------------------------------------- one directory
Writer = Callable[[Path], None]  # writes one file at the path it is given


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint_dir(path: Path, files: dict[str, Writer]) -> Path:
    """Write ``files`` (name -> writer) as the complete checkpoint directory ``path``, atomically (see module doc).
    An existing ``path`` is replaced only once the new one is complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        manifest = {"format": FORMAT, "files": {}}
        for name, write in files.items():
            write(tmp / name)
            _fsync(tmp / name)
            manifest["files"][name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        (tmp / MARKER).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MARKER)
        _fsync(tmp)
        if path.exists():  # an explicit path being overwritten: retire the old one marker first
            _retire(path)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as e:  # a full disk, a failing writer, Ctrl-C: leave no half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):
            raise CheckpointError(f"could not write checkpoint {path}: {type(e).__name__}: {e}") from e
        raise
    return path


def verify_checkpoint_dir(path: Path) -> list[str]:
    """The file names of a complete checkpoint, after checking every file against its manifest (size, SHA-256)."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker: never finished, or not a "
                              "checkpoint of this project)")
    try:
        manifest = json.loads(marker.read_text())
        expected = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable {MARKER} manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')!r}, this version reads {FORMAT}")
    for name, meta in expected.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = f.stat().st_size
        if size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupt ({size} bytes, {meta['bytes']} written; "
                                  "checksum differs)")
    return list(expected)


def _retire(path: Path) -> None:
    """Delete a checkpoint so that no instant leaves it looking complete: marker first, then the rest."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- a run's checkpoints
class CheckpointDir:
    """The checkpoints of one run: ``root/iter-NNNNNN/``, the newest ``keep`` complete ones kept."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _NAME.match(p.name)) and (p / MARKER).is_file()]
        return [p for _, p in sorted(found)]

    def newest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, iteration: int, files: dict[str, Writer]) -> Path:
        path = write_checkpoint_dir(self.root / f"iter-{iteration:06d}", files)
        for old in self.complete()[: -self.keep]:
            _retire(old)
        for junk in self.root.glob("iter-*.tmp"):  # left by a kill during an earlier save
            shutil.rmtree(junk, ignore_errors=True)
        return path


# ---------------------------------------------------------------------------------------------- what trainers save
def training_files(weights: dict[str, torch.Tensor], optimizer_state: dict, state: TrainState, *, kind: str,
                   config: dict, ema: dict[str, torch.Tensor] | None = None,
                   strategy: dict[str, torch.Tensor] | None = None) -> dict[str, Writer]:
    """The files of a training checkpoint. ``kind`` ('flow', 'mdm', 'llm') and ``config`` let a resume refuse a
    checkpoint of another trainer or an incompatible run."""
    meta = json.dumps({"kind": kind, "config": config, **state.to_json()}, default=str)
    files: dict[str, Writer] = {
        "weights.safetensors": lambda p: save_file(weights, str(p)),
        "optimizer.pt": lambda p: torch.save(optimizer_state, p),
        "state.json": lambda p: p.write_text(meta),
    }
    for name, tensors in (("ema", ema), ("strategy", strategy)):
        if tensors:
            files[f"{name}.safetensors"] = lambda p, t=tensors: save_file(
                {n: v.detach().cpu().contiguous() for n, v in t.items()}, str(p))
    return files


@dataclass
class LoadedTraining:
    weights: dict[str, torch.Tensor]
    optimizer_state: dict
    state: TrainState
    config: dict
    ema: dict[str, torch.Tensor] | None
    strategy: dict[str, torch.Tensor]  # the strategy's tensors ({} when it carries none)


def read_training(path: str | Path, *, kind: str, check_config: Callable[[dict], None] | None = None) -> LoadedTraining:
    """Verify and parse a training checkpoint; errors name the checkpoint and the culprit."""
    path = Path(path)
    names = verify_checkpoint_dir(path)
    for name in ("weights.safetensors", "optimizer.pt", "state.json"):
        if name not in names:
            raise CheckpointError(f"{path}: not a training checkpoint ({name} is missing)")
    try:
        meta = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "weights.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
        ema = load_file(str(path / "ema.safetensors")) if "ema.safetensors" in names else None
        strategy = load_file(str(path / "strategy.safetensors")) if "strategy.safetensors" in names else {}
        state = TrainState.from_json(meta)
    except Exception as e:  # safetensors, torch and json raise many types for bad bytes
        raise CheckpointError(f"{path} is unreadable: {type(e).__name__}: {e}") from e
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is a {meta.get('kind')!r} checkpoint; this trainer resumes {kind!r} ones")
    if check_config is not None:
        check_config(meta.get("config", {}))
    return LoadedTraining(weights, optimizer_state, state, meta.get("config", {}), ema, strategy)
