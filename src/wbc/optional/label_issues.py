"""`label-issues`: training images whose given label the out-of-fold predictions doubt (confident learning).

For each class j, t_j is the mean OOF probability of j over the images labelled j: how sure the models usually are
of that class. An image labelled i counts for class j when p_j >= t_j (for the most probable such j when several
qualify); these counts form the confident joint C[i, j] (Northcutt, Jiang & Chuang, JAIR 2021). The images off its
diagonal doubt their label: models that never trained on them give another class at least that class's usual
confidence, and their own class less. Per-class thresholds matter on a long tail: a rare class the models are
unsure of everywhere is not flagged for low confidence alone, as an argmax test would flag it. But a hard class
has a low threshold (BNE's was 0.25 on pbcbench), so many images of its neighbour reach it while still preferring
their own label; by default (`min_margin` 0) only the suspects the models also prefer to the given label are listed.

A list to review by eye (the QA sheet), not a verdict: a damaged image or a truly ambiguous cell lands here too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.config import display_path, resolve_path
from ..core.console import console, print_table
from ..core.errors import WBCError
from ..core.grid import caption, fit, in_rows, save_sheet
from ..core.io import load_probs, write_csv, write_json
from ..core.run_folder import require_complete
from ..s1_data.cache import read_image

TILE = 150  # QA sheet tile size in px


def confident_joint(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, suspected, thresholds): the K x K confident joint, each image's confident class (-1 when no class
    reaches its threshold) and the per-class thresholds t_j (NaN for a class without images)."""
    n_cls = probs.shape[1]
    counts = np.bincount(y, minlength=n_cls)
    sums = np.zeros(n_cls)
    np.add.at(sums, y, probs[np.arange(len(y)), y])
    t = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    above = probs >= np.where(np.isnan(t), np.inf, t)[None, :]
    masked = np.where(above, probs, -np.inf)
    suspected = np.where(above.any(1), masked.argmax(1), -1)
    c = np.zeros((n_cls, n_cls), dtype=int)
    ok = suspected >= 0
    np.add.at(c, (y[ok], suspected[ok]), 1)
    return c, suspected, t


