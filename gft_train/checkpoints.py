"""Checkpoints and the output directory.

A checkpoint (``save_every``) is accelerate's own state (``save_state``: model, optimizer,
scheduler, RNG) plus the step, the current groups and the configuration, written under a
temporary name and renamed when complete; ``--resume`` continues from the newest complete one
(``load_state``) and reaches the same weights as an uninterrupted run. The final model is
written the same way, to ``output_dir/final``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import config as config_mod
from .groups import Group, load_groups, save_groups

# What a run writes in output_dir: a directory holding any of them holds a run.
RUN_FILES = (
    "checkpoints",
    "final",
    "final.tmp",
    "metrics.jsonl",
    "tensorboard",
    "training.png",
    "groups.jsonl",
    "gft_config.yaml",
)


def _previous_run(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def latest_checkpoint(out: Path) -> Path | None:
    done = [d for d in (out / "checkpoints").glob("step-*") if (d / "trainer_state.json").is_file()]
    return max(done, key=lambda d: int(d.name.split("-")[1])) if done else None


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
    latest = latest_checkpoint(out)
    if not cfg.resume:
        if found:
            raise FileExistsError(
                f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                "--overwrite-output-dir to replace it, or another output_dir"
            )
        return None
    if latest is None:
        if found:
            raise FileExistsError(
                f"--resume: {out} holds a run ({', '.join(found)}) but no complete checkpoint to "
                "resume from: pass --overwrite-output-dir to replace it, or another output_dir"
            )
        return None
    _check_same_config(latest, out, cfg)
    return latest


def _check_same_config(latest: Path, out: Path, cfg: config_mod.Config) -> None:
    saved_path = latest / "gft_config.yaml"
    saved_path = saved_path if saved_path.is_file() else out / "gft_config.yaml"
    if saved_path.is_file():
        changed = config_mod.changed_fields(config_mod.load_saved(saved_path), cfg)
        if changed:
            said = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"--resume: the configuration differs from the run's ({saved_path}) in {said}; "
                f"a resume may change only {', '.join(sorted(config_mod.RESUMABLE))}"
            )


@dataclass
class Resumed:
    """What a checkpoint restores beside accelerate's state."""

    step: int
    pool_start: int
    groups: list[Group]


def save_checkpoint(
    acc, out: Path, cfg: config_mod.Config, step: int, groups: list[Group] | None, pool_start: int
) -> None:
    """``out/checkpoints/step-N``, complete or absent (every process must call it)."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    # every process writes into tmp (its RNG state, its shards): tmp is renamed after all have
    # written (a rank still writing into a renamed tmp failed a ZeRO-3 run)
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_groups(groups, tmp / "groups.jsonl")
        config_mod.save(cfg, tmp / "gft_config.yaml")  # what a --resume is compared with
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "pool_start": pool_start}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if cfg.save_total_limit:  # the newest complete ones stay (the one just written among them)
            done = sorted(
                (d for d in final.parent.glob("step-*") if (d / "trainer_state.json").is_file()),
                key=lambda d: int(d.name.split("-")[1]),
            )
            for old in done[: -cfg.save_total_limit]:
                shutil.rmtree(old)
    acc.wait_for_everyone()


def load_checkpoint(acc, checkpoint: Path, max_steps: int, strict: bool = True) -> Resumed:
    """accelerate's state loaded from ``checkpoint``; the step and groups it holds. ``strict=False``:
    the checkpoint holds some of the model's weights (a LoRA adapter, checked by its own hook)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if state["step"] > max_steps:
        raise ValueError(
            f"--resume: max_steps {max_steps} is below the checkpoint's step {state['step']} ({checkpoint})"
        )
    from accelerate.utils import DistributedType

    # strict=False where accelerate reads the weights itself (FSDP and DeepSpeed read their own, whole, state)
    partial = not strict and acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    acc.load_state(str(checkpoint), **({"strict": False} if partial else {}))
    return Resumed(state["step"], state["pool_start"], load_groups(checkpoint / "groups.jsonl"))


def save_final(acc, out: Path, cfg: config_mod.Config, model, tokenizer, state: dict) -> Path:
    """The trained model (``state``, its whole state dict) and tokenizer in ``out/final``, renamed
    into place when complete (every process must call it)."""
    final = out / "final"
    if acc.is_main_process:
        tmp = out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)  # (a PEFT model saves its adapter alone)
        tokenizer.save_pretrained(tmp)
        config_mod.save(cfg, tmp / "gft_config.yaml")
        if cfg.merge_lora:
            from .adapters import write_merged

            write_merged(tmp, cfg, tokenizer)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    acc.wait_for_everyone()
    return final
