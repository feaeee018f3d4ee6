"""One optimization step: groups -> micro-batches -> fused GFT loss -> one optimizer step.

A step takes ``prompts_per_step`` groups (all their responses), split across the processes, in
micro-batches of ``micro_batch_size`` sequences. The loss of every micro-batch is normalized by
the *global* number of valid tokens (or sequences) of the step, all micro-batches and processes
together, so 1 process and N processes on the same global batch give the same update.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from gft_kernels import GFTLoss
from gft_kernels.head import aggregation_reduction

from .distributed import max_over_processes
from .lm import causal_lm_gft_loss, encode
from .packing import PackedBatch, pack


class TokenSums(NamedTuple):
    """Sums over a micro-batch's valid tokens (detached 0-dim tensors), added over micro-batches
    and processes; a mean is a sum over ``tokens``."""

    rectified: Tensor  # tokens whose DCR coefficient is sg(p) (p < tau)
    target_prob: Tensor  # the target's probability p
    entropy: Tensor  # the entropy of the token's distribution
    tokens: Tensor  # valid tokens
    correct: Tensor  # tokens whose target has the largest logit

    def stacked(self) -> Tensor:
        return torch.stack(tuple(self))


def run_loss(cfg) -> GFTLoss:
    """The run's loss, built once from its ``config.Config``: tau, the reduction of
    ``loss_aggregation``, the entropy bonus and the engine; each step's normalizer (global
    counts) comes with its micro-batches. Statistics for the metrics; no value checks (the
    trainer builds its batches) and so no host sync per micro-batch."""
    reduction, _ = aggregation_reduction(cfg.loss_aggregation)
    return GFTLoss(
        cfg.tau,
        reduction=reduction,
        entropy_coef=cfg.entropy_coef,
        backend=cfg.loss_backend,
        return_stats=True,
        check_values=False,
    )


class GFTPolicy(nn.Module):
    """The causal LM plus the fused loss, as one module, so DDP/FSDP wrap the whole computation
    (a loss computed from the backbone outside the wrapper's forward would skip gradient sync).
    ``loss`` is the run's ``GFTLoss`` (``run_loss``), built once."""

    def __init__(self, model, loss: GFTLoss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch, normalizer) -> tuple[Tensor, TokenSums]:
        """The loss of one micro-batch (``lm.Batch``, or ``packing.PackedBatch``: rows of its
        sequences, labels already shifted per sequence) over ``normalizer``, and its token sums."""
        if isinstance(batch, PackedBatch):  # the op reduces over the row's sequences (seq_ids)
            loss, stats = causal_lm_gft_loss(
                self.model,
                batch.input_ids,
                None,
                None,
                batch.adv,
                loss=self.loss,
                normalizer=normalizer,
                shift_labels=batch.labels,
                seq_ids=batch.seq_ids,
                position_ids=batch.position_ids,
            )
        else:
            loss, stats = causal_lm_gft_loss(
                self.model,
                batch.input_ids,
                batch.attention_mask,
                batch.labels,
                batch.adv,
                loss=self.loss,
                normalizer=normalizer,
            )
        n = stats.n_valid
        # (stats.entropy is 0 at ignored tokens: its sum is over the valid ones)
        sums = TokenSums(
            stats.rectified_frac * n, stats.mean_prob * n, stats.entropy.sum(), n.float(), stats.accuracy * n
        )
        return loss, TokenSums(*(x.detach() for x in sums))


def aggregation(name: str, n_tokens: float, n_seqs: float, max_length: int) -> tuple[str, float]:
    """(gft_loss reduction, normalizer) of a trainer loss aggregation, given the global batch's
    valid tokens and sequences per process (DDP averages gradients over processes)."""
    return aggregation_reduction(name, n_tokens, n_seqs, max_length)


@dataclass
class StepBatches:
    """This process's micro-batches of a step, and the step's global counts."""

    batches: list  # lm.Batch, or packing.PackedBatch in a packed run
    tokens: float  # valid tokens, all processes
    seqs: float  # sequences with a valid token, all processes
    cut: int  # responses cut at max_length
    responses: float  # responses of the step


def step_batches(
    acc, tokenizer, groups, micro_batch_size: int, max_length: int, packed: bool = False, one_row: bool = False
) -> StepBatches:
    """The step's sequences, this process's share of them in micro-batches (with ``packed``, each
    packed into best-fit rows, or into one row with ``one_row``: ``packing.packs_in_one_row``),
    and the global counts.
    Every process gets as many micro-batches as the busiest one (FSDP and ZeRO-3 gather weights in
    every forward, a collective all processes must join, and DDP syncs once): the extra ones are a
    sequence with every label masked, no loss and zero gradients."""
    # self-samples as the token ids the engine sampled; expert and teacher texts tokenized
    seqs = [(g.prompt, r.train_input, r.advantage) for g in groups for r in g.responses]
    mine = seqs[acc.process_index :: acc.num_processes]
    batches = [
        encode(tokenizer, mine[i : i + micro_batch_size], max_length) for i in range(0, len(mine), micro_batch_size)
    ]
    if packed:
        batches = [pack(b, rows=not one_row) for b in batches]
    counts = torch.tensor(
        [
            float(sum(b.n_valid for b in batches)),
            float(sum(b.n_seqs for b in batches)),
            float(sum(b.n_cut for b in batches)),
            float(len(mine)),
        ],
        device=acc.device,
    )
    counts = acc.reduce(counts, reduction="sum")
    n_micro = max_over_processes(acc, len(batches))
    while len(batches) < n_micro:
        extra = encode(tokenizer, seqs[:1], max_length)
        batches.append((pack(extra, rows=not one_row) if packed else extra).masked())
    return StepBatches(batches, counts[0].item(), counts[1].item(), int(counts[2].item()), counts[3].item())


def cut_warning(batches: StepBatches, step: int, max_length: int) -> str:
    # the reward scored each whole response, the loss trains only what fits
    return (
        f"{batches.cut} of {int(batches.responses)} responses of step {step} are cut at max_length "
        f"({max_length}): their reward scored the whole text, the loss trains only its first tokens; raise "
        "--max-length to train them whole (completions/cut_frac counts them per step)"
    )


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step reports (global over processes)."""

    loss: float
    rectified_frac: float
    mean_target_prob: float
    entropy: float
    token_accuracy: float
    grad_norm: float
    lr: float
    tokens: int
    cut_frac: float

    def metrics(self) -> dict:
        """The step's row of metrics.jsonl, by its keys."""
        return {
            "loss": self.loss,
            "dcr/rectified_frac": self.rectified_frac,
            "dcr/mean_target_prob": self.mean_target_prob,
            "entropy": self.entropy,
            "mean_token_accuracy": self.token_accuracy,
            "grad_norm": self.grad_norm,
            "lr": self.lr,
            "tokens": self.tokens,
            "completions/cut_frac": self.cut_frac,
        }


class TrainingDiverged(ValueError):
    """A step's loss or gradient norm is not finite: the run stops before that step updates the
    weights (DeepSpeed's engine excepted: it steps inside the backward) and before anything more is
    saved: the checkpoints already written stay, no final model. A ValueError, so the command line
    prints its one line."""

    def __init__(self, step, loss: float, grad_norm: float, opt):
        tries = [f"a lower --lr (now {opt.lr:g})"]
        if not opt.max_grad_norm:
            tries.append("gradient clipping (--max-grad-norm 1.0)")
        else:
            tries.append(f"a lower --max-grad-norm (now {opt.max_grad_norm:g})")
        if getattr(opt, "bf16", False):
            tries.append("fp32 (--bf16 false)")
        tries.append("a longer --warmup-steps")
        at = f"at step {step}" if step is not None else "at this step"
        super().__init__(
            f"training diverged {at}: loss {loss}, grad norm {grad_norm}; the run stops here (checkpoints "
            f"written so far are kept, no final model is written); try {', '.join(tries)}"
        )
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


def optimizer_step(acc, policy, optimizer, scheduler, step: StepBatches, opt, at_step: int | None = None) -> StepStats:
    """Forward and backward of every micro-batch, then one optimizer and scheduler step; ``opt``
    is the run's ``config.Optimization``; ``at_step`` the step's number (1-based) for messages.
    A loss or gradient norm that is not finite raises ``TrainingDiverged`` before the optimizer
    step, on every process alike (both figures are global)."""
    from accelerate.utils import DistributedType

    # DDP averages gradients over processes: normalize by the global counts / processes (the
    # reduction is the policy's loss's, built once from the same aggregation)
    _, normalizer = aggregation(
        opt.loss_aggregation, step.tokens / acc.num_processes, step.seqs / acc.num_processes, opt.max_length
    )
    loss_sum = torch.zeros((), device=acc.device)
    sums = torch.zeros(len(TokenSums._fields), device=acc.device)
    for i, batch in enumerate(step.batches):
        batch = batch.to(acc.device)
        sync = i == len(step.batches) - 1
        ctx = acc.no_sync(policy) if not sync else contextlib.nullcontext()
        with ctx, acc.autocast():
            loss, s = policy(batch, normalizer)
        if acc.distributed_type == DistributedType.DEEPSPEED:  # the engine steps at the last one
            acc.deepspeed_engine_wrapped.backward(loss, sync_gradients=sync)
        else:
            acc.backward(loss)
        loss_sum += loss.detach()
        sums += TokenSums(*s).stacked()
    # (DeepSpeed clips inside its step, by its config's gradient_clipping, and reports the norm).
    # max_grad_norm 0 is no clipping, as in transformers' Trainer; an infinite bound computes the
    # norm (logged, and checked below) and scales the gradients by 1.
    norm = acc.clip_grad_norm_(policy.parameters(), opt.max_grad_norm or float("inf"))
    grad_norm = float("nan") if norm is None else float(norm)  # (None: a DeepSpeed engine that kept none)
    # The loss over processes, and whether any process saw a non-finite norm, in one reduction:
    # every process then stops, or none does (a process that stopped alone would hang the others).
    # (Under DeepSpeed the engine has stepped already, inside the last backward: the run still
    # stops before anything is saved.)
    bad_norm = float(norm is not None and not math.isfinite(grad_norm))
    loss_all, any_bad_norm = acc.reduce(torch.stack((loss_sum, loss_sum.new_tensor(bad_norm))), reduction="mean")
    if not math.isfinite(loss_all.item()) or any_bad_norm.item() > 0:
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(at_step, loss_all.item(), grad_norm, opt)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total = TokenSums(*acc.reduce(sums, reduction="sum"))
    count = total.tokens.clamp_min(1)
    return StepStats(
        loss=loss_all.item(),
        rectified_frac=(total.rectified / count).item(),
        mean_target_prob=(total.target_prob / count).item(),
        entropy=(total.entropy / count).item(),
        token_accuracy=(total.correct / count).item(),
        grad_norm=grad_norm,
        lr=scheduler.get_last_lr()[0],
        tokens=int(step.tokens),
        cut_frac=step.cut / max(step.responses, 1.0),
    )


def scheduled_lrs(scheduler) -> list[float]:
    """Each parameter group's rate at the scheduler's current step, from its schedule (a
    ``LambdaLR``, as every transformers schedule is), not from the rate the optimizer holds."""
    if not hasattr(scheduler, "lr_lambdas"):
        return scheduler.get_last_lr()
    return [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
