"""The op's options as frozen, typed groups, each checked once, where it is built.

    LossOptions     what the loss is: tau (the DCR coefficient's threshold), reduction,
                    normalizer, ignore_index
    PolicyOptions   the GRPO-family terms: clipping, KL, entropy (their per-token log-probs
                    arrive per call: ``PolicyOptions.bind``)
    LogitOptions    how the logits are made: temperature, softcap (the bias is a tensor input)
    RunOptions      how it runs: backend, launch options, vocabulary-parallel group, stats, checks

``gft_loss`` builds them from its keywords, ``GFTLoss`` once at construction; the trainer, the
TRL trainer and the verl loss import ``IGNORE_INDEX`` and ``check_tau`` from here.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .engine import KernelOptions, engine_names
from .head import KL_ESTIMATORS, REDUCTIONS, PolicyTerms

# The target id that marks a token that does not count (transformers' and PyTorch's default).
IGNORE_INDEX = -100


def real(name: str, value, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_tau(tau, name: str = "tau") -> float:
    """The DCR threshold: a real number >= 0 (0: SFT / policy gradient, > 1: DFT weighting)."""
    tau = real(name, tau, allow_inf=True)
    if tau < 0:
        raise ValueError(f"{name} must be >= 0 (0: plain SFT/policy gradient, > 1: DFT), got {tau}")
    return tau


def check_backend_name(backend) -> None:
    names = ("auto", *engine_names())
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")


def check_normalizer(normalizer, reduction):
    """An explicit denominator for ``reduction`` (None: the local count): > 0, a number or a one-element tensor."""
    if normalizer is None:
        return None
    if reduction in ("sum", "none"):
        raise ValueError(
            f"normalizer applies to reduction='mean' and the 'seq-' reductions, got reduction={reduction!r}"
        )
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}"
            )
        return normalizer
    normalizer = real("normalizer", normalizer)
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return normalizer


@dataclass(frozen=True)
class LossOptions:
    tau: float = 0.7
    reduction: str = "mean"
    normalizer: float | Tensor | None = None
    ignore_index: int = IGNORE_INDEX

    @classmethod
    def build(cls, tau=0.7, reduction="mean", normalizer=None, ignore_index=IGNORE_INDEX) -> LossOptions:
        tau = check_tau(tau)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        return cls(tau, reduction, check_normalizer(normalizer, reduction), int(ignore_index))


@dataclass(frozen=True)
class PolicyOptions:
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.0
    kl: str = "k3"
    entropy_coef: float = 0.0

    @classmethod
    def build(cls, clip_low=0.2, clip_high=None, dual_clip=None, beta=0.0, kl="k3", entropy_coef=0.0) -> PolicyOptions:
        clip_low = real("clip_low", clip_low)
        if not 0.0 <= clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1) (the ratio is clipped below at 1 - clip_low), got {clip_low}")
        clip_high = clip_low if clip_high is None else real("clip_high", clip_high, allow_inf=True)
        if clip_high < 0:
            raise ValueError(f"clip_high must be >= 0 (the ratio is clipped above at 1 + clip_high), got {clip_high}")
        if dual_clip is not None:
            dual_clip = real("dual_clip", dual_clip)
            if dual_clip <= 1.0:
                raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip}")
        beta = real("beta", beta)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if kl not in KL_ESTIMATORS:
            raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")
        return cls(clip_low, clip_high, dual_clip, beta, kl, real("entropy_coef", entropy_coef))

    def bind(self, old_logp: Tensor | None, ref_logp: Tensor | None) -> PolicyTerms:
        """The terms of one call: these options with that call's flat per-token log-probs."""
        if self.beta > 0 and ref_logp is None:
            raise ValueError(f"beta={self.beta} needs ref_logp (the reference model's per-token log-probs)")
        return PolicyTerms(
            old_logp=old_logp,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            dual_clip=self.dual_clip,
            ref_logp=ref_logp,
            beta=self.beta,
            kl=self.kl,
            entropy_coef=self.entropy_coef,
        )


@dataclass(frozen=True)
class LogitOptions:
    temperature: float = 1.0
    softcap: float | None = None

    @classmethod
    def build(cls, temperature=1.0, softcap=None) -> LogitOptions:
        temperature = real("temperature", temperature)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if softcap is not None:
            softcap = real("softcap", softcap)
            if softcap <= 0:
                raise ValueError(f"softcap must be > 0 or None, got {softcap}")
        return cls(temperature, softcap)


@dataclass(frozen=True)
class RunOptions:
    backend: str = "auto"
    launch: Any = None  # gft_kernels.triton_ops.LaunchOptions or None
    vocab_parallel_group: Any = None
    vocab_start: int | None = None
    return_stats: bool = False
    check_values: bool = True

    @classmethod
    def build(
        cls,
        backend="auto",
        launch_options=None,
        vocab_parallel_group=None,
        vocab_start=None,
        return_stats=False,
        check_values=True,
    ) -> RunOptions:
        check_backend_name(backend)
        if launch_options is not None:
            from .triton_ops import LaunchOptions

            if not isinstance(launch_options, LaunchOptions):
                raise TypeError(
                    f"launch_options must be a gft_kernels.triton_ops.LaunchOptions or None, "
                    f"got {type(launch_options).__name__}"
                )
        if vocab_start is not None and (
            isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0
        ):
            raise ValueError(f"vocab_start must be an int >= 0 or None, got {vocab_start!r}")
        return cls(backend, launch_options, vocab_parallel_group, vocab_start, bool(return_stats), bool(check_values))


@dataclass(frozen=True)
class GFTOptions:
    """Every option of one op, checked."""

    loss: LossOptions
    policy: PolicyOptions
    logits: LogitOptions
    run: RunOptions

    def kernel(self, engine=None) -> KernelOptions:
        """The engine's view: how logits are made, what the backward takes, how to launch (the
        launch options when they are ``engine``'s kind; None: no engine chosen yet)."""
        launch_type = None if engine is None else engine.launch_options
        return KernelOptions(
            temperature=self.logits.temperature,
            softcap=self.logits.softcap,
            with_entropy=self.run.return_stats or self.policy.entropy_coef != 0.0,
            entropy_grad=self.policy.entropy_coef != 0.0,
            launch=self.run.launch if launch_type is not None and isinstance(self.run.launch, launch_type) else None,
            outside=self.run.vocab_parallel_group is not None,
        )
