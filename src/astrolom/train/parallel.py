"""Distribution, precision and compilation applied *to* a plain AstroPT (the model file knows none of it).

- `init_distributed`: reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and joins the process group:
  NCCL on GPUs, gloo on CPU. Without torchrun it is a world of one and nothing is initialised.
- `parallelize`: DDP, or FSDP2 (`fully_shard` per block, then the root) for models that do not fit one device,
  plus optional per-block `torch.compile`. `grad_sync` skips the gradient all-reduce on accumulation micro-steps.
- `resolve_precision` / `autocast`: the one bf16 choice for training and embedding (auto: bf16 autocast on GPU,
  TF32 matmuls for what stays fp32; fp32 on CPU). `read_env` / `unwrap`: torchrun's environment, the plain model.
- `full_model_state` / `full_optimizer_state` and their `load_*` twins move complete, unsharded, CPU state between
  a wrapped model and a checkpoint, whatever the wrapping (none, DDP, FSDP).

Multi-node: `torchrun --nnodes N --nproc_per_node G --rdzv-endpoint HOST:PORT -m astrolom pretrain ...`; the world
size (and so the global batch, micro x accumulation x world) counts every process on every node.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_env() -> DistEnv:
    """This process's place in a torchrun job (RANK, LOCAL_RANK, WORLD_SIZE; a world of one without torchrun).

    Reads the environment only: no process group is joined and the device is left at CPU.
    """
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )


def init_distributed(device: str = "auto") -> DistEnv:
    """Join torchrun's process group if there is one; pick this rank's device ("auto": its GPU if any, else CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    env = read_env()
    world, rank, local_rank = env.world_size, env.rank, env.local_rank
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks, in place (means are sums / world: gloo has no AVG)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: int, env: DistEnv) -> int:
    if not env.distributed:
        return value
    t = torch.tensor([value], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj` (JSON-like values) on every rank, rank order."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPU (every GPU astrolom targets has bf16 units), fp32 on CPU; else `precision` itself."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def configure_backends(device: torch.device) -> None:
    """TF32 for fp32 matmuls/convolutions on GPU (Ampere and later)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def autocast(precision: str, device: torch.device):
    """Context for forward passes: bf16 autocast or nothing (fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -------------------------------------------------------------------------------------------------- wrapping


def choose_strategy(strategy: str, model: nn.Module, env: DistEnv) -> str:
    """'auto' -> none for one process, FSDP if params + grads + AdamW moments exceed 70% of a GPU, else DDP."""
    if strategy != "auto":
        if strategy != "none" and not env.distributed:
            return "none"
        return strategy
    if not env.distributed:
        return "none"
    if env.device.type == "cuda":
        need = sum(p.numel() for p in model.parameters()) * 4 * 4  # fp32 weights, grads, exp_avg, exp_avg_sq
        if need > 0.7 * torch.cuda.get_device_properties(env.device).total_memory:
            return "fsdp"
    return "ddp"


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6 (FSDP2)
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def parallelize(
    model: nn.Module, env: DistEnv, *, strategy: str = "auto", precision: str = "fp32", compile: bool = False
) -> tuple[nn.Module, str]:
    """Move `model` to this rank's device and wrap it; returns (wrapped model, strategy used)."""
    strategy = choose_strategy(strategy, model, env)
    model.to(env.device)
    if compile:
        for block in model.blocks:  # per block: small graphs, and FSDP can still shard block by block
            block.compile()
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        fully_shard = _fully_shard()
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32
        )
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    elif strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = DDP(model, device_ids=ids)
    return model, strategy


def unwrap(model: nn.Module) -> nn.Module:
    """The plain AstroPT inside DDP and `torch.compile` wrappers (FSDP2 shards in place: it is its own module)."""
    while isinstance(model, DDP) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DDP) else model._orig_mod
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Inside, backward passes do (enabled) or do not (accumulation micro-steps) all-reduce gradients."""
    if enabled:
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ------------------------------------------------------------------------------------------------- full states

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Complete CPU state dict with the plain model's names (a collective under FSDP: call on every rank)."""
    return get_model_state_dict(unwrap(model), options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Complete CPU optimiser state keyed by parameter names (collective under FSDP)."""
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load complete states (from `full_*_state`) into a wrapped model and its optimiser on every rank."""
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(unwrap(model), model_state, options=opts)
    set_optimizer_state_dict(unwrap(model), optimizer, optim_state, options=opts)
