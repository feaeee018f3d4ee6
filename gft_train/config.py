"""The run configuration: one dataclass of six groups, read from YAML, overridden from the command line.

Every field is also a command-line flag (``--max-steps 50``; booleans as ``--resume``,
``--bf16 false``, ``--no-dcr``), built by transformers' ``HfArgumentParser`` from the field's type
and its ``help`` metadata; ``gft-train train --help`` lists them with their defaults. Fields left at
``None`` are filled by the method's preset (``METHODS``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gft_kernels.engine import engine_names
from gft_kernels.head import AGGREGATIONS
from gft_kernels.options import check_tau

# How the per-token losses of a global batch are combined (verl's names; the kernel maps each to
# one of its reductions: gft_kernels.head.aggregation_reduction).
LOSS_AGGREGATIONS = AGGREGATIONS

# method -> (n_expert, n_teacher, n_self, tau, advantage from the group?) ; the paper's baselines
# are settings of the same loss (docs/spec.md): SFT tau = 0, A = 1; DFT tau > 1, A = 1; GRPO tau = 0
# on self-samples only.
METHODS = {
    "gft": (1, 3, 4, 0.7, True),
    "sft": (1, 0, 0, 0.0, False),
    "dft": (1, 0, 0, math.inf, False),
    "grpo": (0, 0, 8, 0.0, True),
}


def _opt(default=None, help: str = "", **kw):
    """A config field with its ``--help`` text (transformers' ``HfArgumentParser`` reads it)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _at_least_one(group, *names: str) -> None:
    for name in names:
        _check(group, name, ">= 1", lambda v: v >= 1)


def _check(group, name: str, rule: str, ok) -> None:
    """``group.name`` passes ``ok``, else one line naming the flag (``--name``, as the flag and
    the YAML key are both spelled) and the value. A NaN fails every comparison, so every rule
    refuses it."""
    value = getattr(group, name)
    if not ok(value):
        raise ValueError(f"--{name} must be {rule}, got {value!r}")


def _finite(v) -> bool:
    return math.isfinite(v)


# The schedules transformers' get_scheduler builds from a name alone and steps without a metric
# (cosine_with_min_lr and warmup_stable_decay need extra arguments, reduce_lr_on_plateau a metric).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


def _view(cls, cfg):
    """The group ``cls`` of ``cfg``: its fields' current values (a copy)."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


# The configuration's groups, one dataclass each; ``Config`` is all of them, flat (every field a
# flag and a YAML key of its own name, the saved gft_config.yaml a flat mapping), and
# ``cfg.optimization`` (etc.) is one group's values. Each group checks its own fields.


@dataclass
class ModelAndData:
    """What is trained, how, on what data, and where the run is written."""

    method: str = _opt("gft", "gft | sft | dft | grpo: the loss and group preset (METHODS in gft_train/config.py)")
    dcr: bool = _opt(True, "Dynamic Coefficient Rectification; --no-dcr sets tau = 0 (the ablation 'GFT without DCR')")
    gal: bool = _opt(
        True,
        "Group Advantage Learning; --no-gal is the paper's 'GFT w/o GAL': no group, the "
        "expert demonstrations alone with A = 1 and DCR (teachers only if --n-teacher is given; no self-samples)",
    )
    model: str = _opt(
        "", "the transformers causal LM to train: a local folder or a Hugging Face Hub id (required for train)"
    )
    train_file: str = _opt(
        "",
        "rows with prompt, answer, expert[, teachers]: a JSONL or Parquet file, a directory "
        "(datasets.save_to_disk, or a folder of such files) or a datasets Hub name",
    )
    columns: str = _opt(
        "",
        "the data's own column names, as FIELD=COLUMN pairs: 'prompt=question,expert=solution' "
        "(fields: prompt, answer, expert, teachers; TRL's 'completion' is the expert by default); "
        "in a YAML config also a mapping {prompt: question, expert: solution}",
    )
    eval_file: str = _opt("", "held-out rows (same format and sources) for gft-train eval and eval_every")
    output_dir: str = _opt("runs/gft", "where checkpoints, metrics.jsonl, tensorboard logs and final/ are written")
    train_split: str = _opt(
        "train",
        "the split of train_file when it is a datasets Hub name, a saved DatasetDict or "
        "a folder whose file names say splits",
    )
    dataset_config: str = _opt("", "the configuration (subset) of a datasets Hub name, e.g. 'main' for openai/gsm8k")
    attn_implementation: str = _opt(
        "",
        "the trained model's attention implementation as transformers names it (eager, "
        "sdpa, flex_attention, flash_attention_2, ...); '': transformers' default",
    )
    # how the model is loaded (a local folder or a Hub id, its weights' dtype) and which of its
    # weights train (all, or a LoRA adapter through PEFT)
    revision: str = _opt("", "the Hub revision of model (a branch, tag or commit hash); '': main (a folder ignores it)")
    trust_remote_code: bool = _opt(
        False, "run a Hub model's own modelling code (transformers' trust_remote_code), for model and teacher_model"
    )
    torch_dtype: str = _opt(
        "float32",
        "dtype of the loaded weights (model, teacher_model) and of the saved model: auto (the model "
        "config's torch_dtype) | bfloat16 | float16 | float32; bf16 adds autocast on top (README: "
        "'Weights in bf16')",
    )
    lora_r: int = _opt(0, "LoRA rank: train a PEFT LoRA adapter instead of every weight (0: full fine-tuning)")
    lora_alpha: float | None = _opt(None, "LoRA alpha (the adapter is scaled by alpha / r); None: 2 x lora_r")
    lora_dropout: float | None = _opt(None, "dropout on the LoRA adapter's input; None: 0.0")
    lora_target_modules: str = _opt(
        "",
        "the modules LoRA adapts, comma-separated names (q_proj,v_proj); '': every linear layer of the "
        "attention and MLP blocks, the output head excepted (PEFT's all-linear)",
    )
    merge_lora: bool = _opt(
        False,
        "with lora_r: also write output_dir/final/merged, the base model with the adapter merged in "
        "(a plain transformers model); final/ itself holds the adapter",
    )

    def _check_loading(self) -> None:
        """The model's loading and LoRA fields."""
        from .models import TORCH_DTYPES

        _check(self, "torch_dtype", f"one of {', '.join(TORCH_DTYPES)}", lambda v: v in TORCH_DTYPES)
        _check(self, "lora_r", ">= 0", lambda v: v >= 0)
        if not self.lora_r:
            given = {
                "lora_alpha": self.lora_alpha is not None,
                "lora_dropout": self.lora_dropout is not None,
                "lora_target_modules": bool(self.lora_target_modules),
                "merge_lora": self.merge_lora,
            }
            if any(given.values()):
                names = ", ".join(f"--{k} {getattr(self, k)!r}" for k, v in given.items() if v)
                raise ValueError(f"{names} need --lora_r > 0 (LoRA is off at lora_r 0: every weight trains)")
        if self.lora_r and importlib.util.find_spec("peft") is None:  # said now, not after the model loads
            raise ValueError(f"--lora_r {self.lora_r} needs the peft package (pip install 'gft[peft]')")
        if self.lora_alpha is not None:
            _check(self, "lora_alpha", "> 0 and finite", lambda v: v > 0 and _finite(v))
        if self.lora_dropout is not None:
            _check(self, "lora_dropout", "in [0, 1)", lambda v: 0.0 <= v < 1.0)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {sorted(METHODS)}, got {self.method!r}")
        from .data import parse_columns

        parse_columns(self.columns)
        for name in ("output_dir", "train_split", "eval_split"):
            _check(self, name, "a non-empty string", bool)
        self._check_loading()


@dataclass
class GroupMix:
    """The groups: the response mix per prompt, their rewards and advantages, online or offline."""

    n_expert: int | None = _opt(None, "expert demonstrations per prompt; None: the method's preset (gft: 1)")
    n_teacher: int | None = _opt(None, "teacher responses per prompt; None: the method's preset (gft: 3)")
    n_self: int | None = _opt(None, "self-generated samples per prompt; None: the method's preset (gft: 4)")
    teacher_model: str = _opt("", "a model that generates the teacher responses a row lacks (else: an error)")
    reward: str = _opt("math", "'math' (math-verify against the row's answer) or 'package.module:function'")
    adv_eps: float = _opt(1e-6, "eps of the group advantage A = (R - mean) / (sample std + eps), as the authors' code")
    groups_file: str = _opt("", "offline groups: written by build-groups, trained on by train")
    refresh_every: int | None = _opt(
        None,
        "online groups: rebuild them from the next prompts with the current weights "
        "every N steps (0: offline, built once); None: 1 (every step, as the authors' "
        "trainer) for a mix with self-samples and no groups_file, else 0",
    )

    def check(self) -> None:
        for name in ("n_expert", "n_teacher", "n_self", "refresh_every"):
            _check(self, name, ">= 0", lambda v: v >= 0)
        if self.n_expert + self.n_teacher + self.n_self == 0:
            raise ValueError("--n_expert, --n_teacher and --n_self are all 0: a group needs a response")
        module, sep, function = self.reward.partition(":")
        if self.reward != "math" and not (
            sep and function.isidentifier() and all(part.isidentifier() for part in module.split("."))
        ):
            raise ValueError(f"--reward must be 'math' or 'package.module:function', got {self.reward!r}")
        _check(self, "adv_eps", "a finite number >= 0", lambda v: _finite(v) and v >= 0)


@dataclass
class Rollout:
    """How self-samples are drawn."""

    engine: str = _opt("auto", "rollout engine: auto (vLLM if installed) | vllm | transformers")
    max_new_tokens: int = _opt(256, "tokens per generated response")
    temperature: float = _opt(1.0, "sampling temperature of the self-samples")
    top_p: float = _opt(1.0, "nucleus sampling of the self-samples")
    rollout_batch_size: int = _opt(64, "transformers engine: sequences per generate call")
    vllm_memory: float = _opt(0.3, "vLLM gpu_memory_utilization (on a CPU: its share of RAM)")

    def check(self) -> None:
        if self.engine not in ("auto", "vllm", "transformers"):
            raise ValueError(f"--engine must be auto, vllm or transformers, got {self.engine!r}")
        _at_least_one(self, "max_new_tokens", "rollout_batch_size")
        _check(self, "temperature", "a finite number > 0", lambda v: _finite(v) and v > 0)
        _check(self, "top_p", "in (0, 1]", lambda v: 0 < v <= 1)
        _check(self, "vllm_memory", "in (0, 1]", lambda v: 0 < v <= 1)


@dataclass
class Optimization:
    """The loss and the optimizer steps."""

    tau: float | None = _opt(
        None, "DCR threshold: C = p below tau, 1 at or above; None: the method's preset (gft 0.7, sft/grpo 0, dft inf)"
    )
    loss_aggregation: str = _opt(
        "token-mean",
        "how the global batch's per-token losses combine: token-mean | "
        "seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm",
    )
    entropy_coef: float = _opt(0.0, "entropy bonus: loss_t -= entropy_coef * H_t")
    loss_backend: str = _opt(
        "auto",
        "the fused loss's engine: auto (triton on a CUDA device it suits, else the chunked torch engine) | "
        "triton | torch | reference (materialized logits)",
    )
    lr: float = _opt(1e-5, "peak learning rate (AdamW)")
    lr_scheduler: str = _opt("cosine", f"the transformers schedule: {' | '.join(LR_SCHEDULERS)}")
    warmup_steps: int = _opt(0, "learning-rate warm-up steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_steps: int | None = _opt(
        None,
        "optimizer steps; None: 100, or the steps of num_epochs when that is > 0. Given with num_epochs, "
        "max_steps wins (as in transformers' Trainer)",
    )
    num_epochs: float = _opt(
        0.0,
        "passes over the prompts (train_file rows, or groups_file groups); when > 0 and max_steps is "
        "not given it sets max_steps = ceil(num_epochs x prompts / prompts_per_step)",
    )
    prompts_per_step: int = _opt(8, "groups (prompts) per optimizer step, over all processes")
    micro_batch_size: int = _opt(8, "sequences per forward/backward on one process")
    max_grad_norm: float = _opt(
        1.0,
        "clip the gradient norm to this; 0: no clipping (as in transformers' Trainer and TRL), the norm still logged",
    )
    bf16: bool = _opt(False, "bf16 mixed precision (accelerate's mixed_precision='bf16')")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (less memory, slower)")
    max_length: int = _opt(1024, "prompt + response tokens per training sequence (the rest is cut off)")
    seed: int = _opt(0, "seed of the data order and the sampling")
    packed: bool = _opt(
        False,
        "packed (padding-free) micro-batches: each micro-batch's sequences in best-fit rows no longer than "
        "its longest sequence (one row with flash-attention), position_ids restarting per sequence "
        "(models that would mix the sequences are refused up front)",
    )

    def check(self) -> None:
        check_tau(self.tau, "--tau")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"--loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {self.loss_aggregation!r}")
        backends = ("auto", *engine_names())
        if self.loss_backend not in backends:
            raise ValueError(f"--loss_backend must be one of {', '.join(backends)}, got {self.loss_backend!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        _check(self, "entropy_coef", "a finite number", _finite)
        _check(self, "lr", "a finite number > 0", lambda v: _finite(v) and v > 0)
        _check(self, "weight_decay", "a finite number >= 0", lambda v: _finite(v) and v >= 0)
        _check(self, "num_epochs", "a finite number >= 0", lambda v: _finite(v) and v >= 0)
        _check(self, "max_grad_norm", "a finite number >= 0 (0: no clipping)", lambda v: _finite(v) and v >= 0)
        _check(self, "warmup_steps", ">= 0", lambda v: v >= 0)
        _check(self, "max_steps", ">= 1 (or None)", lambda v: v is None or v >= 1)
        _at_least_one(self, "prompts_per_step", "micro_batch_size", "max_length")
        _check(self, "seed", "in [0, 2**32)", lambda v: 0 <= v < 2**32)  # numpy's seed range (set_seed seeds it)


@dataclass
class Logging:
    """Checkpoints and the output directory's run."""

    save_every: int = _opt(0, "steps between checkpoints (0: only the final model)")
    save_total_limit: int = _opt(0, "checkpoints kept in output_dir/checkpoints, the newest (0: all)")
    resume: str = _opt(
        "",
        "continue the run in output_dir: --resume alone (or 'latest', 'true') from its newest complete "
        "checkpoint, --resume step-8 or --resume PATH from that checkpoint; the configuration must be the "
        "run's but for the RESUMABLE fields (gft_train/config.py: length, checkpoints, evaluation, "
        "micro_batch_size, report_to, ...), and a data file must hold what it held; without --resume or "
        "--overwrite-output-dir an output_dir holding a run is refused",
    )
    overwrite_output_dir: bool = _opt(
        False,
        "start afresh in an output_dir that holds a run: its checkpoints, final "
        "model, metrics and logs are deleted first",
    )
    report_to: str = _opt(
        "tensorboard",
        "experiment trackers through accelerate, comma-separated: tensorboard, wandb, "
        "mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio (each must be installed); all; none",
    )

    def check(self) -> None:
        _check(self, "save_every", ">= 0", lambda v: v >= 0)
        _check(self, "save_total_limit", ">= 0", lambda v: v >= 0)
        if self.resume and self.overwrite_output_dir:
            raise ValueError("--resume and --overwrite_output_dir contradict each other: pick one")


@dataclass
class Evaluation:
    """Held-out evaluation, during training (eval_every) and by gft-train eval."""

    eval_every: int = _opt(
        0,
        "train: evaluate on eval_file every N steps and at the last one, logged with the step's "
        "metrics as eval/pass@1, eval/pass@k, ... (0: never)",
    )
    eval_n: int = _opt(4, "samples per held-out prompt (mean pass@1 and pass@k)")
    eval_k: list[int] | None = _opt(
        None, "the k of pass@k, as '1 4' or '1,4', each <= eval_n; None: 1 and 4, those <= eval_n"
    )
    eval_max_prompts: int = _opt(0, "held-out prompts to evaluate (0: all)")
    eval_temperature: float = _opt(0.5, "sampling temperature at evaluation (the paper's 0.5)")
    eval_greedy: bool = _opt(True, "also report greedy pass@1 (one greedy completion per prompt)")
    eval_kl_samples: int = _opt(1, "samples of the base model per prompt for KL(base || model) (with a base model)")
    eval_split: str = _opt("test", "the split of eval_file, likewise")

    def check(self) -> None:
        _check(self, "eval_every", ">= 0", lambda v: v >= 0)
        _check(self, "eval_max_prompts", ">= 0", lambda v: v >= 0)
        _at_least_one(self, "eval_n", "eval_kl_samples")
        _check(self, "eval_k", "k >= 1 each", lambda ks: all(k >= 1 for k in ks))
        # pass@k needs k of the n samples: a k above eval_n cannot be reported. Checked where an
        # evaluation is set up (an eval_file), so a saved run's unused evaluation settings still load.
        _check(
            self,
            "eval_k",
            f"k <= --eval_n ({self.eval_n}) each: pass@k needs k of the n samples per prompt",
            lambda ks: not self.eval_file or all(k <= self.eval_n for k in ks),
        )
        _check(self, "eval_temperature", "a finite number > 0", lambda v: _finite(v) and v > 0)


# The fields in the order of the flags and of the saved gft_config.yaml: a dataclass collects
# the fields of its bases from the last base to the first.
@dataclass
class Config(Evaluation, Logging, Optimization, Rollout, GroupMix, ModelAndData):
    """Every field of a run (the groups above, flat)."""

    def __post_init__(self):
        self.resume = resume_target(self.resume)

    def resolved(self) -> Config:
        """A copy with the method's preset filled in and everything checked."""
        _check_types(self)
        cfg = self._with_preset()
        if cfg.refresh_every is None:
            cfg.refresh_every = 1 if cfg.n_self and not cfg.groups_file else 0
        if cfg.max_steps is None and not cfg.num_epochs:
            cfg.max_steps = 100  # (with num_epochs, the trainer sets it once the data is known)
        if cfg.eval_k is None:  # the default ks that eval_n samples can report (pass@k needs k of them)
            cfg.eval_k = [k for k in (1, 4) if k <= cfg.eval_n]
        for group in (ModelAndData, GroupMix, Optimization, Rollout, Logging, Evaluation):
            group.check(cfg)
        if cfg.eval_every and not cfg.eval_file:
            raise ValueError("eval_every needs eval_file (the held-out rows to evaluate on)")
        return cfg

    def _with_preset(self) -> Config:
        """A copy with the fields left at None filled by the method's preset (and --no-dcr, --no-gal)."""
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {sorted(METHODS)}, got {self.method!r}")
        n_expert, n_teacher, n_self, tau, _ = METHODS[self.method]
        if not self.gal:
            # the paper's ablation without GAL: no group to standardize rewards in, so the
            # demonstrations alone, A = 1, with DCR (removing DCR too gives SFT)
            n_teacher, n_self = 0, 0
            n_expert = n_expert or 1
            if self.n_self:
                raise ValueError(
                    f"--no-gal trains on demonstrations only (A = 1 needs no reward): n_self must be 0, "
                    f"got {self.n_self}; self-samples need group advantages"
                )
        return dataclasses.replace(
            self,
            n_expert=n_expert if self.n_expert is None else self.n_expert,
            n_teacher=n_teacher if self.n_teacher is None else self.n_teacher,
            n_self=n_self if self.n_self is None else self.n_self,
            tau=(tau if self.tau is None else self.tau) if self.dcr else 0.0,
        )

    # each group's values, by name
    @property
    def model_and_data(self) -> ModelAndData:
        return _view(ModelAndData, self)

    @property
    def groups(self) -> GroupMix:
        return _view(GroupMix, self)

    @property
    def rollout(self) -> Rollout:
        return _view(Rollout, self)

    @property
    def optimization(self) -> Optimization:
        return _view(Optimization, self)

    @property
    def logging(self) -> Logging:
        return _view(Logging, self)

    @property
    def evaluation(self) -> Evaluation:
        return _view(Evaluation, self)

    @property
    def group_size(self) -> int:
        return (self.n_expert or 0) + (self.n_teacher or 0) + (self.n_self or 0)

    @property
    def uses_group_advantage(self) -> bool:
        return METHODS[self.method][4] and self.gal


# Fields a --resume may change: they alter how long the run goes, how a step is split into
# forward passes and what it writes, not the training up to the checkpoint or the math of the
# steps after it (the saved gft_config.yaml then records the values used). Every other field must
# equal the run's; paths are compared resolved (PATH_FIELDS), and a data file by its contents
# (checkpoints.run_inputs). The README's trainer section lists them.
RESUMABLE = frozenset(
    {
        "micro_batch_size",
        "gradient_checkpointing",
        "max_steps",
        "num_epochs",
        "save_every",
        "save_total_limit",
        "resume",
        "overwrite_output_dir",
        "output_dir",
        "engine",
        "loss_backend",
        "rollout_batch_size",
        "vllm_memory",
        "eval_file",
        "eval_every",
        "eval_n",
        "eval_k",
        "eval_max_prompts",
        "eval_temperature",
        "eval_greedy",
        "eval_kl_samples",
        "report_to",
        "eval_split",
        "merge_lora",
    }
)


# Fields naming a file, a directory or a Hub name: ``tiny``, ``./tiny`` and its absolute path are
# one model.
PATH_FIELDS = ("model", "train_file", "eval_file", "groups_file", "teacher_model")


def local_path(value: str) -> str:
    """``value`` as an absolute path when it names something on disk (else as given: a Hub name)."""
    path = Path(value).expanduser() if value else None
    return str(path.resolve()) if path is not None and path.exists() else value


def changed_fields(saved: dict, cfg: Config, saved_paths: dict | None = None) -> dict:
    """field -> (saved value, new value) for each training field a resume would change.
    ``saved_paths``: the run's PATH_FIELDS as resolved when it was saved (a checkpoint holds them;
    without them a saved relative path is resolved against the current directory)."""
    now = dataclasses.asdict(cfg)
    changed = {}
    for k in now:
        if k in RESUMABLE or k not in saved:
            continue
        old, new = saved[k], now[k]
        if k in PATH_FIELDS:
            old = (saved_paths or {}).get(k) or local_path(old)
            new = local_path(new)
        if old != new:
            changed[k] = (old, new)
    return changed


_RESUME_WORDS = {"true": "latest", "yes": "latest", "1": "latest", "latest": "latest"}
_RESUME_OFF = ("", "false", "no", "0")


def resume_target(value) -> str:
    """``resume`` as one string: '' (no resume), 'latest' (the newest complete checkpoint), or a
    chosen checkpoint (``step-8`` or a path). ``True``/``False`` and the old flag words still mean
    what they meant."""
    if value is None or value is False:
        return ""
    if value is True:
        return "latest"
    if not isinstance(value, str):
        raise TypeError(f"resume must be true, false, 'latest', a checkpoint name (step-8) or a path, got {value!r}")
    text = value.strip()
    if text.lower() in _RESUME_OFF:
        return ""
    return _RESUME_WORDS.get(text.lower(), text)


def load_saved(path: Path) -> dict:
    """A gft_config.yaml as written by ``save``, its values converted to the fields' types."""
    raw = _read_yaml(path) or {}
    hints = typing.get_type_hints(Config)
    return {k: _convert(path, k, v, hints[k]) for k, v in raw.items() if k in hints}


def _check_types(cfg: Config) -> None:
    """Each field holds its type (``int | None``: an int or None; a float field takes an int)."""
    for name, hint in typing.get_type_hints(Config).items():
        value = getattr(cfg, name)
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            if value is None:
                continue
            hint = next(a for a in args if a is not type(None))
        if typing.get_origin(hint) is list:
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            what = "a list of integers"
        elif hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            what = "a number"
        else:
            ok = isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
            what = {bool: "true or false", int: "an integer", str: "a string"}[hint]
        if not ok:
            raise TypeError(f"--{name} must be {what}, got {value!r}")


def _read_yaml(path: Path):
    """A YAML file's contents; a syntax error says the file and where in it, in one line."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{where}: {what}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _bool(text: str):
    # the words transformers' HfArgumentParser accepts for a boolean flag
    low = text.strip().lower()
    return True if low in ("yes", "true", "t", "y", "1") else False if low in ("no", "false", "f", "n", "0") else None


def _convert(path, name: str, value, hint):
    """A YAML value as its field's type, checked as the flag's would be (PyYAML reads ``1e-3`` as a
    string and ``.5`` as a float; nothing downstream converts)."""

    def bad(expected):
        return ValueError(f"{path}: field {name!r}: expected {expected}, got {value!r}")

    if name == "resume":
        try:
            return resume_target(value)
        except TypeError:
            raise bad("true, false or a checkpoint") from None
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        try:
            items = _int_list(value) if isinstance(value, str) else [value] if isinstance(value, int) else value
        except ValueError:
            items = None
        if not isinstance(items, list):
            raise bad("a list of integers")
        return [_convert(path, name, v, typing.get_args(hint)[0]) for v in items]
    if hint is bool:
        flag = value if isinstance(value, bool) else _bool(value) if isinstance(value, str) else None
        if flag is None:
            raise bad("true or false")
        return flag
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = hint(value.strip())
            except ValueError:
                raise bad("an integer" if hint is int else "a number") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (hint is int and isinstance(value, float) and not value.is_integer())
        ):
            raise bad("an integer" if hint is int else "a number")
        return hint(value)
    if name == "columns" and isinstance(value, dict):  # the mapping form, kept as the flag's text
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise bad("a mapping of field names to column names")
        return ",".join(f"{k}={v}" for k, v in value.items())
    if hint is str:
        if isinstance(value, (bool, list, dict)) or value is None:
            raise bad("a string")
        return str(value)
    return value


def _shown(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "''" if value == "" else str(value)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split() if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, built by transformers' ``HfArgumentParser`` from the field's type and
    help (``--max-steps`` and ``--max_steps``; booleans as ``--x [true|false]``, ``--no-x`` for
    those on by default). Each help ends with the field's default. The parsed value is absent
    unless the flag is given, so only what was given overrides the YAML."""
    from transformers import HfArgumentParser

    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="YAML file of config fields; flags given override it (default: none)",
    )
    hints = typing.get_type_hints(Config)
    defaults = dataclasses.asdict(Config())
    for f in dataclasses.fields(Config):
        f = copy.copy(f)  # HfArgumentParser narrows field.type in place; Config's stay intact
        f.type = hints[f.name]
        before = len(parser._actions)
        HfArgumentParser._parse_dataclass_field(parser, f)
        for action in parser._actions[before:]:
            negated = action.option_strings[0].startswith("--no_")
            action.help = (
                f"the same as --{f.name.replace('_', '-')} false"
                if negated
                else f"{f.metadata['help']} (default: {_shown(defaults[f.name])})"
            )
            action.default = argparse.SUPPRESS
            if f.name == "eval_k":  # '1 4' (transformers' list form) or '1,4'
                action.type = _int_list
            if f.name == "resume":  # --resume alone: the newest checkpoint; --resume step-8: that one
                action.nargs, action.const, action.metavar = "?", "latest", "STEP"


def from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    values = dataclasses.asdict(base or Config())
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(loaded).__name__}")
        unknown = set(loaded) - set(values)
        if unknown:
            raise ValueError(f"{path}: unknown config fields {sorted(unknown)}")
        hints = typing.get_type_hints(Config)
        values.update({k: _convert(path, k, v, hints[k]) for k, v in loaded.items()})
    for f in dataclasses.fields(Config):
        if hasattr(args, f.name):
            given = getattr(args, f.name)
            if f.name == "eval_k":
                given = [k for part in given for k in part]
            values[f.name] = given
    return Config(**values)


def save(cfg: Config, path: Path) -> None:
    values = dataclasses.asdict(cfg)
    # resume as the flag it was before it took a checkpoint: false / true, else the checkpoint chosen
    values["resume"] = {"": False, "latest": True}.get(cfg.resume, cfg.resume)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
