"""The accelerate training loop: groups -> batches -> fused GFT loss -> optimizer steps.

One optimizer step takes ``prompts_per_step`` groups (all their responses), split across the
processes, in micro-batches of ``micro_batch_size`` sequences. The loss of every micro-batch is
normalized by the *global* number of valid tokens of the step (all micro-batches, all
processes), so 1 process and N processes on the same global batch give the same update.

Groups are online (``refresh_every`` N: rebuilt from the next prompts with the current weights
every N steps; N = 1, every step as the authors' trainer, is the default for a mix with
self-samples) or offline (``refresh_every`` 0: built once, or read from ``groups_file``).
Self-samples are trained on the token ids the rollout engine sampled (``Response.train_input``).
Checkpoints
(``save_every``) hold accelerate's state (model, optimizer, scheduler, RNG), the step and the
current groups, written under a temporary name and renamed when complete; ``--resume`` continues
from the newest complete one and reaches the same weights as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from gft_kernels.options import IGNORE_INDEX

from . import config as config_mod
from . import trackers
from .data import DataError, load_rows
from .groups import build_groups, check_token_ids, group_metrics, load_groups, missing_teachers, save_groups
from .lm import causal_lm_gft_loss, encode, prompts_ids
from .packing import check_packing, pack, packed_gft_loss
from .rewards import load_reward
from .rollout import make_engine


class GFTPolicy(nn.Module):
    """The causal LM plus the fused loss, as one module, so DDP/FSDP wrap the whole computation
    (a loss computed from the backbone outside the wrapper's forward would skip gradient sync)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, adv, tau, normalizer, reduction="mean", entropy_coef=0.0,
                position_ids=None, seq_ids=None):
        if position_ids is not None:   # a packed row (packing.PackedBatch): labels already shifted per sequence
            loss, stats = packed_gft_loss(self.model, input_ids, labels, adv, tau, position_ids=position_ids,
                                          seq_ids=seq_ids, normalizer=normalizer, reduction=reduction,
                                          loss_options=dict(entropy_coef=entropy_coef))
            valid = (labels != IGNORE_INDEX).float()
        else:
            loss, stats = causal_lm_gft_loss(self.model, input_ids, attention_mask, labels, adv, tau,
                                             normalizer=normalizer, reduction=reduction, return_stats=True,
                                             loss_options=dict(entropy_coef=entropy_coef))
            valid = (labels[:, 1:] != IGNORE_INDEX).float()
        sums = torch.stack([
            stats.rectified_frac * stats.n_valid, stats.mean_prob * stats.n_valid,
            (stats.entropy * valid).sum(), stats.n_valid.float(), stats.accuracy * stats.n_valid,
        ]).detach()
        return loss, sums


def aggregation(name: str, n_tokens: float, n_seqs: float, max_length: int) -> tuple[str, float]:
    """(gft_loss reduction, normalizer) of a trainer loss aggregation, given the global batch's
    valid tokens and sequences per process (DDP averages gradients over processes)."""
    if name == "token-mean":
        return "mean", max(n_tokens, 1e-9)
    if name == "seq-mean-token-sum-norm":
        return "mean", max(n_seqs, 1e-9) * max_length
    return name, max(n_seqs, 1e-9)


def _order(n: int, position: int, seed: int) -> int:
    """Index of the item at ``position`` of an endless stream of per-epoch shuffles of n items
    (stateless: the data position after a resume is just the step)."""
    epoch, offset = divmod(position, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=g)[offset])


def load_model(path: str, attn_implementation: str = ""):
    """(model, tokenizer) saved at ``path``, float32; ``attn_implementation`` as transformers names
    them ("" for its default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not path or not p.is_dir() or not (p / "config.json").is_file():
        raise FileNotFoundError(f"model path {path!r} is not a saved transformers model (no config.json there)")
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, **extra)
    tokenizer = AutoTokenizer.from_pretrained(p)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _unpartitioned(build):
    """``build()`` with transformers' DeepSpeed ZeRO-3 hook off: a model loaded while accelerate's
    ZeRO-3 config is active is created partitioned (empty on this rank)."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        return build()
    active = hf_deepspeed._hf_deepspeed_config_weak_ref   # no public getter of the config object
    active = active() if active is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        return build()
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)


