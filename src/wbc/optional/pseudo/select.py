"""Pick confident predictions on unlabelled splits and write them as a pseudo-label file.

The file (`ID,labels,split,confidence`) is read by training through `data.pseudo_labels`: every fold trains on its
pool rows plus these rows (never validates on them). Labels are the predictions folder's decisions (its tuned rule's
`<part>_pred.csv` when present, else the argmax), never a split's own labels.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ...core.config import display_path, resolve_path
from ...core.console import console, table
from ...core.errors import WBCError
from ...core.io import load_probs, read_csv, require_columns, write_csv, write_json
from ...core.run_folder import require_complete
from ...s1_data.layout import data_root, read_split

PSEUDO_COLUMNS = ["ID", "labels", "split", "confidence"]


def select(ids, classes: list[str], probs: np.ndarray, decided: np.ndarray, min_confidence: float,
           class_fraction: float) -> pd.DataFrame:
    """Rows whose decided class has probability >= min_confidence; of each decided class at most
    ceil(class_fraction x its predicted count), most confident first (so a common class cannot crowd out the rest
    when the fraction is below 1)."""
    if not 0.0 <= min_confidence <= 1.0:
        raise WBCError(f"pseudo min_confidence must be in [0, 1], got {min_confidence}")
    if not 0.0 < class_fraction <= 1.0:
        raise WBCError(f"pseudo class_fraction must be in (0, 1], got {class_fraction}")
    lut = {c: i for i, c in enumerate(classes)}
    unknown = [d for d in decided if d not in lut]
    if unknown:
        raise WBCError(f"decided label '{unknown[0]}' is not a class ({', '.join(classes)})")
    k = np.array([lut[d] for d in decided], dtype=int)
    conf = probs[np.arange(len(k)), k]
    keep = np.zeros(len(k), bool)
    for c in np.unique(k):
        idx = np.flatnonzero(k == c)
        cap = math.ceil(class_fraction * len(idx))
        idx = idx[np.argsort(-conf[idx], kind="stable")][:cap]
        keep[idx[conf[idx] >= min_confidence]] = True
    return pd.DataFrame({"ID": np.asarray(ids)[keep], "labels": np.asarray(decided)[keep],
                         "confidence": conf[keep]})


def _decisions(pred_dir: Path, part: str):
    """(Probs, decided labels) of one predictions part (`test` / `eval`) of a run, ensemble or refine folder."""
    probs = load_probs(pred_dir / f"{part}.csv")
    decided_file = pred_dir / f"{part}_pred.csv"
    if decided_file.exists():
        df = read_csv(decided_file, "decisions file", dtype=str, keep_default_na=False)
        require_columns(df, decided_file, ("ID", "labels"))
        df = df.set_index("ID")
        missing = [i for i in probs.ids if i not in df.index]
        if missing:
            raise WBCError(f"{decided_file}: ID {missing[0]} of {part}.csv has no decision")
        return probs, df.loc[probs.ids, "labels"].to_numpy(), f"{decided_file.name} (tuned decision rule)"
    return probs, np.asarray(probs.classes)[probs.probs.argmax(1)], f"argmax of {part}.csv"


def pseudo_label(cfg: dict, pred_dir, splits: list[str] | None = None, min_confidence: float = 0.7,
                 class_fraction: float = 1.0, out: str | None = None) -> Path:
    """Write <output_dir>/pseudo/<pred folder>.csv (+ .json report) from PRED's predictions on `splits`."""
    pred_dir = resolve_path(pred_dir)
    if not pred_dir.is_dir():
        raise WBCError(f"{pred_dir}: predictions folder not found")
    require_complete(pred_dir, "make ensemble / make predict")  # a killed step's half-written decisions
    d = cfg["data"]
    root = data_root(cfg)
    splits = splits or [d["test_split"]]
    holdout = [s for s in d.get("holdout_splits") or [] if s not in d["train_splits"]]
    frames, report = [], {"predictions": display_path(pred_dir), "min_confidence": min_confidence,
                          "class_fraction": class_fraction, "splits": {}}
    classes = None
    for split in splits:
        if split in d["train_splits"]:
            raise WBCError(f"split {split} is in data.train_splits: it is labelled training data, not pseudo-labelled")
        part = "test" if split == d["test_split"] else "eval" if split in holdout else None
        if part is None:
            raise WBCError(f"split {split} is neither data.test_split nor one of data.holdout_splits {holdout}")
        probs, decided, source = _decisions(pred_dir, part)
        classes = probs.classes
        ids = read_split(root, split, check_images=False)["ID"].to_numpy()
        pos = pd.Series(np.arange(len(probs.ids)), index=probs.ids)
        missing = [i for i in ids if i not in pos.index]
        if missing:
            raise WBCError(f"{pred_dir / (part + '.csv')}: {len(missing)} IDs of {split} missing, e.g. {missing[0]}")
        take = pos.loc[ids].to_numpy()
        sel = select(ids, classes, probs.probs[take], decided[take], min_confidence, class_fraction)
        sel.insert(2, "split", split)
        frames.append(sel)
        rep = {"source": source, "images": len(ids), "selected": len(sel),
               "per_class": {c: int((sel["labels"] == c).sum()) for c in classes}}
        truth = probs.labels[take] if probs.labels is not None else None
        if truth is not None and (truth != "").all():  # diagnostic only: selection never sees these labels
            t = pd.Series(truth, index=ids).loc[sel["ID"]].to_numpy()
            rep["precision"] = float((t == sel["labels"].to_numpy()).mean()) if len(sel) else None
            rep["precision_per_class"] = {c: float((t[sel["labels"].to_numpy() == c] == c).mean())
                                          for c in classes if (sel["labels"] == c).any()}
        report["splits"][split] = rep
    df = pd.concat(frames, ignore_index=True)[PSEUDO_COLUMNS]
    path = resolve_path(out) if out else resolve_path(cfg["output_dir"]) / "pseudo" / f"{pred_dir.name}.csv"
    write_csv(path, df)
    report["file"] = display_path(path)
    report["rows"] = len(df)
    write_json(path.with_suffix(".json"), report)
    rows = []
    for c in classes:
        row = [c]
        for split in splits:
            rep = report["splits"][split]
            n = rep["per_class"][c]
            prec = rep.get("precision_per_class", {}).get(c)
            row.append(f"{n}" + (f" ({prec:.2f})" if prec is not None else ""))
        rows.append(row)
    console.print(table(f"pseudo-labels per decided class (precision where the split is labelled) -> "
                        f"{display_path(path)}", ["class", *splits], rows))
    for split in splits:
        rep = report["splits"][split]
        console.print(f"{split}: {rep['selected']} of {rep['images']} images kept"
                      + (f", precision {rep['precision']:.3f}" if rep.get("precision") is not None else ""),
                      highlight=False)
    return path
