"""`make curves RUN=outputs/<run>`: each fold's training curves (losses, validation macro-F1, learning rate) from its
metrics.jsonl, one picture per run (`<run>/curves.png`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.config import display_path, resolve_path
from ..core.console import console
from ..core.errors import WBCError
from ..core.io import atomic_path
from ..core.run_folder import fold_dirs, fold_index, read_metrics


def draw_curves(run) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = resolve_path(run)
    folds = {fold_index(d): read_metrics(d) for d in fold_dirs(run)}
    folds = {k: v for k, v in folds.items() if v}
    if not folds:
        raise WBCError(f"{run}: no fold has logged an epoch yet (fold*/metrics.jsonl)")
    record = run / "dataset.json"
    dataset = json.loads(record.read_text()).get("dataset") if record.exists() else None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    for k, hist in sorted(folds.items()):
        ep = [r["epoch"] for r in hist]
        line = axes[0].plot(ep, [r["train_loss"] for r in hist], label=f"fold {k} train")[0]
        axes[0].plot(ep, [r["val_loss"] for r in hist], "--", color=line.get_color(), label=f"fold {k} val")
        axes[1].plot(ep, [r["val_macro_f1"] for r in hist], color=line.get_color(), label=f"fold {k}")
        axes[2].plot(ep, [r["lr"] for r in hist], color=line.get_color(), label=f"fold {k}")
        s2 = [r["epoch"] for r in hist if r.get("stage") == 2]
        if s2:
            for ax in axes:
                ax.axvline(s2[0] - 0.5, color="grey", lw=0.5)
    for ax, title in zip(axes, ("loss (solid: train, dashed: validation)", "validation macro-F1", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[2].set_yscale("log")
    fig.suptitle(f"{run.name}" + (f" on {dataset}" if dataset else "") + f": folds {', '.join(map(str, folds))}")
    out = run / "curves.png"
    try:
        fig.tight_layout()
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    console.print(f"wrote {display_path(out)}")
    return out


def register(sub) -> None:
    p = sub.add_parser("curves", help="each fold's training curves of a run as one PNG (<run>/curves.png)")
    p.add_argument("--run", required=True, help="outputs/<name>")
    p.set_defaults(func=lambda args: draw_curves(args.run))