# What a run writes in output_dir: a directory holding any of them holds a run.
RUN_FILES = ("checkpoints", "final", "final.tmp", "metrics.jsonl", "tensorboard", "training.png", "groups.jsonl",
             "gft_config.yaml")


def _previous_run(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def claim_output_dir(cfg: config_mod.Config, is_main: bool = True) -> Path | None:
    """Checks ``output_dir`` against what the run asks, before anything is trained or written:
    a run there is continued only by ``--resume`` with the same training configuration, replaced
    only with ``--overwrite-output-dir``, else refused. Returns the checkpoint to resume from."""
    out = Path(cfg.output_dir)
    found = _previous_run(out)
    if cfg.resume and cfg.overwrite_output_dir:
        raise ValueError("--resume and --overwrite-output-dir contradict each other: pick one")
    if cfg.overwrite_output_dir:
        if is_main:
            for name in found:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    latest = _latest_checkpoint(out)
    if not cfg.resume:
        if found:
            raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                                  "--overwrite-output-dir to replace it, or another output_dir")
        return None
    if latest is None:
        if found:
            raise FileExistsError(f"--resume: {out} holds a run ({', '.join(found)}) but no complete checkpoint to "
                                  "resume from: pass --overwrite-output-dir to replace it, or another output_dir")
        return None
    saved_path = latest / "gft_config.yaml"
    saved_path = saved_path if saved_path.is_file() else out / "gft_config.yaml"
    if saved_path.is_file():
        changed = config_mod.changed_fields(config_mod.load_saved(saved_path), cfg)
        if changed:
            said = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"--resume: the configuration differs from the run's ({saved_path}) in {said}; "
                             f"a resume may change only {', '.join(sorted(config_mod.RESUMABLE))}")
    return latest


def _latest_checkpoint(out: Path) -> Path | None:
    done = [d for d in (out / "checkpoints").glob("step-*") if (d / "trainer_state.json").is_file()]
    return max(done, key=lambda d: int(d.name.split("-")[1])) if done else None


def _launch_asks(name: str) -> bool:
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
    elif _launch_asks("DEEPSPEED"):
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
        if _launch_asks("FSDP") and acc.num_processes > 1:
            acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
            for state in (acc.state, PartialState()):   # a new AcceleratorState copies PartialState's
                state.distributed_type = DistributedType.FSDP
                state.device = torch.device("cpu")
    for name, kind in (("FSDP", DistributedType.FSDP), ("DEEPSPEED", DistributedType.DEEPSPEED)):
        if _launch_asks(name) and acc.num_processes > 1 and acc.distributed_type != kind:
            raise RuntimeError(f"the launch asked for {name} but accelerate set up {acc.distributed_type}")
    return acc


