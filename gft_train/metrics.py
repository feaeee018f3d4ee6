"""Metrics and logging: one row per step in ``metrics.jsonl`` (on disk at every step: a killed
run keeps it), the progress bar's fields, and ``training.png``. The trackers (TensorBoard, wandb,
...) are accelerate's (``trackers.py``). On resume, the rows and TensorBoard events of steps after
the checkpoint are dropped first. The rows are strict JSON: a figure that is not a finite number
(a NaN loss, no gradient norm) is ``null``, which every JSON reader takes (a bare ``NaN`` is not
JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .groups import SOURCES


class MetricsLog:
    """``output_dir/metrics.jsonl``, written by the main process."""

    def __init__(self, out: Path, step: int, is_main: bool):
        self.path = out / "metrics.jsonl"
        self.is_main = is_main
        if not is_main:
            return
        if step == 0 and self.path.exists():
            self.path.unlink()
        elif self.path.exists():  # resumed: drop the rows of steps after the checkpoint
            rows = [r for r in self.path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
            self.path.write_text("".join(r + "\n" for r in rows))
        if step:  # and the events of those steps (TensorBoard would show them twice)
            trim_events(out / "tensorboard", step)

    def write(self, metrics: dict, step: int) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(strict_json(metrics) + "\n")


def finite_or_none(value):
    """``value`` with every float that is not finite (NaN, inf) replaced by None, in lists and
    dicts too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value, **kwargs) -> str:
    """``json.dumps`` that writes only standard JSON: non-finite figures as null."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def trim_events(logdir: Path, last_step: int) -> None:
    """Drops the TensorBoard events of steps after ``last_step`` from the event files under
    ``logdir``, each file rewritten under a temporary name and renamed. (The writer's own
    ``purge_step`` depends on the order readers meet the files in, which is by name: time, host,
    process id.)"""
    try:  # the raw records, rewritten as they were (the plain loader converts scalars to tensors)
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
    rewards = {source: metrics[f"reward/{source}_mean"] for source in SOURCES if f"reward/{source}_mean" in metrics}
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
    panels = [
        ("loss", ["loss"]),
        ("reward", [k for k in rows[-1] if k.startswith("reward/") and k.endswith("_mean")]),
        ("DCR (fractions)", ["dcr/rectified_frac", "dcr/mean_target_prob", "groups/zero_variance_frac"]),
        ("grad norm", ["grad_norm"]),
        ("entropy (nats/token)", ["entropy"]),
        ("held-out (eval_file)", [k for k in rows[-1] if k.startswith("eval/pass@")]),
    ]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:  # each at the steps that have it (evaluations are every eval_every steps)
            have = [r for r in rows if r.get(k) is not None]  # (null: no finite figure that step)
            ax.plot(
                [r["step"] for r in have],
                [r[k] for r in have],
                label=k.split("/")[-1],
                marker="o" if k.startswith("eval/") else None,
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return panels
