"""Merge per-fold predictions: OOF concatenated (every pool ID once), eval / test averaged over folds."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.console import console, print_table
from ..core.errors import WBCError
from ..core.io import Probs, load_probs, read_json_or_none, save_probs, write_json
from ..core.metrics import save_confusion_png, summary
from ..core.run_folder import DATASET, fold_dirs, fold_index, outputs_together


def _load_folds(files: list[Path], ref=None, need=()) -> list[Probs]:
    """Each fold file, refused unless its class columns are those of `ref` (classes, file; default the first
    file's) in the same order: a fold's columns are matched by position when merged."""
    parts = [load_probs(f, need) for f in files]
    classes, ref_file = ref or (parts[0].classes, files[0])
    for p, f in zip(parts, files):
        if p.classes != classes:
            raise WBCError(f"{f}: classes {','.join(p.classes)} differ from {ref_file}'s {','.join(classes)} "
                           "(folds disagree on classes)")
    return parts


def mean_probs(parts: list[Probs], files: list[Path]) -> Probs:
    ref = parts[0]
    for p, f in zip(parts[1:], files[1:]):
        if set(p.ids) != set(ref.ids):
            raise WBCError(f"{f}: IDs differ from those of {files[0]} (folds disagree on IDs)")
    aligned = [p.align(ref.ids) for p in parts]
    return Probs(ref.ids, np.mean([p.probs for p in aligned], 0), ref.classes, labels=ref.labels)


def _dataset(run: Path) -> str:
    """' on <dataset>' from the run folder's record (run_folder.claim), or ''."""
    rec = read_json_or_none(run / DATASET) or {}
    return f" on {rec['dataset']}" if "dataset" in rec else ""


def merge_run(run: Path, expected_ids=None) -> dict:
    """Write run/{oof,eval,test}.csv and run/report.json from run/fold*/; return the report.
    Every file is read and checked before the first is written, so a refusal leaves the previous merge whole."""
    dirs = fold_dirs(run)
    if not dirs:
        raise WBCError(f"{run}: no fold*/ folders (train a fold first)")
    oof_files = [d / "oof.csv" for d in dirs if (d / "oof.csv").exists()]
    if not oof_files:
        raise WBCError(f"{run}: no fold has oof.csv yet")
    oofs = _load_folds(oof_files, need=("fold", "labels"))
    for o, f in zip(oofs, oof_files):  # a row of another fold would be scored as this one's, or twice
        wrong = np.flatnonzero(o.folds != fold_index(f.parent))
        if len(wrong):
            raise WBCError(f"{f}:{wrong[0] + 2}: fold {o.folds[wrong[0]]}, not {fold_index(f.parent)} (the folder's)")
    classes = oofs[0].classes
    oof = Probs(np.concatenate([o.ids for o in oofs]), np.concatenate([o.probs for o in oofs]), classes,
                np.concatenate([o.folds for o in oofs]), np.concatenate([o.labels for o in oofs]))
    if len(set(oof.ids)) != len(oof.ids):
        raise WBCError(f"{run}: an ID appears in the OOF of two folds (folds file changed between runs?)")
    merged = {}
    for split in ("eval", "test"):
        files = [d / f"{split}.csv" for d in dirs if (d / f"{split}.csv").exists()]
        if files:
            merged[split] = mean_probs(_load_folds(files, (classes, oof_files[0])), files)
    report = {"run": run.name, "folds": sorted(set(oof.folds.tolist())), "n_oof": len(oof.ids)}
    if expected_ids is not None:
        missing = sorted(set(expected_ids) - set(oof.ids))
        report["oof_complete"] = not missing
        if missing:
            console.print(f"[yellow]OOF covers {len(oof.ids)}/{len(set(expected_ids))} pool images "
                          f"(folds {report['folds']} done)[/]")
    with outputs_together(run, ("oof.csv", "eval.csv", "test.csv", "report.json", "confusion_*.png")):
        save_probs(run / "oof.csv", oof)
        # Scores count the images labelled with one of the run's classes (all of them, except in a specialist).
        known = oof.label_index() >= 0
        y, pred, folds = oof.label_index()[known], oof.probs[known].argmax(1), oof.folds[known]
        report["oof"] = summary(y, pred, classes)
        report["oof_per_fold_macro_f1"] = {int(k): summary(y[folds == k], pred[folds == k], classes)["macro_f1"]
                                           for k in report["folds"]}
        on = _dataset(run)
        save_confusion_png(run / "confusion_oof.png", y, pred, classes,
                           f"{run.name}{on} OOF, folds {report['folds']}: macro-F1 {report['oof']['macro_f1']:.4f}")
        for split, m in merged.items():
            save_probs(run / f"{split}.csv", m)
            if split == "eval" and (m.label_index() >= 0).any():  # unlabelled: no score, not a score of 0
                ye = m.label_index()
                ye, pe = ye[ye >= 0], m.probs[ye >= 0].argmax(1)
                report["eval"] = summary(ye, pe, classes)
                save_confusion_png(run / "confusion_eval.png", ye, pe, classes,
                                   f"{run.name}{on} eval, mean of folds {report['folds']}: macro-F1 "
                                   f"{report['eval']['macro_f1']:.4f}")
        write_json(run / "report.json", report)
    o = report["oof"]
    cols = ["class", "OOF F1", "OOF true / predicted"] + (["eval F1"] if "eval" in report else [])
    rows = [[c, o["per_class_f1"][c], f"{o['support'][c]} / {o['predicted'][c]}"]
            + ([report["eval"]["per_class_f1"][c]] if "eval" in report else []) for c in classes]
    rows.append(["macro-F1", o["macro_f1"], f"{o['n']}"] + ([report["eval"]["macro_f1"]] if "eval" in report else []))
    print_table(f"{run.name}: folds {report['folds']}", cols, rows)
    return report
