"""Distributed set-up: the Accelerator a launch asked for, the policy and optimizer prepared for
it, and what sharded weights need (a whole state dict, collectives every process joins).

DDP, FSDP1, FSDP2 and DeepSpeed ZeRO-3 are checked against one process
(tests/train/test_sharded_training.py)."""

from __future__ import annotations

import os

import torch


def launch_asks(name: str) -> bool:
    """Whether ``accelerate launch`` was configured for FSDP or DeepSpeed (it says so in the env)."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() in ("1", "true")


def make_accelerator(mixed_precision: str, **kwargs):
    """The Accelerator for this launch, with the distribution its config asked for.

    On a machine without CUDA, accelerate quietly turns an FSDP launch into DDP (or into N
    processes training alone), and under DeepSpeed counts one process on every rank. Here a CPU
    launch gets what it asked for, over gloo: FSDP is set on the state as accelerate would set it
    on GPUs, and DeepSpeed's process count is read from torch.distributed. Anything else that
    was asked for and not given is an error, never a silent fallback. ``kwargs`` go to the
    ``Accelerator`` (the trackers: ``trackers.accelerator_kwargs``)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if torch.cuda.is_available():
        acc = Accelerator(mixed_precision=mixed_precision, **kwargs)
    elif launch_asks("DEEPSPEED"):
        acc = Accelerator(mixed_precision=mixed_precision, cpu=False, **kwargs)
        if torch.distributed.is_initialized():
            state = PartialState()
            state.num_processes = torch.distributed.get_world_size()
            state.process_index = torch.distributed.get_rank()
            state.local_process_index = int(os.environ.get("LOCAL_RANK", state.process_index))
    else:
        # cpu=True: a multi-process launch runs real gloo DDP (without it, each process of
        # `accelerate launch --multi_gpu` silently trains alone)
        acc = Accelerator(mixed_precision=mixed_precision, cpu=True, **kwargs)
        if launch_asks("FSDP") and acc.num_processes > 1:
            acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
            for state in (acc.state, PartialState()):  # a new AcceleratorState copies PartialState's
                state.distributed_type = DistributedType.FSDP
                state.device = torch.device("cpu")
    for name, kind in (("FSDP", DistributedType.FSDP), ("DEEPSPEED", DistributedType.DEEPSPEED)):
        if launch_asks(name) and acc.num_processes > 1 and acc.distributed_type != kind:
            raise RuntimeError(f"the launch asked for {name} but accelerate set up {acc.distributed_type}")
    return acc


def prepare(acc, policy: torch.nn.Module, optimization):
    """(prepared policy, prepared optimizer, scheduler): AdamW and the learning-rate schedule of
    ``optimization`` (a ``config.Optimization``) on the policy's weights. The scheduler is
    registered for checkpointing and not prepared: accelerate would step it once per process per
    optimizer step (it assumes a sharded dataloader); one step of ours is one global batch."""
    from accelerate.utils import DistributedType
    from transformers import get_scheduler

    def adamw(params):
        return torch.optim.AdamW(params, lr=optimization.lr, weight_decay=optimization.weight_decay)

    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        # FSDP1 replaces the parameters (flat ones without use_orig_params): the optimizer
        # must hold the wrapped model's, or it steps weights the model no longer uses
        policy = acc.prepare(policy)
        optimizer = adamw([p for p in policy.parameters() if p.requires_grad])
        prepared = acc.prepare(optimizer)
    else:  # FSDP2 and DeepSpeed take both at once (they rebuild the optimizer's groups)
        optimizer = adamw([p for p in policy.model.parameters() if p.requires_grad])  # (LoRA: the adapter)
        policy, prepared = acc.prepare(policy, optimizer)
    scheduler = get_scheduler(
        optimization.lr_scheduler,
        optimizer,
        num_warmup_steps=optimization.warmup_steps,
        num_training_steps=optimization.max_steps,
    )
    acc.register_for_checkpointing(scheduler)
    return policy, prepared, scheduler


def is_sharded(acc) -> bool:
    """Whether the weights are split across processes (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return True
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return acc.state.deepspeed_plugin.zero_stage == 3
    return False


def full_state_dict(acc, policy) -> dict:
    """The model's whole state dict on the main process (every process must call it); ``policy``
    is the prepared module whose ``.model`` is the causal LM."""
    from accelerate.utils import DistributedType

    model = acc.unwrap_model(policy).model
    if acc.distributed_type == DistributedType.DEEPSPEED and is_sharded(acc):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not is_sharded(acc):
        return model.state_dict()
    if not acc.is_fsdp2:
        # FSDP1 (accelerate's get_state_dict, offloading to the CPU, crashes on a CPU run)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(policy, writeback=False):
            state = acc.unwrap_model(policy).state_dict()
            state = {k.replace("_fsdp_wrapped_module.", ""): v.detach().clone() for k, v in state.items()}
    else:
        state = acc.get_state_dict(policy)
    return {k.removeprefix("model."): v for k, v in state.items()}


def max_over_processes(acc, n: int) -> int:
    if acc.num_processes == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=acc.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())
