"""The processes of a run: who we are, and the few collectives the trainer needs.

Built on accelerate, so `accelerate launch` and `torchrun` both work. The trained module is shared by DDP (each
process holds it all; gradients are all-reduced) or sharded by FSDP2 (``fully_shard`` on each block and the root:
parameters, gradients and optimizer state are split over the processes, and every forward gathers a block's
parameters, so the processes must run their forwards in step). On a machine without CUDA the accelerator is built with
``cpu=True``: that is what makes 2 processes under a launcher form one gloo group instead of two independent runs.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.distributed as torch_dist
from torch import Tensor

from flowgrpo.policies.state import full_tensor


class LaunchError(RuntimeError):
    """The launcher started several processes, but they do not form one process group."""


class Dist:
    """Rank, world size, device and collectives. With one process every collective is the identity."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.sharded = False  # FSDP: forwards are collectives, parameters DTensors (set by ``prepare``)
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        self.is_main = accelerator.is_main_process
        self.traffic: Counter = Counter()  # bytes this process put into each kind of collective (benchmarks read it)

    @classmethod
    def create(cls, **accelerator_kwargs) -> "Dist":
        """The run's processes, from the launcher's environment (one process without a launcher).
        Raises LaunchError when WORLD_SIZE > 1 but no process group of that size forms."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        launched = int(os.environ.get("WORLD_SIZE", "1"))
        # the models' buffers (e.g. positional tables) are constants: broadcasting them before every forward would
        # be wasted traffic and would make every forward a collective
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        try:
            accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp], **accelerator_kwargs)
        except (ValueError, RuntimeError, KeyError) as e:
            raise LaunchError(f"the launcher asked for {launched} processes (WORLD_SIZE={launched}) but the process "
                              f"group could not be set up: {e}") from e
        if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise LaunchError(f"the accelerate config asks for {accelerator.distributed_type.name}; flowgrpo shards "
                              "itself: launch with `accelerate launch --multi_gpu` (or torchrun) and set --sharding fsdp")
        if accelerator.num_processes != launched:
            raise LaunchError(f"the launcher asked for {launched} processes (WORLD_SIZE={launched}) but this process "
                              f"sees {accelerator.num_processes}; run with `torchrun --nproc_per_node N` or "
                              "`accelerate launch --multi_gpu --num_processes N`")
        return cls(accelerator)

    # ------------------------------------------------------------------ collectives
    def gather(self, t: Tensor) -> Tensor:
        """Concatenate ``t`` (same shape on every rank) over ranks, in rank order, on every rank."""
        if self.world_size == 1:
            return t
        self.traffic["gather"] += t.numel() * t.element_size()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def gather_objects(self, items: Sequence) -> list:
        """Concatenate lists of picklable objects over ranks, in rank order, on every rank."""
        if self.world_size == 1:
            return list(items)
        self.traffic["gather_objects"] += len(pickle.dumps(list(items)))
        out: list = [None] * self.world_size
        torch_dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """Elementwise sum / min / max over ranks (a new tensor)."""
        if self.world_size == 1:
            return t.clone()
        self.traffic["all_reduce"] += t.numel() * t.element_size()
        out = t.clone()
        torch_dist.all_reduce(out, op={"sum": torch_dist.ReduceOp.SUM, "min": torch_dist.ReduceOp.MIN,
                                       "max": torch_dist.ReduceOp.MAX}[op])
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    # ------------------------------------------------------------------ training
    def prepare(self, module: torch.nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], *,
                sharding: str = "ddp", units: Sequence[torch.nn.Module] = ()):
        """The module ready for data parallelism, and its optimizer (made after sharding: FSDP replaces the
        parameters). ``ddp``: wrapped by DDP through accelerate. ``fsdp``: each of ``units`` (the model's repeated
        blocks) and then the root sharded in place; the module returned is ``module`` itself."""
        if sharding == "fsdp" and self.world_size > 1:
            from torch.distributed.fsdp import fully_shard

            for unit in units:
                fully_shard(unit)
            # the root too gives its gathered parameters back after every forward: sampling and evaluation run
            # forwards with no backward, and the optimizer and checkpoints must always see the sharded parameters
            fully_shard(module, reshard_after_forward=True)
            self.sharded = True
            return module, make_optimizer()
        return self.accelerator.prepare(module, make_optimizer())

    def no_sync(self, module: torch.nn.Module, skip: bool):
        """Accumulate gradients locally (no all-reduce) in this backward when ``skip``; the last backward of an
        optimizer step runs outside it and reduces everything accumulated. (FSDP reduce-scatters every backward:
        its gradients accumulate sharded.)"""
        if skip and self.world_size > 1 and not self.sharded:
            return self.accelerator.no_sync(module)
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters, max_norm: float) -> float:
        """Clip the (reduced) gradient to ``max_norm`` (0 = no clipping); returns the norm before clipping."""
        limit = max_norm if max_norm > 0 else float("inf")
        if self.sharded:  # the norm of the sharded gradients, reduced over the processes
            return float(full_tensor(torch.nn.utils.clip_grad_norm_(list(parameters), limit)))
        return float(self.accelerator.clip_grad_norm_(parameters, limit))

    def in_step(self, work: bool) -> bool:
        """Whether any process still has work (always ``work`` unless sharded: then forwards must stay in step)."""
        if not self.sharded:
            return work
        return bool(self.all_reduce(torch.tensor([int(work)], device=self.device), "max").item())
