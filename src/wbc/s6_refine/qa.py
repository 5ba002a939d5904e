"""Quality checks of the morphology step: a QA sheet (contours drawn on a grid of images per class) and a
per-feature class-separation table (ANOVA F, Fisher ratio, per-class means)."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from ..core.grid import blank, caption, fit, save_sheet
from .morphology import FEATURES, Segmentation, SegParams, read_rgb, segment

CELL_COLOUR = (40, 220, 40)     # RGB
NUC_COLOUR = (255, 210, 0)
FAIL_COLOUR = (230, 30, 30)


def draw_tile(rgb, seg, size: int, text: str) -> np.ndarray:
    """One image with the cell (green) and nucleus (yellow) contours; a red frame and reason on failure."""
    tile = fit(rgb, size) if rgb is not None else np.full((size, size, 3), 40, np.uint8)
    for mask, colour in ((seg.cell, CELL_COLOUR), (seg.nucleus, NUC_COLOUR)):
        if mask is None:
            continue
        m = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, cs, -1, colour, 1, cv2.LINE_AA)
    if seg.error:
        cv2.rectangle(tile, (0, 0), (size - 1, size - 1), FAIL_COLOUR, 3)
    return caption(tile, [text] + ([seg.error[:24]] if seg.error else []), at="bottom")


def pick_samples(df: pd.DataFrame, per_class: int, seed: int = 0) -> list[tuple[str, pd.DataFrame]]:
    """Rows per class, half from the clean split (phase1) and half from the damaged ones where possible,
    plus a row of segmentation failures when there are any."""
    rng = np.random.default_rng(seed)
    out = []
    lab = df[df["labels"] != ""]
    for c in sorted(lab["labels"].unique()):
        sub = lab[lab["labels"] == c]
        clean, damaged = sub[sub["split"] == "phase1"], sub[sub["split"] != "phase1"]
        n_clean = min(len(clean), per_class // 2)
        n_dam = min(len(damaged), per_class - n_clean)
        n_clean = min(len(clean), per_class - n_dam)
        take = [clean.iloc[rng.choice(len(clean), n_clean, replace=False)] if n_clean else clean.iloc[:0],
                damaged.iloc[rng.choice(len(damaged), n_dam, replace=False)] if n_dam else damaged.iloc[:0]]
        out.append((c, pd.concat(take)))
    if "seg_ok" in df.columns:
        fails = df[~df["seg_ok"].astype(bool)]
        if len(fails):
            out.append(("failed", fails.iloc[rng.choice(len(fails), min(per_class, len(fails)), replace=False)]))
    return out


def qa_sheet(df: pd.DataFrame, path, per_class: int = 8, size: int = 160, params: SegParams = SegParams(),
             seed: int = 0) -> None:
    """PNG grid: one row per class (label on the left), `per_class` images with contours drawn.
    `df` needs ID, labels, split, path (and optionally seg_ok for a row of failures)."""
    rows, names = [], []
    for name, sub in pick_samples(df, per_class, seed):
        tiles = []
        for _, r in sub.iterrows():
            rgb = read_rgb(r["path"])
            seg = segment(rgb, params) if rgb is not None else Segmentation(error="unreadable image")
            tag = "clean" if r["split"] == "phase1" else r["split"].replace("phase2_", "p2 ")
            tiles.append(draw_tile(rgb, seg, size, f"{tag} {r['labels'] or ''}".strip()))
        rows.append(tiles + [blank(size)] * (per_class - len(tiles)))
        names.append(name)
    save_sheet(path, rows, names)


def separation_table(feats: pd.DataFrame, labels, classes: list[str], columns=FEATURES) -> dict:
    """Per feature: ANOVA F, Fisher ratio (between-class / within-class variance, classes weighted
    equally so the long tail counts), and per-class mean / std. Rows with NaN in a feature are skipped."""
    labels = np.asarray(labels)
    out = {}
    for col in columns:
        x = pd.to_numeric(feats[col], errors="coerce").to_numpy(float)
        groups = [x[(labels == c) & np.isfinite(x)] for c in classes]
        groups = [(c, g) for c, g in zip(classes, groups) if len(g) >= 2]
        if len(groups) < 2:
            continue
        means = np.array([g.mean() for _, g in groups])
        vars_ = np.array([g.var(ddof=1) for _, g in groups])
        within = vars_.mean()
        fisher = float(means.var() / within) if within > 0 else float("inf")
        allx = np.concatenate([g for _, g in groups])
        ns = np.array([len(g) for _, g in groups])
        ssb = float((ns * (means - allx.mean()) ** 2).sum())
        ssw = float(((ns - 1) * vars_).sum())
        k, n = len(groups), len(allx)
        anova = float((ssb / (k - 1)) / (ssw / (n - k))) if ssw > 0 else float("inf")
        top = int(np.argmax(np.abs(means - np.median(means)) / np.sqrt(within + 1e-12)))
        out[col] = {"anova_f": anova, "fisher_ratio": fisher, "most_distinct_class": groups[top][0],
                    "class_mean": {c: float(g.mean()) for c, g in groups},
                    "class_std": {c: float(g.std(ddof=1)) for c, g in groups}}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["fisher_ratio"]))