class Trainer:
    def __init__(self, cfg: config_mod.Config):
        from accelerate.utils import DistributedType, set_seed

        self.cfg = cfg = cfg.resolved()
        self.acc = make_accelerator("bf16" if cfg.bf16 else "no",
                                    **trackers.accelerator_kwargs(cfg.report_to, cfg.output_dir))
        self.resume_from = claim_output_dir(cfg, self.acc.is_main_process)
        self.acc.wait_for_everyone()
        set_seed(cfg.seed)
        self.out = Path(cfg.output_dir)
        model, self.tokenizer = load_model(cfg.model, cfg.attn_implementation)
        if not cfg.train_file and not cfg.groups_file:
            raise ValueError("train needs train_file (prompts) or groups_file (offline groups)")
        self.rows = load_rows(cfg.train_file, cfg.columns, cfg.train_split, cfg.dataset_config) if cfg.train_file else None
        if cfg.refresh_every and self.rows is None:
            raise ValueError("online groups (refresh_every > 0) need train_file")
        # held-out rows checked now, not at the first evaluation
        self.eval_rows = (load_rows(cfg.eval_file, cfg.columns, cfg.eval_split, cfg.dataset_config)
                          [: cfg.eval_max_prompts or None] if cfg.eval_every else None)
        self.pool = None          # the current groups
        if cfg.groups_file and not cfg.refresh_every:
            self.pool = load_groups(cfg.groups_file)
        if cfg.num_epochs:   # known once the data is read: the schedule below needs it
            n = len(self.rows) if self.rows is not None else len(self.pool)
            self.cfg = cfg = dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.num_epochs * n / cfg.prompts_per_step)))
        self._preflight(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        from transformers import get_scheduler

        # sharded weights cannot generate on one process: it samples from a whole copy,
        # refreshed from the gathered weights before each rollout
        self.sampler = None
        if self.sharded and self.acc.is_main_process and (cfg.n_self or cfg.eval_every):
            self.sampler = _unpartitioned(lambda: load_model(cfg.model)[0])

        def adamw(params):
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        if self.acc.distributed_type == DistributedType.FSDP and not self.acc.is_fsdp2:
            # FSDP1 replaces the parameters (flat ones without use_orig_params): the optimizer
            # must hold the wrapped model's, or it steps weights the model no longer uses
            self.policy = self.acc.prepare(GFTPolicy(model))
            optimizer = adamw(self.policy.parameters())
            self.optimizer = self.acc.prepare(optimizer)
        else:   # FSDP2 and DeepSpeed take both at once (they rebuild the optimizer's groups)
            optimizer = adamw(model.parameters())
            self.policy, self.optimizer = self.acc.prepare(GFTPolicy(model), optimizer)
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=cfg.max_steps)
        # The scheduler is not prepared: accelerate would step it once per process per optimizer
        # step (it assumes a sharded dataloader); one step of ours is one global batch.
        self.scheduler = scheduler
        self.acc.register_for_checkpointing(self.scheduler)
        self.reward_fn = load_reward(cfg.reward)
        self.engine = None
        self.step = 0
        self._warned_cut = False   # a response cut at max_length is said once per run (and counted per step)
        self.pool_start = 0       # the step at which the current online pool begins

    def _preflight(self, model) -> None:
        """Everything about the data that would stop or empty the run, checked on every row before
        the first step (an online run met a bad row only when it reached it)."""
        cfg = self.cfg
        if cfg.packed:   # before anything trains: a model that would mix packed sequences is refused
            from accelerate.utils import DistributedType

            zero3 = self.acc.distributed_type == DistributedType.DEEPSPEED and self.sharded
            # (ZeRO-3 may have loaded it partitioned, empty on this rank: the probe runs on a whole copy)
            check_packing(_unpartitioned(lambda: load_model(cfg.model, cfg.attn_implementation)[0]) if zero3 else model)
        source = cfg.train_file if self.rows is not None else cfg.groups_file
        n = len(self.rows) if self.rows is not None else len(self.pool)
        if cfg.prompts_per_step > n:   # said, not refused: a small data set may be meant to repeat (the quick demo)
            warnings.warn(f"prompts_per_step {cfg.prompts_per_step} is more than the {n} prompts of {source}: "
                          f"every step repeats prompts; set it to at most {n} for distinct prompts", stacklevel=2)
        if self.rows is not None and cfg.n_teacher:
            missing_teachers(self.rows, cfg.n_teacher, bool(cfg.teacher_model))
        chat = next((r for r in self.rows or () if isinstance(r.prompt, list)), None)
        if chat is not None and not getattr(self.tokenizer, "chat_template", None):
            file, _, row = chat.source.rpartition(":")
            raise DataError(file, row, "prompt", f"chat messages need a tokenizer with a chat template; the model's "
                            f"({self.tokenizer.name_or_path!r}) has none")
        if self.pool is not None:
            check_token_ids(self.pool, cfg.groups_file, model.get_input_embeddings().num_embeddings,
                            self.tokenizer.name_or_path)
        prompts = [r.prompt for r in self.rows] if self.rows is not None else [g.prompt for g in self.pool]
        # a response token trains only if it fits after the prompt (the sequence is cut at max_length)
        too_long = sum(len(ids) >= cfg.max_length for ids in prompts_ids(self.tokenizer, prompts))
        if too_long == len(prompts):
            raise ValueError(f"every prompt of {source} is max_length ({cfg.max_length}) tokens or longer: "
                             "no response token fits, nothing would train; raise max_length")
        if too_long:
            warnings.warn(f"{too_long} of {len(prompts)} prompts of {source} are max_length ({cfg.max_length}) "
                          "tokens or longer: their responses train on nothing", stacklevel=2)
        # Eq. 4 gives a lone response A = 0: with group advantages a group of one trains nothing
        if cfg.uses_group_advantage:
            sizes = [cfg.group_size] * n if self.pool is None else [len(g.responses) for g in self.pool]
            alone = sum(size == 1 for size in sizes)
            fix = ("add teacher responses or self-samples (n_teacher, n_self), or train with advantage 1 "
                   "(method sft, or --no-gal)")
            if alone == n:
                raise ValueError(f"every group of {source} has one response (expert {cfg.n_expert}, teacher "
                                 f"{cfg.n_teacher}, self {cfg.n_self}): its advantage is 0, nothing would train; {fix}")
            if alone:
                warnings.warn(f"{alone} of {n} groups of {source} have one response: advantage 0, they train on "
                              f"nothing; {fix}", stacklevel=2)

    # ---- groups -------------------------------------------------------------------------
    @property
    def model(self):
        return self.acc.unwrap_model(self.policy).model

    @property
    def sharded(self) -> bool:
        """Whether the weights are split across processes (FSDP, DeepSpeed ZeRO-3)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.FSDP:
            return True
        if self.acc.distributed_type == DistributedType.DEEPSPEED:
            return self.acc.state.deepspeed_plugin.zero_stage == 3
        return False

    def full_state_dict(self) -> dict:
        """The model's whole state dict on the main process (every process must call it)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.DEEPSPEED and self.sharded:
            import deepspeed

            model = self.model
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not self.sharded:
            return self.model.state_dict()
        if not self.acc.is_fsdp2:
            # FSDP1 (accelerate's get_state_dict, offloading to the CPU, crashes on a CPU run)
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(self.policy, writeback=False):
                state = self.acc.unwrap_model(self.policy).state_dict()
                state = {k.replace("_fsdp_wrapped_module.", ""): v.detach().clone() for k, v in state.items()}
        else:
            state = self.acc.get_state_dict(self.policy)
        return {k.removeprefix("model."): v for k, v in state.items()}

    def _engine(self, state=None):
        model = self.model
        if self.sampler is not None:
            self.sampler.load_state_dict(state)
            model = self.sampler
        if self.engine is None:
            self.engine = make_engine(self.cfg.engine, model=model, tokenizer=self.tokenizer,
                                      model_path=self.cfg.model, cfg=self.cfg)
        self.engine.load_weights(model)
        return self.engine

    def _teacher_engine(self):
        if not self.cfg.teacher_model:
            return None
        model, tokenizer = load_model(self.cfg.teacher_model)
        return make_engine(self.cfg.engine, model=model, tokenizer=tokenizer, model_path=self.cfg.teacher_model, cfg=self.cfg)

    def _build(self, rows, seed):
        """Groups built on the main process and shared with the others."""
        from accelerate.utils import broadcast_object_list

        box = [None]
        state = self.full_state_dict() if self.cfg.n_self and self.sharded else None
        if self.acc.is_main_process:
            engine = self._engine(state) if self.cfg.n_self else None
            box[0] = build_groups(rows, self.cfg, engine, self.reward_fn, self._teacher_engine(), seed=seed)
        broadcast_object_list(box)
        return box[0]

    def _groups_for_step(self, step: int):
        cfg = self.cfg
        if not cfg.refresh_every:
            if self.pool is None:
                if cfg.groups_file:   # (read at start; here after a resume without a pool)
                    self.pool = load_groups(cfg.groups_file)
                else:
                    self.pool = self._build(self.rows, cfg.seed)
                    if self.acc.is_main_process:
                        self.out.mkdir(parents=True, exist_ok=True)
                        save_groups(self.pool, self.out / "groups.jsonl")
            n = len(self.pool)
            return [self.pool[_order(n, step * cfg.prompts_per_step + j, cfg.seed)] for j in range(cfg.prompts_per_step)]
        if self.pool is None or step - self.pool_start >= cfg.refresh_every:
            self.pool_start = step - step % cfg.refresh_every
            first = self.pool_start * cfg.prompts_per_step
            count = cfg.refresh_every * cfg.prompts_per_step
            rows = [self.rows[_order(len(self.rows), first + j, cfg.seed)] for j in range(count)]
            self.pool = self._build(rows, cfg.seed + self.pool_start)
        offset = (step - self.pool_start) * cfg.prompts_per_step
        return self.pool[offset:offset + cfg.prompts_per_step]

    def evaluate(self) -> dict:
        """pass@1, pass@k, distinct correct (and greedy pass@1) of the current weights on the
        held-out rows, as ``gft-train eval`` computes them, under a forked RNG: evaluating does
        not change the training that follows (a resumed run reaches the same weights)."""
        from accelerate.utils import broadcast_object_list

        from .evaluate import accuracy

        cfg = self.cfg
        state = self.full_state_dict() if self.sharded else None
        box = [None]
        if self.acc.is_main_process:
            engine = self._engine(state)
            devices = [self.acc.device] if self.acc.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                res = accuracy(engine, self.eval_rows, self.reward_fn, cfg.eval_n, cfg.eval_k, seed=cfg.seed,
                               temperature=cfg.eval_temperature)
                if cfg.eval_greedy:
                    res["greedy_pass@1"] = accuracy(engine, self.eval_rows, self.reward_fn, 1, seed=cfg.seed,
                                                    temperature=0.0)["pass@1"]
            box[0] = {f"eval/{k}": v for k, v in res.items() if k != "per_prompt"}
        broadcast_object_list(box)
        return box[0]

    # ---- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self):
        final = self.out / "checkpoints" / f"step-{self.step}"
        tmp = final.with_name(final.name + ".tmp")
        if self.acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        # every rank's files (its RNG state is written last) are in tmp before the main one renames it
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            save_groups(self.pool, tmp / "groups.jsonl")
            config_mod.save(self.cfg, tmp / "gft_config.yaml")   # what a --resume is compared with
            (tmp / "trainer_state.json").write_text(json.dumps({"step": self.step, "pool_start": self.pool_start}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            if self.cfg.save_total_limit:   # the newest complete ones stay (the one just written among them)
                done = sorted((d for d in final.parent.glob("step-*") if (d / "trainer_state.json").is_file()),
                              key=lambda d: int(d.name.split("-")[1]))
                for old in done[:-self.cfg.save_total_limit]:
                    shutil.rmtree(old)
        self.acc.wait_for_everyone()

    def maybe_resume(self):
        if not self.cfg.resume:
            return
        latest = self.resume_from
        if latest is None:
            self.acc.print(f"--resume: no complete checkpoint in {self.out / 'checkpoints'}; starting at step 0")
            return
        state = json.loads((latest / "trainer_state.json").read_text())
        if state["step"] > self.cfg.max_steps:
            raise ValueError(f"--resume: max_steps {self.cfg.max_steps} is below the checkpoint's step {state['step']} "
                             f"({latest})")
        self.acc.load_state(str(latest))
        self.step, self.pool_start = state["step"], state["pool_start"]
        self.pool = load_groups(latest / "groups.jsonl")
        self.acc.print(f"resumed from {latest} (step {self.step})")

    def save_final(self):
        """The trained model and tokenizer in ``output_dir/final``, renamed into place when complete."""
        self.acc.wait_for_everyone()
        state = self.full_state_dict()
        if self.acc.is_main_process:
            final = self.out / "final"
            tmp = self.out / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp, state_dict=state)
            self.tokenizer.save_pretrained(tmp)
            config_mod.save(self.cfg, tmp / "gft_config.yaml")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        self.acc.wait_for_everyone()

    # ---- the loop -----------------------------------------------------------------------
    def _max_over_processes(self, n: int) -> int:
        if self.acc.num_processes == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.acc.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def train_step(self, groups) -> dict:
        from accelerate.utils import DistributedType

        cfg, acc = self.cfg, self.acc
        # self-samples as the token ids the engine sampled; expert and teacher texts tokenized
        seqs = [(g.prompt, r.train_input, r.advantage) for g in groups for r in g.responses]
        mine = seqs[acc.process_index::acc.num_processes]
        batches = [encode(self.tokenizer, mine[i:i + cfg.micro_batch_size], cfg.max_length)
                   for i in range(0, len(mine), cfg.micro_batch_size)]
        if cfg.packed:   # each micro-batch as one row of its sequences (no padding)
            batches = [pack(b) for b in batches]
        counts = torch.tensor([float(sum(b.n_valid for b in batches)), float(sum(b.n_seqs for b in batches)),
                               float(sum(b.n_cut for b in batches)), float(len(mine))], device=acc.device)
        counts = acc.reduce(counts, reduction="sum")
        n_global = counts[0]
        n_cut = int(counts[2].item())
        if n_cut and not self._warned_cut:
            # said once: the reward scored each whole response, the loss trains only what fits
            self._warned_cut = True
            warnings.warn(f"{n_cut} of {int(counts[3].item())} responses of step {self.step + 1} are cut at max_length "
                          f"({cfg.max_length}): their reward scored the whole text, the loss trains only its first "
                          "tokens; raise --max-length to train them whole (completions/cut_frac counts them per step)")
        # Every process runs as many micro-batches as the busiest one: FSDP and ZeRO-3 gather
        # weights in every forward, a collective all processes must join, and DDP syncs once.
        # The extra ones are a sequence with every label masked: no loss, zero gradients.
        n_micro = self._max_over_processes(len(batches))
        while len(batches) < n_micro:
            extra = encode(self.tokenizer, seqs[:1], cfg.max_length)
            batches.append((pack(extra) if cfg.packed else extra).masked())
        # DDP averages gradients over processes: normalize by the global counts / processes
        reduction, normalizer = aggregation(cfg.loss_aggregation, counts[0].item() / acc.num_processes,
                                            counts[1].item() / acc.num_processes, cfg.max_length)
        loss_sum = torch.zeros((), device=acc.device)
        sums = torch.zeros(5, device=acc.device)
        for i, batch in enumerate(batches):
            batch = batch.to(acc.device)
            sync = i == len(batches) - 1
            ctx = acc.no_sync(self.policy) if not sync else contextlib.nullcontext()
            with ctx, acc.autocast():
                loss, s = self.policy(batch.input_ids, batch.attention_mask, batch.labels, batch.adv,
                                      cfg.tau, normalizer, reduction, cfg.entropy_coef,
                                      **getattr(batch, "forward_kwargs", {}))
            if acc.distributed_type == DistributedType.DEEPSPEED:   # the engine steps at the last one
                acc.deepspeed_engine_wrapped.backward(loss, sync_gradients=sync)
            else:
                acc.backward(loss)
            loss_sum += loss.detach()
            sums += s
        # (DeepSpeed clips inside its step, by its config's gradient_clipping, and reports the norm)
        grad_norm = acc.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_all = acc.reduce(loss_sum, reduction="mean")
        sums = acc.reduce(sums, reduction="sum")
        count = sums[3].clamp_min(1)
        return {
            "loss": loss_all.item(), "dcr/rectified_frac": (sums[0] / count).item(),
            "dcr/mean_target_prob": (sums[1] / count).item(), "entropy": (sums[2] / count).item(),
            "mean_token_accuracy": (sums[4] / count).item(),
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
            "tokens": int(n_global.item()), "completions/cut_frac": n_cut / max(counts[3].item(), 1.0),
        }

    def train(self) -> Path:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        self.maybe_resume()
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        if acc.is_main_process:
            config_mod.save(cfg, self.out / "gft_config.yaml")
            if self.step == 0 and metrics_path.exists():
                metrics_path.unlink()
            elif metrics_path.exists():   # resumed: drop the rows of steps after the checkpoint
                rows = [r for r in metrics_path.read_text().splitlines()
                        if r.strip() and json.loads(r)["step"] <= self.step]
                metrics_path.write_text("".join(r + "\n" for r in rows))
            if self.step:   # and the events of those steps (TensorBoard would show them twice)
                trim_events(self.out / "tensorboard", self.step)
        trackers.start(acc, dataclasses.asdict(cfg))   # (after the trim: the new events file is not trimmed)
        fault = int(os.environ.get("GFT_FAULT_AT_STEP", "0"))  # tests: a real SIGKILL mid-run
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process, desc=cfg.method)
        self.policy.train()
        while self.step < cfg.max_steps:
            if fault and self.step + 1 == fault:
                os.kill(os.getpid(), signal.SIGKILL)
            start = time.perf_counter()
            groups = self._groups_for_step(self.step)
            metrics = self.train_step(groups)
            self.step += 1
            metrics.update(group_metrics(groups))
            metrics["tokens_per_s"] = metrics["tokens"] / (time.perf_counter() - start)
            metrics["step"] = self.step
            metrics["processes"] = acc.num_processes
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                metrics.update(self.evaluate())
            if acc.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
                trackers.log(acc, metrics, self.step)   # on disk at every step, as metrics.jsonl
                bar.set_postfix(bar_fields(metrics, cfg))
            bar.update(1)
            # the last step too: a later --resume with a larger max_steps continues from it
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.max_steps):
                self.save_checkpoint()
        bar.close()
        self.save_final()
        if acc.is_main_process:
            plot_metrics(metrics_path, self.out / "training.png")
        acc.end_training()   # the trackers finish (and a distributed run's process group ends)
        return self.out / "final"


