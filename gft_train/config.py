"""The run configuration: one dataclass, read from YAML, overridden from the command line.

Every field is also a command-line flag (``--max-steps 50``; booleans as ``--dcr/--no-dcr``).
Fields left at ``None`` are filled by the method's preset (``METHODS``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# How the per-token losses of a global batch are combined (verl's names): the mean over all
# tokens (DAPO); the mean over sequences of each one's token mean (GRPO) or token sum; the token
# sum over sequences x max_length (Dr. GRPO's constant normalizer).
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# method -> (n_expert, n_teacher, n_self, tau, advantage from the group?) ; the paper's baselines
# are settings of the same loss (SPEC.md): SFT tau = 0, A = 1; DFT tau > 1, A = 1; GRPO tau = 0
# on self-samples only.
METHODS = {
    "gft": (1, 3, 4, 0.7, True),
    "sft": (1, 0, 0, 0.0, False),
    "dft": (1, 0, 0, math.inf, False),
    "grpo": (0, 0, 8, 0.0, True),
}


@dataclass
class Config:
    # what to train
    method: str = "gft"              # gft | sft | dft | grpo
    dcr: bool = True                 # --no-dcr: tau = 0 (the ablation "GFT without DCR")
    gal: bool = True                 # --no-gal: A = 1 for every response ("GFT without GAL")
    model: str = ""                  # a transformers causal LM saved on disk
    train_file: str = ""             # JSONL or Parquet rows: prompt, answer, expert[, teachers]
    eval_file: str = ""
    output_dir: str = "runs/gft"
    # groups
    n_expert: int | None = None      # per prompt; None: the method's preset
    n_teacher: int | None = None
    n_self: int | None = None
    teacher_model: str = ""          # generates teacher responses a row lacks (else: an error)
    reward: str = "math"             # "math" (math-verify) or "package.module:function"
    adv_eps: float = 1e-6            # A = (R - mean) / (sample std + eps), as the authors' code
    groups_file: str = ""            # offline: groups built once (build-groups) and trained on
    refresh_every: int = 0           # online: rebuild groups with the current weights every N steps
    # rollout
    engine: str = "auto"             # auto (vLLM if installed) | vllm | transformers
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    vllm_memory: float = 0.3         # vLLM gpu_memory_utilization (on CPU: share of RAM)
    # optimization
    tau: float | None = None         # DCR threshold; None: the method's preset (gft: 0.7)
    loss_aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    entropy_coef: float = 0.0        # entropy bonus: loss_t -= entropy_coef * H_t
    lr: float = 1e-5
    lr_scheduler: str = "cosine"     # any transformers scheduler name
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_steps: int = 100
    prompts_per_step: int = 8        # groups per optimizer step, over all processes
    micro_batch_size: int = 8        # sequences per forward/backward on one process
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    max_length: int = 1024
    seed: int = 0
    # checkpoints, logs, evaluation
    save_every: int = 0              # steps between checkpoints (0: only at the end)
    resume: bool = False
    eval_n: int = 4                  # samples per held-out prompt (mean pass@1, pass@k)
    eval_k: list[int] = field(default_factory=lambda: [1, 4])
    eval_max_prompts: int = 0        # 0: all
    eval_temperature: float = 1.0

    def resolved(self) -> "Config":
        """A copy with the method's preset filled in and everything checked."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        n_expert, n_teacher, n_self, tau, _ = METHODS[self.method]
        cfg = dataclasses.replace(
            self,
            n_expert=n_expert if self.n_expert is None else self.n_expert,
            n_teacher=n_teacher if self.n_teacher is None else self.n_teacher,
            n_self=n_self if self.n_self is None else self.n_self,
            tau=(tau if self.tau is None else self.tau) if self.dcr else 0.0,
        )
        if min(cfg.n_expert, cfg.n_teacher, cfg.n_self) < 0 or cfg.group_size == 0:
            raise ValueError(f"group mix must be >= 0 and not all 0, got expert={cfg.n_expert} "
                             f"teacher={cfg.n_teacher} self={cfg.n_self}")
        if cfg.tau < 0:
            raise ValueError(f"tau must be >= 0, got {cfg.tau}")
        if cfg.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {cfg.loss_aggregation!r}")
        if cfg.engine not in ("auto", "vllm", "transformers"):
            raise ValueError(f"engine must be auto, vllm or transformers, got {cfg.engine!r}")
        for name in ("max_steps", "prompts_per_step", "micro_batch_size", "max_new_tokens", "eval_n"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        return cfg

    @property
    def group_size(self) -> int:
        return (self.n_expert or 0) + (self.n_teacher or 0) + (self.n_self or 0)

    @property
    def uses_group_advantage(self) -> bool:
        return METHODS[self.method][4] and self.gal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (default None, so only what was given overrides the YAML)."""
    parser.add_argument("--config", help="YAML file of fields; flags override it")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "eval_k":
            parser.add_argument(flag, type=lambda s: [int(x) for x in s.split(",")], default=None)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}[f.type]
            parser.add_argument(flag, type=kind, default=None)


def from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    values = dataclasses.asdict(base or Config())
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        unknown = set(loaded) - set(values)
        if unknown:
            raise ValueError(f"{path}: unknown config fields {sorted(unknown)}")
        values.update(loaded)
    for f in dataclasses.fields(Config):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return Config(**values)


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
