"""Checkpoints and the output directory.

A checkpoint (``save_every``, and on SIGTERM / SIGINT) is accelerate's own state (``save_state``:
model, optimizer, scheduler, RNG) plus the step, the current groups, the configuration and the
run's inputs (resolved paths, data files' sha256), written under a temporary name and renamed when
complete; ``--resume`` continues from the newest complete one, ``--resume step-8`` (or a path) from
that one (``load_state``), and reaches the same weights as an uninterrupted run. The final model
is written the same way, to ``output_dir/final``.

A run claims its output_dir (``gft_config.yaml``) once its first step is done: a start that failed
before (a missing engine, an unsuitable loss backend, a bad reward) leaves at most leftovers
(``LEFTOVERS``), which the next run into the folder clears.
"""

from __future__ import annotations

import hashlib
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


# What only a run that completed a step writes (its claim on output_dir); the rest of RUN_FILES
# a start may leave when it fails before its first step is done.
STARTED = ("checkpoints", "final", "final.tmp", "metrics.jsonl", "gft_config.yaml")
LEFTOVERS = tuple(name for name in RUN_FILES if name not in STARTED)
# The data a resume must find unchanged (its contents, not only its name).
DATA_FIELDS = ("train_file", "groups_file")


def _previous_run(out: Path, keep: set[Path] = frozenset()) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists() and (out / name).resolve() not in keep]


def _input_paths(cfg: config_mod.Config) -> set[Path]:
    """The files the run reads: never taken for, or removed as, a run's output."""
    return {Path(v).resolve() for v in (getattr(cfg, k) for k in config_mod.PATH_FIELDS) if v}


def _remove(out: Path, names) -> None:
    for name in names:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative names and bytes, in order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def run_inputs(cfg: config_mod.Config) -> dict:
    """field -> {"path": resolved, "sha256": contents (data files)} for the paths a resume must keep."""
    inputs = {}
    for name in config_mod.PATH_FIELDS:
        value = getattr(cfg, name)
        if name in config_mod.RESUMABLE or not value:
            continue
        entry = {"path": config_mod.local_path(value)}
        if name in DATA_FIELDS and Path(entry["path"]).exists():
            entry["sha256"] = fingerprint(Path(entry["path"]))
        inputs[name] = entry
    return inputs


def _steps(out: Path) -> list[Path]:
    """The complete checkpoints of ``out``, oldest first."""
    done = [d for d in (out / "checkpoints").glob("step-*") if (d / "trainer_state.json").is_file()]
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def latest_checkpoint(out: Path) -> Path | None:
    done = _steps(out)
    return done[-1] if done else None


def chosen_checkpoint(out: Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: 'latest' (the newest complete one, else None), a name
    under ``out/checkpoints`` (``step-8``) or a checkpoint's path."""
    if resume == "latest":
        return latest_checkpoint(out)
    for path in (out / "checkpoints" / resume, Path(resume).expanduser()):
        if (path / "trainer_state.json").is_file():
            return path
    done = ", ".join(d.name for d in _steps(out)) or "none"
    raise ValueError(
        f"--resume {resume}: not a complete checkpoint (neither {out / 'checkpoints' / resume} nor {resume} "
        f"holds trainer_state.json); complete ones in {out / 'checkpoints'}: {done}"
    )


def claim_output_dir(cfg: config_mod.Config, is_main: bool = True, inputs: dict | None = None) -> Path | None:
    """Checks ``output_dir`` against what the run asks, before anything is trained or written:
    a run there is continued only by ``--resume`` with the same training configuration and data,
    replaced only with ``--overwrite-output-dir``, else refused; what a start that failed before its
    first step left is cleared. Returns the checkpoint to resume from. ``inputs``: ``run_inputs(cfg)``
    (computed here when not given)."""
    out = Path(cfg.output_dir)
    found = _previous_run(out, _input_paths(cfg))
    if cfg.resume and cfg.overwrite_output_dir:
        raise ValueError("--resume and --overwrite-output-dir contradict each other: pick one")
    if cfg.overwrite_output_dir:
        if is_main:
            _remove(out, found)
        return None
    if found and not set(found) & set(STARTED):  # no step was completed: nothing to keep
        if is_main:
            print(f"{out}: clearing what a start that failed before its first step left ({', '.join(found)})")
            _remove(out, found)
        found = []
    if not cfg.resume:
        if found:
            raise FileExistsError(
                f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                "--overwrite-output-dir to replace it, or another output_dir"
            )
        return None
    checkpoint = chosen_checkpoint(out, cfg.resume)
    if checkpoint is None:
        if found:
            raise FileExistsError(
                f"--resume: {out} holds a run ({', '.join(found)}) but no complete checkpoint to "
                "resume from: pass --overwrite-output-dir to replace it, or another output_dir"
            )
        return None
    _check_same_config(checkpoint, out, cfg, run_inputs(cfg) if inputs is None else inputs)
    return checkpoint


def drop_later(out: Path, checkpoint: Path, step: int) -> list[str]:
    """After a resume from ``checkpoint`` (at ``step``) of this output_dir: its later checkpoints and
    final model belong to the course abandoned, and are removed (main process). Returns their names."""
    if checkpoint.parent.resolve() != (out / "checkpoints").resolve():
        return []
    later = [f"checkpoints/{d.name}" for d in _steps(out) if int(d.name.split("-")[1]) > step]
    stale = later + [n for n in ("final", "final.tmp") if later and (out / n).exists()]
    _remove(out, stale)
    return stale


def _check_same_config(latest: Path, out: Path, cfg: config_mod.Config, inputs: dict) -> None:
    saved_path = latest / "gft_config.yaml"
    saved_path = saved_path if saved_path.is_file() else out / "gft_config.yaml"
    saved_inputs = json.loads((latest / "trainer_state.json").read_text()).get("inputs", {})
    if saved_path.is_file():
        saved_paths = {k: v["path"] for k, v in saved_inputs.items()}
        changed = config_mod.changed_fields(config_mod.load_saved(saved_path), cfg, saved_paths)
        if changed:
            said = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"--resume: the configuration differs from the run's ({saved_path}) in {said}; "
                f"a resume may change only {', '.join(sorted(config_mod.RESUMABLE))}"
            )
    for name, entry in saved_inputs.items():  # (a checkpoint written before these were kept has none)
        now = inputs.get(name, {}).get("sha256")
        if "sha256" in entry and now is not None and now != entry["sha256"]:
            raise ValueError(
                f"--resume: {name} {getattr(cfg, name)} has changed since the run read it (sha256 "
                f"{entry['sha256'][:12]}... -> {now[:12]}...): a resume trains on the same data; restore "
                "the file, or start a new run in another output_dir"
            )


@dataclass
class Resumed:
    """What a checkpoint restores beside accelerate's state."""

    step: int
    pool_start: int
    groups: list[Group]


def save_checkpoint(
    acc,
    out: Path,
    cfg: config_mod.Config,
    step: int,
    groups: list[Group] | None,
    pool_start: int,
    inputs: dict | None = None,
) -> Path:
    """``out/checkpoints/step-N``, complete or absent (every process must call it); ``inputs``:
    ``run_inputs(cfg)``, what a resume compares its own with."""
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
        state = {"step": step, "pool_start": pool_start, "inputs": run_inputs(cfg) if inputs is None else inputs}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
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
    return final


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