def find_issues(ids, probs: np.ndarray, labels, classes: list[str], folds=None,
                min_margin: float = 0.0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The suspects with p_suspected - p_given > `min_margin` (-1: every off-diagonal image of the confident joint),
    most doubtful first, with the confident joint and the thresholds."""
    lut = {c: i for i, c in enumerate(classes)}
    y = np.array([lut.get(v, -1) for v in labels])
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        raise WBCError(f"ID {ids[i]}: label '{labels[i]}' is not one of the classes ({', '.join(classes)})")
    c, sus, t = confident_joint(probs, y)
    flag = (sus >= 0) & (sus != y)
    flag[flag] = probs[flag, sus[flag]] - probs[flag, y[flag]] > min_margin
    idx = np.flatnonzero(flag)
    p_given, p_sus = probs[idx, y[idx]], probs[idx, sus[idx]]
    df = pd.DataFrame({"ID": np.asarray(ids)[idx], "given": np.asarray(classes)[y[idx]],
                       "suspected": np.asarray(classes)[sus[idx]], "p_given": p_given, "p_suspected": p_sus,
                       "margin": p_sus - p_given})
    if folds is not None:
        df.insert(1, "fold", np.asarray(folds)[idx])
    return df.sort_values("margin", ascending=False, kind="stable").reset_index(drop=True), c, t


def _sheet(issues: pd.DataFrame, paths: dict, path: Path, cols: int = 8) -> None:
    """The suspects as a grid of captioned tiles, most doubtful first."""
    tiles = [caption(fit(read_image(paths[r["ID"]]), TILE),
                     [str(r["ID"])[:22], f"given {r['given']} -> {r['suspected']}",
                      f"p {r['p_given']:.2f} -> {r['p_suspected']:.2f}"]) for _, r in issues.iterrows()]
    save_sheet(path, in_rows(tiles, cols), width=cols)


def label_issues(cfg: dict, pred_dir, top: int = 48, out=None, min_margin: float = 0.0) -> dict:
    """Suspects in `pred_dir`'s oof.csv (a run or an ensemble): issues.csv, confident_joint.csv, report.json and a
    QA sheet of the `top` most doubtful images in `out` (default <output_dir>/label_issues/<pred folder name>)."""
    from ..s1_data.layout import data_root, read_splits

    pred_dir = resolve_path(pred_dir)
    require_complete(pred_dir, "make ensemble / make predict")
    oof = load_probs(pred_dir / "oof.csv")
    if oof.labels is None or (oof.labels == "").any():
        raise WBCError(f"{pred_dir / 'oof.csv'}: every row needs its label (an out-of-fold file of the CV pool)")
    issues, c, t = find_issues(oof.ids, oof.probs, oof.labels, oof.classes, oof.folds, min_margin)
    out = resolve_path(out) if out else resolve_path(cfg.get("output_dir") or "outputs") / "label_issues" / \
        pred_dir.name
    write_csv(out / "issues.csv", issues)
    write_csv(out / "confident_joint.csv",
              pd.DataFrame(c, index=pd.Index(oof.classes, name="given"), columns=oof.classes).reset_index())
    n_given = [int((oof.labels == k).sum()) for k in oof.classes]
    flagged = issues["given"].value_counts()
    per_class = {k: {"images": int(n_given[i]), "off_diagonal": int(c[i].sum() - c[i, i]),
                     "flagged": int(flagged.get(k, 0)),
                     "threshold": None if np.isnan(t[i]) else float(t[i])} for i, k in enumerate(oof.classes)}
    pairs = sorted(((int(c[i, j]), oof.classes[i], oof.classes[j]) for i in range(len(c)) for j in range(len(c))
                    if i != j and c[i, j]), reverse=True)
    report = {"predictions": display_path(pred_dir / "oof.csv"), "n": len(oof.ids), "flagged": len(issues),
              "min_margin": min_margin, "off_diagonal": int(c.sum() - np.trace(c)),
              "per_class": per_class, "pairs": [{"given": g, "suspected": s, "n": n} for n, g, s in pairs]}
    if top and len(issues):
        pool = read_splits(data_root(cfg), cfg["data"]["train_splits"], check_images=False)
        paths = dict(zip(pool["ID"], pool["path"]))
        missing = [i for i in issues["ID"].head(top) if i not in paths]
        if missing:
            raise WBCError(f"{pred_dir / 'oof.csv'}: ID {missing[0]} is not in the data's training splits "
                           f"({', '.join(cfg['data']['train_splits'])})")
        _sheet(issues.head(top), paths, out / "sheet.png")
        report["sheet"] = display_path(out / "sheet.png")
    write_json(out / "report.json", report)
    print_table(f"label issues in {display_path(pred_dir / 'oof.csv')}: {len(issues)} of {len(oof.ids)} images",
                ["given class", "images", "confident joint: off-diagonal", f"flagged (margin > {min_margin:g})",
                 "threshold t"],
                [[k, v["images"], v["off_diagonal"], v["flagged"], "" if v["threshold"] is None else v["threshold"]]
                 for k, v in per_class.items()])
    if pairs:
        print_table("most frequent given -> suspected pairs of the confident joint", ["given", "suspected", "images"],
                    [[g, s, n] for n, g, s in pairs[:10]])
    console.print(f"wrote {display_path(out)}/ (issues.csv, confident_joint.csv, report.json"
                  f"{', sheet.png' if 'sheet' in report else ''})")
    return report


def register(sub) -> None:
    from ..core.cli import add_config_args, config_from_args

    p = add_config_args(sub.add_parser("label-issues", help="training images whose label the OOF predictions doubt "
                                                            "(confident learning) + QA sheet"))
    p.add_argument("--pred", required=True, help="a run or ensemble folder with oof.csv")
    p.add_argument("--top", type=int, default=48, help="images on the QA sheet (0: none)")
    p.add_argument("--out", default=None, help="default: <output_dir>/label_issues/<pred folder name>")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="list suspects with p_suspected - p_given above this (-1: the whole confident joint)")
    p.set_defaults(func=lambda args: label_issues(config_from_args(args), args.pred, args.top, args.out,
                                                  args.min_margin))
