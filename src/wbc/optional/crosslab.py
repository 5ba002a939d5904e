"""`make crosslab`: a trained run's (or an ensemble's) models on another laboratory's labelled cells.

Another lab means another stain, microscope and camera: a model that learnt one lab's colours can collapse onto a few
classes there. This scores any labelled image folder (`ID,labels` CSV, IDs as paths under the folder) with a label
map from the models' fine classes to the folder's labels (`coarse`: the five-part differential, band and segmented
neutrophils as NEU, any other predicted class wrong; `none`; or a YAML mapping), and reports per-class precision /
recall / F1, macro-F1 over the folder's classes, and the predicted-class histogram next to the true one, so that a
collapse onto one class is visible at a glance. An ensemble folder (`outputs/ensemble/<name>`) is applied as it was
fitted: its members' fold models (seed groups averaged), its blend weights and space, its tuned rule when it submitted
one. Test-time BatchNorm adaptation to these images: `--adapt-bn` (docs/crosslab.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..core.config import display_path, load_config, resolve_path
from ..core.console import console, print_table
from ..core.errors import WBCError, where
from ..core.io import read_csv, require_columns, write_csv, write_json
from ..core.metrics import save_confusion_png
from ..core.run_folder import fold_dirs, require_complete
from ..s4_predict.classify import classify, list_images
from ..s5_ensemble.blend import combine
from ..s5_ensemble.decision import apply_rule, load_rule

# The five-part differential of a blood count: every other fine class is a wrong answer in a 5-class lab.
COARSE = {"SNE": "NEU", "BNE": "NEU", "LY": "LY", "MO": "MO", "EO": "EO", "BA": "BA"}
OTHER = "other"  # a predicted class the map has no label for
COLLAPSE_SHARE = 0.25  # a class predicted for more than this share of the images ...
COLLAPSE_RATIO = 2.0  # ... and more than this many times as often as it occurs is flagged


def label_map(spec: str) -> dict | None:
    """`coarse`, `none` (the fine classes as they are) or a YAML file {fine class: label}."""
    if spec == "coarse":
        return dict(COARSE)
    if spec == "none":
        return None
    path = resolve_path(spec)
    if not path.is_file():
        raise WBCError(f"--map: {spec} is not coarse, none or a YAML file")
    m = yaml.safe_load(path.read_text())
    if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        raise WBCError(f"{path}: a label map is a mapping of class codes to labels")
    return m


def read_labels(path, ids) -> pd.Series:
    """The folder's labels, one per image found (by ID); a row naming no image, or an image without a row, is
    refused naming the row."""
    path = resolve_path(path)
    df = read_csv(path, "label file", dtype=str, keep_default_na=False)
    require_columns(df, path, ("ID", "labels"))
    df["ID"], df["labels"] = df["ID"].str.strip(), df["labels"].str.strip()
    for k, (i, lab) in enumerate(zip(df["ID"], df["labels"])):
        if not lab:
            raise WBCError(f"{where(path, k + 2)}: empty label")
    dup = df["ID"].duplicated()
    if dup.any():
        raise WBCError(f"{where(path, int(np.flatnonzero(dup)[0]) + 2)}: duplicate ID")
    known = set(ids)
    missing = ~df["ID"].isin(known)
    if missing.any():
        k = int(np.flatnonzero(missing)[0])
        raise WBCError(f"{where(path, k + 2)}: no image {df['ID'].iloc[k]} in the folder")
    unlabelled = sorted(known - set(df["ID"]))
    if unlabelled:
        raise WBCError(f"{path}: {len(unlabelled)} images without a row, e.g. {unlabelled[0]}")
    return df.set_index("ID")["labels"]


def _run_cfg(run: Path, overrides: list[str]) -> dict:
    """The run's own resolved config, pointed back at its folder (its name and output_dir), with overrides."""
    saved = run / "config.yaml"
    if not saved.exists():
        raise WBCError(f"{run}: not a run folder (no config.yaml)")
    return load_config(saved, [f"name={run.name}", f"output_dir={run.parent}", *overrides])