def trim_events(logdir: Path, last_step: int) -> None:
    """Drops the TensorBoard events of steps after ``last_step`` from the event files under
    ``logdir``, each file rewritten under a temporary name and renamed. (The writer's own
    ``purge_step`` depends on the order readers meet the files in, which is by name: time, host,
    process id.)"""
    try:   # the raw records, rewritten as they were (the plain loader converts scalars to tensors)
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        return
    for path in Path(logdir).rglob("events.out.tfevents.*"):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in records if not (e := Event.FromString(r)).HasField("summary") or e.step <= last_step]
        if len(kept) == len(records):
            continue
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            writer = RecordWriter(f)
            for r in kept:
                writer.write(r)
        tmp.replace(path)


def bar_fields(metrics: dict, cfg) -> dict:
    """The progress bar's fields, each named: the loss, then the reward of each source in the
    groups when rewards drive the update (group advantages), else the token accuracy (SFT's
    rewards are not what it trains on)."""
    fields = {"loss": f"{metrics['loss']:.3f}"}
    rewards = {source: metrics[f"reward/{source}_mean"] for source in ("expert", "teacher", "self")
               if f"reward/{source}_mean" in metrics}
    if cfg.uses_group_advantage and rewards:
        fields.update({f"{source}_reward": f"{r:.2f}" for source, r in rewards.items()})
    else:
        fields["token_acc"] = f"{metrics['mean_token_accuracy']:.2f}"
    return fields


def plot_metrics(metrics_path: Path, png: Path) -> list | None:
    """training.png, one panel per quantity, each on its own scale; returns the panels drawn
    (title, keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    # grad norm and entropy are different quantities on different scales: a panel each
    panels = [("loss", ["loss"]), ("reward", [k for k in rows[-1] if k.startswith("reward/") and k.endswith("_mean")]),
              ("DCR (fractions)", ["dcr/rectified_frac", "dcr/mean_target_prob", "groups/zero_variance_frac"]),
              ("grad norm", ["grad_norm"]), ("entropy (nats/token)", ["entropy"]),
              ("held-out (eval_file)", [k for k in rows[-1] if k.startswith("eval/pass@")])]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:   # each at the steps that have it (evaluations are every eval_every steps)
            have = [r for r in rows if k in r]
            ax.plot([r["step"] for r in have], [r[k] for r in have], label=k.split("/")[-1],
                    marker="o" if k.startswith("eval/") else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return panels


def train(cfg: config_mod.Config) -> Path:
    return Trainer(cfg).train()
