"""The study's figures: learning curves, accuracy against tau, the methods side by side."""

from __future__ import annotations

from pathlib import Path


def _curves_figure(agg, plt):
    """Held-out pass@1 along training, each method with its seeds' spread."""
    curves = [n for n in agg if agg[n]["family"] in ("methods", "ablation") and agg[n].get("curve")]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for n in curves:
        pts = sorted(agg[n]["curve"].items())
        xs, ms, ss = [p for p, _ in pts], [v[0] for _, v in pts], [v[1] for _, v in pts]
        (line,) = ax.plot(xs, ms, marker="o", ms=3, label=n, ls="--" if agg[n]["family"] == "ablation" else "-")
        ax.fill_between(
            xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], color=line.get_color(), alpha=0.15
        )
    ax.set_xlabel("optimizer steps (each run as long as its validation curve rose)")
    ax.set_ylabel("held-out pass@1 (temperature 0.5)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _tau_figure(agg, plt):
    """Accuracy and the DCR-rectified fraction against tau."""
    taus = sorted(
        [
            (agg[n]["x"], n)
            for n in agg
            if agg[n]["x"] is not None
            and not isinstance(agg[n]["x"], str)
            and (agg[n]["family"] == "tau" or n in ("GFT", "GFT w/o DCR"))
        ]
    )
    if len(taus) < 3:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    xs = list(range(len(taus)))
    ax.errorbar(
        xs,
        [agg[n]["id"][0] for _, n in taus],
        yerr=[agg[n]["id"][1] for _, n in taus],
        marker="o",
        label="held-out pass@1",
    )
    ax.set_xticks(xs, [str(t) for t, _ in taus])
    ax.set_xlabel("tau")
    ax.set_ylabel("pass@1")
    ax2 = ax.twinx()
    ax2.plot(xs, [agg[n]["rectified"][0] for _, n in taus], color="tab:orange", marker="s", label="rectified fraction")
    ax2.set_ylabel("DCR-rectified fraction")
    fig.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.12, 0.97))
    fig.tight_layout()
    return fig


def _methods_figure(agg, plt):
    """The methods side by side: accuracy, forgetting, drift."""
    methods = [n for n in agg if agg[n]["family"] in ("methods", "ablation")]
    if not methods:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, (title, m) in zip(
        axes,
        [
            ("held-out pass@1", "id"),
            ("harder (OOD) pass@1", "ood"),
            ("digit reversal (forgetting probe)", "probe"),
            ("KL(base || model)", "kl_base"),
        ],
    ):
        ax.bar(range(len(methods)), [agg[n][m][0] for n in methods], yerr=[agg[n][m][1] for n in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figures(agg, docs: Path, prefix: str) -> list[str]:
    """The report's figures that the results allow, saved under ``docs``; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, make in (("curves", _curves_figure), ("tau", _tau_figure), ("methods", _methods_figure)):
        fig = make(agg, plt)
        if fig is not None:
            files.append(f"{prefix}{name}.png")
            fig.savefig(docs / files[-1], dpi=110)
            plt.close(fig)
    return files