def run_probs(run: Path, images, out_dir: Path, overrides: list[str]) -> tuple[list[str], pd.DataFrame]:
    """A run's fold models averaged on the images: (classes, ID-indexed probabilities)."""
    if not fold_dirs(run) and not (run / "config.yaml").exists():
        raise WBCError(f"{run}: not a run folder")
    cfg = _run_cfg(run, overrides)
    res = classify(cfg, images, out_dir / f"{run.name}.csv")
    classes = [c.removeprefix("prob_") for c in res.columns if c.startswith("prob_")]
    return classes, res.set_index("ID")[[f"prob_{c}" for c in classes]]


def ensemble_probs(ens: Path, images, out_dir: Path, overrides: list[str]):
    """(classes, ID-indexed probabilities, the ensemble's decisions as class indices)."""
    require_complete(ens, "make ensemble")
    report = json.loads((ens / "report.json").read_text())
    decision = json.loads((ens / "decision.json").read_text())
    if any(s.get("kept") for s in decision.get("specialists") or []):
        raise WBCError(f"{ens}: an ensemble with specialists is not supported here yet; score its members")
    space = decision["blend"]["space"]
    classes, parts, weights = None, [], []
    for m in report["members"]:
        runs = m["path"] if isinstance(m["path"], list) else [m["path"]]
        probs = []
        for r in runs:
            c, p = run_probs(resolve_path(r), images, out_dir, overrides)
            if classes is not None and c != classes:
                raise WBCError(f"{r}: classes {c} differ from the other members' {classes}")
            classes = c
            probs.append(p)
        ids = probs[0].index
        parts.append(combine([p.loc[ids].to_numpy() for p in probs], np.full(len(probs), 1 / len(probs)), space))
        weights.append(float(m["weight"]))
    blended = combine(parts, np.asarray(weights), space)
    if report["final_step"] == "blend":
        decided = blended.argmax(1)
    else:
        decided = apply_rule(blended, load_rule(ens / "decision.json"))
    return classes, pd.DataFrame(blended, index=ids, columns=[f"prob_{c}" for c in classes]), decided


def crosslab(target, images, labels, spec: str = "coarse", overrides=(), out=None) -> dict:
    """Score `target` (a run or ensemble folder) on the labelled `images` folder; writes predictions, report.json
    and a confusion PNG to `out` (default outputs/crosslab/<target>_<folder>)."""
    target, images = resolve_path(target), resolve_path(images)
    if not target.is_dir():
        raise WBCError(f"{target}: no such run or ensemble folder")
    found = list_images([images])
    truth = read_labels(labels, found["ID"])
    mapping = label_map(spec)
    out = resolve_path(out) if out else resolve_path("outputs") / "crosslab" / f"{target.name}_{images.name}"
    out.mkdir(parents=True, exist_ok=True)
    if (target / "decision.json").exists():
        classes, probs, decided = ensemble_probs(target, [images], out, list(overrides))
    else:
        classes, probs = run_probs(target, [images], out, list(overrides))
        decided = probs.to_numpy().argmax(1)
    fine = np.asarray(classes)[decided]
    mapped = fine if mapping is None else np.array([mapping.get(c, OTHER) for c in fine])
    true = truth.loc[probs.index].to_numpy()
    labels_ = sorted(set(true))
    reachable = set(mapping.values()) if mapping else set(classes)
    unknown = sorted(set(labels_) - reachable)
    if unknown:  # no prediction could ever be right for them: a wrong map, or another label set
        raise WBCError(f"{labels}: label(s) {', '.join(unknown)} are none the map ({spec}) can predict "
                       f"({', '.join(sorted(reachable))})")
    report = score(true, mapped, labels_)
    report.update({"target": display_path(target), "images": display_path(images), "map": spec, "n": len(true),
                   "overrides": list(overrides), "fine_predicted": dict(pd.Series(fine).value_counts().sort_index()
                                                                        .astype(int))})
    cols = labels_ + ([OTHER] if (mapped == OTHER).any() else [])
    index = {c: i for i, c in enumerate(cols)}
    save_confusion_png(out / "confusion.png", [index[t] for t in true], [index[p] for p in mapped], cols,
                       f"{target.name} on {images.name} ({spec} labels): macro-F1 {report['macro_f1']:.3f}")
    write_csv(out / "predictions.csv", pd.DataFrame({"ID": probs.index, "labels": true, "predicted": mapped,
                                                     "predicted_fine": fine}))
    write_json(out / "report.json", report)
    print_report(report, labels_)
    console.print(f"wrote {display_path(out)}")
    return report


