"""The accelerate training loop: groups -> batches -> fused GFT loss -> optimizer steps.

Where each part lives (this module sets them up and runs the loop):

    pool.py          which groups a step trains on (online: rebuilt every refresh_every steps with
                     the current weights; offline: built once or read from groups_file)
    groups.py        a group: its responses, rewards and advantages; rollout.py: the engines
    step.py          one optimizer step: micro-batches, the fused loss, the per-step statistics;
                     packing.py: packed (padding-free) micro-batches
    checkpoints.py   the output directory, checkpoints (accelerate's save_state / load_state),
                     --resume, the final model
    metrics.py       metrics.jsonl, the progress bar, training.png; trackers.py: TensorBoard, wandb,
                     ... through accelerate (report_to)
    distributed.py   the Accelerator a launch asked for (DDP, FSDP1/2, ZeRO-3), prepared models
    models.py        load_model (a local folder or a Hub id, --torch-dtype); adapters.py: LoRA
                     through PEFT (--lora-r); preflight.py: the data checked before the first step

Self-samples are trained on the token ids the rollout engine sampled (``Response.train_input``).
``--resume`` continues from the newest complete checkpoint (or the one it names) and reaches the
same weights as an uninterrupted run. SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C) ends
the run at the next step boundary with a checkpoint and ``TrainingStopped``, on every process
once any one has received it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
import warnings
from pathlib import Path

import torch

from . import adapters, checkpoints, trackers
from . import config as config_mod
from .checkpoints import RUN_FILES, claim_output_dir  # noqa: F401  (re-exported: the trainer's old names)
from .data import load_rows
from .distributed import full_state_dict, is_sharded, make_accelerator, prepare
from .groups import build_groups, group_metrics, load_groups
from .metrics import MetricsLog, bar_fields, plot_metrics, trim_events  # noqa: F401  (re-exported)
from .models import base_model_name, load_model, model_options, unpartitioned
from .packing import check_packing, packs_in_one_row
from .pool import GroupPool
from .preflight import check_engines, preflight
from .rewards import load_reward
from .rollout import make_engine
from .step import (  # noqa: F401
    GFTPolicy,
    TokenSums,
    TrainingDiverged,
    aggregation,
    cut_warning,
    optimizer_step,
    run_loss,
    scheduled_lrs,
    step_batches,
)

__all__ = [
    "Trainer",
    "TrainingStopped",
    "train",
    "load_model",
    "GFTPolicy",
    "TokenSums",
    "aggregation",
    "claim_output_dir",
    "plot_metrics",
    "trim_events",
    "bar_fields",
    "make_accelerator",
    "RUN_FILES",
]


class TrainingStopped(Exception):
    """A run ended by a signal at a step boundary, its checkpoint written; ``exit_code`` is the
    shell's for that signal (128 + its number)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# The signals that end a run with a checkpoint (a scheduler's preemption, Ctrl-C).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Trainer:
    def __init__(self, cfg: config_mod.Config):
        from accelerate.utils import set_seed

        self.cfg = cfg = cfg.resolved()
        self.acc = make_accelerator(
            "bf16" if cfg.bf16 else "no", **trackers.accelerator_kwargs(cfg.report_to, cfg.output_dir)
        )
        check_engines(cfg, self.acc.device)  # (before output_dir is touched)
        self.inputs = checkpoints.run_inputs(cfg)  # (what a resume checks: resolved paths, the data's sha256)
        self.resume_from = claim_output_dir(cfg, self.acc.is_main_process, self.inputs)
        self.acc.wait_for_everyone()
        # the reward before the model: one that cannot load (reward 'math' without math-verify, a
        # module that does not import) stops the run at once; offline groups with no evaluation score nothing
        scores = cfg.eval_every or not cfg.groups_file or cfg.refresh_every
        self.reward_fn = load_reward(cfg.reward) if scores else None
        set_seed(cfg.seed)
        self.out = Path(cfg.output_dir)
        model, self.tokenizer = load_model(cfg.model, cfg.attn_implementation, **model_options(cfg))
        offline = self._load_data()
        cfg = self.cfg
        if cfg.packed:  # before anything trains: a model that would mix packed sequences is refused
            # (ZeRO-3 may have loaded it partitioned, empty on this rank: the probe runs on a whole copy)
            check_packing(
                unpartitioned(lambda: load_model(cfg.model, cfg.attn_implementation, **model_options(cfg))[0])
                if self.sharded
                else model
            )
        preflight(cfg, self.rows, offline, self.tokenizer, model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = self._adapted(model)
        # sharded weights cannot generate on one process: it samples from a whole copy,
        # refreshed from the gathered weights before each rollout
        self.sampler = None
        if self.sharded and self.acc.is_main_process and (cfg.n_self or cfg.eval_every):
            self.sampler = unpartitioned(lambda: self._adapted(load_model(cfg.model, **model_options(cfg))[0]))
        self.loss = run_loss(cfg)  # the run's one GFTLoss: its options are checked here, once
        self.policy, self.optimizer, self.scheduler = prepare(self.acc, GFTPolicy(model, self.loss), cfg.optimization)
        if cfg.lora_r:
            adapters.keep_adapter_in_checkpoints(self.acc)
        self.engine = None
        self.step = 0
        self._bar = None  # the progress bar, while train() runs
        self._warned_cut = False  # a response cut at max_length is said once per run (and counted per step)
        self._signal = 0  # the stop signal this process received (0: none)
        save_to = self.out / "groups.jsonl" if self.acc.is_main_process else None
        self.pool = GroupPool(cfg, self.rows, self._build, save_to, offline)

    def _adapted(self, model):
        """The model with the run's LoRA adapter (``lora_r``), or as it is."""
        if not self.cfg.lora_r:
            return model
        adapters.check_rollout_engine(self.cfg)
        return adapters.apply_lora(model, self.cfg, base_model_name(self.cfg.model))

    def _load_data(self):
        """The prompt rows (``self.rows``) and held-out rows, checked now; returns the offline groups
        of ``groups_file`` (else None). ``num_epochs`` sets ``max_steps``, when that is not given,
        once the data is known (a given max_steps wins, as in transformers' Trainer)."""
        cfg = self.cfg
        if not cfg.train_file and not cfg.groups_file:
            raise ValueError("train needs train_file (prompts) or groups_file (offline groups)")
        self.rows = (
            # (an answer is needed only where a reward drives the update: SFT and DFT score nothing)
            load_rows(
                cfg.train_file, cfg.columns, cfg.train_split, cfg.dataset_config, answers=cfg.uses_group_advantage
            )
            if cfg.train_file
            else None
        )
        if cfg.refresh_every and self.rows is None:
            raise ValueError("online groups (refresh_every > 0) need train_file")
        # held-out rows checked now, not at the first evaluation
        self.eval_rows = (
            load_rows(cfg.eval_file, cfg.columns, cfg.eval_split, cfg.dataset_config)[: cfg.eval_max_prompts or None]
            if cfg.eval_every
            else None
        )
        offline = load_groups(cfg.groups_file) if cfg.groups_file and not cfg.refresh_every else None
        if cfg.max_steps is None:  # (resolved() left it unset only for num_epochs)
            n = len(self.rows) if self.rows is not None else len(offline)
            self.cfg = dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.num_epochs * n / cfg.prompts_per_step)))
        return offline

    # ---- the model and its rollouts ------------------------------------------------------
    @property
    def model(self):
        return self.acc.unwrap_model(self.policy).model

    @property
    def sharded(self) -> bool:
        """Whether the weights are split across processes (FSDP, DeepSpeed ZeRO-3)."""
        return is_sharded(self.acc)

    def full_state_dict(self) -> dict:
        """The model's whole state dict on the main process (every process must call it)."""
        return full_state_dict(self.acc, self.policy)

    def _engine(self, state=None):
        model = self.model
        if self.sampler is not None:
            self.sampler.load_state_dict(state)
            model = self.sampler
        if self.engine is None:
            self.engine = make_engine(
                self.cfg.engine, model=model, tokenizer=self.tokenizer, model_path=self.cfg.model, cfg=self.cfg
            )
        self.engine.load_weights(model)
        return self.engine

    def _teacher_engine(self):
        if not self.cfg.teacher_model:
            return None
        model, tokenizer = load_model(self.cfg.teacher_model, **model_options(self.cfg, teacher=True))
        return make_engine(
            self.cfg.engine, model=model, tokenizer=tokenizer, model_path=self.cfg.teacher_model, cfg=self.cfg
        )

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
        return self.pool.for_step(step)

    def evaluate(self) -> dict:
        """pass@1, pass@k, distinct correct (and greedy pass@1) of the current weights on the
        held-out rows, as ``gft-train eval`` computes them, under a forked RNG: evaluating does
        not change the training that follows (a resumed run reaches the same weights)."""
        from accelerate.utils import broadcast_object_list

        from .evaluate import split_accuracy

        state = self.full_state_dict() if self.sharded else None
        box = [None]
        if self.acc.is_main_process:
            engine = self._engine(state)
            devices = [self.acc.device] if self.acc.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                res = split_accuracy(engine, self.eval_rows, self.reward_fn, self.cfg)
            box[0] = {f"eval/{k}": v for k, v in res.items() if k != "per_prompt"}
        broadcast_object_list(box)
        return box[0]

    # ---- checkpoints (checkpoints.py) ----------------------------------------------------
    def save_checkpoint(self) -> Path:
        return checkpoints.save_checkpoint(
            self.acc, self.out, self.cfg, self.step, self.pool.groups, self.pool.start, self.inputs
        )

    def maybe_resume(self):
        if not self.cfg.resume:
            return
        if self.resume_from is None:
            self.acc.print(f"--resume: no complete checkpoint in {self.out / 'checkpoints'}; starting at step 0")
            return
        # (a LoRA run's checkpoints hold the adapter alone: the frozen base is the one loaded)
        resumed = checkpoints.load_checkpoint(
            self.acc, self.resume_from, self.cfg.max_steps, strict=not self.cfg.lora_r
        )
        self.step, self.pool.start, self.pool.groups = resumed.step, resumed.pool_start, resumed.groups
        if self.acc.is_main_process:  # (going back to an earlier checkpoint: what came after it goes)
            dropped = checkpoints.drop_later(self.out, self.resume_from, self.step)
            if dropped:
                print(f"--resume {self.cfg.resume}: removed what the run wrote after it: {', '.join(dropped)}")
        self.acc.wait_for_everyone()
        # The optimizer comes back at the rate its old schedule gave this step; a resume that moves
        # max_steps (extending a finished run) trains on at the new schedule's rate at this step,
        # not at the old one's end (0 after a finished cosine or linear run). Unchanged: the same value.
        for group, lr in zip(self.optimizer.param_groups, scheduled_lrs(self.scheduler), strict=False):
            group["lr"] = lr
        self.acc.print(f"resumed from {self.resume_from} (step {self.step})")

    def save_final(self) -> Path:
        """The trained model and tokenizer in ``output_dir/final``, renamed into place when complete."""
        self.acc.wait_for_everyone()
        return checkpoints.save_final(self.acc, self.out, self.cfg, self.model, self.tokenizer, self.full_state_dict())

    # ---- the loop ------------------------------------------------------------------------
    def train_step(self, groups) -> dict:
        """One optimizer step on ``groups`` (step.py); the step's metrics."""
        cfg = self.cfg
        batches = step_batches(
            self.acc,
            self.tokenizer,
            groups,
            cfg.micro_batch_size,
            cfg.max_length,
            cfg.packed,
            one_row=cfg.packed and packs_in_one_row(self.model),
        )
        if batches.cut and not self._warned_cut:
            self._warned_cut = True  # said once; completions/cut_frac counts them every step
            warnings.warn(cut_warning(batches, self.step + 1, cfg.max_length), stacklevel=2)
        try:
            stats = optimizer_step(
                self.acc, self.policy, self.optimizer, self.scheduler, batches, cfg.optimization, at_step=self.step + 1
            )
        except TrainingDiverged:
            if self._bar is not None:
                self._bar.close()  # (the error line that follows then starts a line of its own)
            raise
        return stats.metrics()

    def _step_metrics(self, groups, start: float) -> dict:
        """The metrics of the step just taken on ``groups`` (and an evaluation when one is due)."""
        cfg = self.cfg
        metrics = self.train_step(groups)
        self.step += 1
        metrics.update(group_metrics(groups))
        metrics["tokens_per_s"] = metrics["tokens"] / (time.perf_counter() - start)
        metrics["step"] = self.step
        metrics["processes"] = self.acc.num_processes
        if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
            metrics.update(self.evaluate())
        return metrics

    # ---- stop signals ----------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._signal = signum
        for sig, handler in self._handlers.items():  # a second signal acts at once, as without us
            signal.signal(sig, handler)

    def _install_signal_handlers(self) -> None:
        self._handlers = {}
        try:
            for sig in STOP_SIGNALS:
                self._handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: signals reach the main one, which keeps its own
            self._handlers = {}

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers = {}

    def _stop_signal(self) -> int:
        """The stop signal any process has received (0: none), the same on every process: the
        signal may have reached only some of them (every process must call it, at a step boundary)."""
        if self.acc.num_processes == 1 or not torch.distributed.is_initialized():
            return self._signal
        flag = torch.tensor([self._signal], device=self.acc.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def _stopped(self, signum: int, saved: Path | None) -> TrainingStopped:
        checkpoint = saved or self.save_checkpoint()
        name = signal.Signals(signum).name
        who = "" if self._signal == signum else " (on another process)"
        return TrainingStopped(
            f"stopped by {name}{who} after step {self.step} of {self.cfg.max_steps}; checkpoint {checkpoint}; "
            "to continue, run the same command with --resume",
            128 + signum,
        )

    def train(self) -> Path:
        self._install_signal_handlers()
        try:
            return self._train()
        finally:
            self._restore_signal_handlers()

    def _train(self) -> Path:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        self.maybe_resume()
        self.out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out, self.step, acc.is_main_process)
        trackers.start(acc, dataclasses.asdict(cfg))  # (after MetricsLog trimmed a resumed run's events)
        fault = int(os.environ.get("GFT_FAULT_AT_STEP", "0"))  # tests: a real signal mid-run (SIGKILL unless
        fault_signal = signal.Signals["SIG" + os.environ.get("GFT_FAULT_SIGNAL", "KILL")]  # named; to the
        fault_rank = int(os.environ.get("GFT_FAULT_RANK", "-1"))  # processes of GFT_FAULT_RANK, else all)
        bar = self._bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process, desc=cfg.method)
        self.policy.train()
        claimed = False
        while self.step < cfg.max_steps:
            if fault and self.step + 1 == fault and fault_rank in (-1, acc.process_index):
                os.kill(os.getpid(), fault_signal)
            start = time.perf_counter()
            metrics = self._step_metrics(self._groups_for_step(self.step), start)
            log.write(metrics, self.step)
            trackers.log(acc, metrics, self.step)  # on disk at every step, as metrics.jsonl
            if acc.is_main_process:
                bar.set_postfix(bar_fields(metrics, cfg))
                if not claimed:  # the run's claim on output_dir: a start that failed before holds none
                    config_mod.save(cfg, self.out / "gft_config.yaml")
            claimed = True
            bar.update(1)
            saved = None
            # the last step too: a later --resume with a larger max_steps continues from it
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.max_steps):
                saved = self.save_checkpoint()
            signum = self._stop_signal()
            if signum:
                bar.close()
                stopped = self._stopped(signum, saved)
                acc.end_training()
                raise stopped
        bar.close()
        if acc.is_main_process and not claimed:  # (a resume at its last step: no step taken here)
            config_mod.save(cfg, self.out / "gft_config.yaml")
        final = self.save_final()
        if acc.is_main_process:
            plot_metrics(log.path, self.out / "training.png")
        acc.end_training()  # the trackers finish (and a distributed run's process group ends)
        return final


def train(cfg: config_mod.Config) -> Path:
    return Trainer(cfg).train()
