"""Experiment trackers through accelerate (``report_to``): TensorBoard by default; wandb, mlflow,
comet_ml, aim, clearml, dvclive, swanlab, trackio when installed, or one registered with
accelerate's ``register_tracker_class``; ``none`` for no tracker.

The Accelerator is built with ``log_with`` and a project directory (``output_dir``, TensorBoard's
events under ``output_dir/tensorboard``); the trainer calls ``start`` once, ``log`` at every step
and ``Accelerator.end_training`` at the end. A tracker named in ``report_to`` that is not
installed (or not known to accelerate) stops the run before anything is trained, in one line:
accelerate itself would drop it with a warning and train without it.
"""

from __future__ import annotations

import math
from pathlib import Path

PROJECT = "gft-train"  # the project (run) name every tracker is started with


def tracker_names(report_to: str) -> list[str]:
    """``report_to`` ('tensorboard', 'tensorboard,wandb', 'all', 'none') -> the trackers' names,
    each checked to be known to accelerate and installed; 'all' is every installed one."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    if not isinstance(report_to, str):
        raise TypeError(f"report_to must be a string such as 'tensorboard,wandb' or 'none', got {report_to!r}")
    names = [n.strip().lower() for n in report_to.replace(" ", ",").split(",") if n.strip()]
    installed = [str(t) for t in get_available_trackers()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return installed
    for name in names:
        if name in ("none", "all"):
            raise ValueError(f"report_to: {name!r} stands alone, got {report_to!r}")
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"report_to: unknown tracker {name!r}; accelerate knows "
                f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))} (or 'none', 'all')"
            )
        if name in LoggerType.list() and name not in installed:  # (one registered by register_tracker_class is there)
            raise ValueError(
                f"report_to: the tracker {name!r} is not installed (pip install {name}), or leave it out "
                f"of report_to (installed: {', '.join(installed) or 'none'})"
            )
    return list(dict.fromkeys(names))


def accelerator_kwargs(report_to: str, output_dir: str | Path) -> dict:
    """``Accelerator`` keyword arguments for the trackers of ``report_to`` (checked here, up front)."""
    from accelerate.utils import ProjectConfiguration

    names = tracker_names(report_to)
    out = Path(output_dir)
    return {
        "log_with": names or None,
        "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    }


def start(acc, config: dict) -> None:
    """Starts the trackers; the run's configuration goes to those that keep one (TensorBoard's
    would add a second event file per run: the configuration is in output_dir/gft_config.yaml)."""
    acc.init_trackers(PROJECT)
    values = {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v) for k, v in config.items()}
    if acc.is_main_process:
        for tracker in acc.trackers:
            if tracker.name != "tensorboard":
                tracker.store_init_configuration(values)


def log(acc, metrics: dict, step: int) -> None:
    """The step's finite numbers to every tracker, at ``step`` (flushed: a killed run keeps them)."""
    values = {
        k: v
        for k, v in metrics.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    acc.log(values, step=step)