def score(true: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict:
    """Macro-F1 over the folder's labels (a prediction outside them is wrong for its true class), per-class
    precision / recall / F1, both histograms, and the classes the predictions collapsed onto."""
    per = {}
    for c in labels:
        tp = int(((pred == c) & (true == c)).sum())
        n_pred, n_true = int((pred == c).sum()), int((true == c).sum())
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_true if n_true else 0.0
        per[c] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "true": n_true,
                  "predicted": n_pred}
    n = len(true)
    hist = dict(pd.Series(pred).value_counts().astype(int))
    collapsed = sorted(c for c, k in hist.items()
                       if k > COLLAPSE_SHARE * n and k > COLLAPSE_RATIO * max(int((true == c).sum()), 1))
    return {"macro_f1": float(np.mean([v["f1"] for v in per.values()])), "accuracy": float((true == pred).mean()),
            "per_class": per, "predicted": {str(k): int(v) for k, v in hist.items()}, "collapsed_onto": collapsed}


def print_report(report: dict, labels: list[str]) -> None:
    n = report["n"]
    rows = [[c, v["true"], v["predicted"], v["precision"], v["recall"], v["f1"]]
            for c, v in report["per_class"].items()]
    other = {k: v for k, v in report["predicted"].items() if k not in labels}
    rows += [[f"({k})", 0, v, "", "", ""] for k, v in other.items()]
    rows.append(["macro-F1", n, n, "", "", report["macro_f1"]])
    print_table(f"{report['target']} on {report['images']} ({report['map']} labels; accuracy {report['accuracy']:.3f})",
                ["class", "true", "predicted", "precision", "recall", "F1"], rows)
    for c in report["collapsed_onto"]:
        console.print(f"[yellow]collapse:[/] {c} predicted for {report['predicted'][c]} of {n} images "
                      f"({report['per_class'].get(c, {}).get('true', 0)} are)")


def register(sub) -> None:
    p = sub.add_parser("crosslab", help="a run's or an ensemble's models on another lab's labelled cells: per-class "
                                        "F1, predicted-class histogram, confusion PNG")
    p.add_argument("--run", required=True, help="outputs/<run> or outputs/ensemble/<name>")
    p.add_argument("--images", required=True, help="the image folder (IDs are paths under it)")
    p.add_argument("--labels", required=True, help="CSV with ID,labels")
    p.add_argument("--map", default="coarse", help="coarse (five-part differential) | none | a YAML class map")
    p.add_argument("--adapt-bn", type=float, default=None,
                   help="test-time BatchNorm adaptation to these images (predict.adapt_bn; 0-1)")
    p.add_argument("--out", default=None, help="output folder (default outputs/crosslab/<run>_<images>)")
    p.add_argument("overrides", nargs="*", help="key=value over each run's config (predict.color_tta=4, "
                                                "predict.adapt_bn_guard=none, ...)")

    def run(args):
        over = ([] if args.adapt_bn is None else [f"predict.adapt_bn={args.adapt_bn}"]) + list(args.overrides)
        crosslab(args.run, args.images, args.labels, args.map, over, args.out)

    p.set_defaults(func=run)
