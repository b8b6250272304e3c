"""A policy's trained parameters as named whole tensors: what checkpoints, exports and weight averages hold, the
same whether the parameters are whole or sharded over processes (FSDP2 DTensors)."""
from __future__ import annotations

import torch
from torch import Tensor


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names it and says what is intact."""


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP-sharded one (a collective: every process calls it); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def trainable_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    """CPU copies of the parameters that require grad, by name (whole tensors: a collective when sharded)."""
    return {n: full_tensor(p.detach()).cpu().clone().contiguous() for n, p in module.named_parameters()
            if p.requires_grad}


def load_trainable(module: torch.nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Copy ``tensors`` into the parameters that require grad; names and shapes must match exactly (a sharded
    parameter takes its shard of the whole tensor)."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise CheckpointError(f"{where} does not match the model's trainable parameters: missing {missing[:3]}, "
                              f"unexpected {extra[:3]} (a checkpoint of another model or LoRA setting?)")
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, the model {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(like(p, tensors[name]))


def like(p: Tensor, t: Tensor) -> Tensor:
    """``t`` (a whole tensor) laid out as ``p``: on its device, and sharded the same way when ``p`` is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    t = t.to(device=p.device, dtype=p.dtype)
    return distribute_tensor(t, p.device_mesh, p.placements) if isinstance(p, DTensor) else t
