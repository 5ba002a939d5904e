"""Read and validate a dataset in the WBCBench 2026 layout.

    <root>/phase1/            phase1_label.csv   ID,labels,split
    <root>/phase2/train/      phase2_train.csv   ID,labels,split
    <root>/phase2/eval/       phase2_eval.csv    ID,labels,split
    <root>/phase2/test/       phase2_test.csv    ID,labels[,split]   (labels empty)

Optional columns (patient, patient_hash, original_image_id, severity) are kept when present.
Every problem is raised as a one-line WBCError naming the file and row.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.config import dataset_name, resolve_path
from ..core.errors import WBCError, where
from ..core.io import read_csv, require_columns

# split name -> (csv file, image folder)
SPLITS = {
    "phase1": ("phase1_label.csv", "phase1"),
    "phase2_train": ("phase2_train.csv", "phase2/train"),
    "phase2_eval": ("phase2_eval.csv", "phase2/eval"),
    "phase2_test": ("phase2_test.csv", "phase2/test"),
}
LABELLED = ("phase1", "phase2_train", "phase2_eval")
GROUP_COLUMNS = ("patient", "patient_hash", "original_image_id")
OPTIONAL_COLUMNS = GROUP_COLUMNS + ("severity",)
NA_LABELS = {"nan", "na", "n/a", "#n/a", "<na>", "none", "null"}  # what spreadsheets and pandas write for "missing"


def data_root(cfg: dict) -> Path:
    root = cfg.get("data", {}).get("root") or os.environ.get("WBC_DATA")
    if not root:
        raise WBCError("no data root: pass DATA=<folder>, set WBC_DATA, or set data.root in the config")
    root = resolve_path(root)
    if not root.is_dir():
        raise WBCError(f"{root}: data root is not a folder")
    return root


def read_table(csv) -> pd.DataFrame:
    """A CSV as strings: an empty cell is '', and 'NA' or 'None' stay text (pandas would make them missing)."""
    df = read_csv(csv, "CSV file", dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    return df


def read_split(root, split: str, check_images: bool = True, csv=None) -> pd.DataFrame:
    """One split as a DataFrame: ID, labels, split, path, plus optional columns. Labels '' when unknown. `csv`: its
    label file when not the layout's `root/<split file>`."""
    if split not in SPLITS:
        raise WBCError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    root = Path(root)
    csv_name, folder = SPLITS[split]
    csv = Path(csv) if csv is not None else root / csv_name
    if not csv.exists():
        raise WBCError(f"{csv}: split file not found")
    df = read_table(csv)
    if split not in LABELLED and "labels" not in df.columns:  # a test file needs only its IDs
        df["labels"] = ""
    require_columns(df, csv, ("ID", "labels"))
    if len(df) == 0:
        raise WBCError(f"{csv}: split '{split}' is empty")
    for c in ["ID", "labels"] + [c for c in OPTIONAL_COLUMNS if c in df.columns]:
        df[c] = df[c].str.strip()  # 'P0001 ' and 'P0001' are one patient, or it straddles folds
    blank = df["ID"] == ""
    if blank.any():
        raise WBCError(f"{where(csv, int(np.flatnonzero(blank)[0]) + 2)}: empty ID")
    dup = df["ID"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise WBCError(f"{where(csv, i + 2)}: duplicate ID {df['ID'].iloc[i]}")
    escapes = np.array([Path(i).is_absolute() or ".." in Path(i).parts for i in df["ID"]])
    if escapes.any():  # an ID names a file inside the split's folder
        i = int(np.flatnonzero(escapes)[0])
        raise WBCError(f"{where(csv, i + 2)}: ID {df['ID'].iloc[i]!r} points outside the split's folder")
    # `img_dir` (the competition's combined label file has one): the folder, under the data root, holding the row's
    # image, e.g. a phase1 image listed in a phase2 file
    dirs = df["img_dir"].str.strip() if "img_dir" in df.columns else pd.Series([""] * len(df))
    bad_dir = np.array([Path(d).is_absolute() or ".." in Path(d).parts for d in dirs])
    if bad_dir.any():
        i = int(np.flatnonzero(bad_dir)[0])
        raise WBCError(f"{where(csv, i + 2)}: img_dir {dirs.iloc[i]!r} points outside the data root")
    if split in LABELLED:
        unl = df["labels"] == ""
        if unl.any():
            raise WBCError(f"{where(csv, int(np.flatnonzero(unl)[0]) + 2)}: empty label in a labelled split")
    df["split"] = split
    df["row"] = np.arange(len(df)) + 2
    df["path"] = [str(root / (d or folder) / i) for d, i in zip(dirs, df["ID"])]
    if check_images:
        exists = np.array([os.path.isfile(p) for p in df["path"]])
        if not exists.all():
            i = int(np.flatnonzero(~exists)[0])
            raise WBCError(f"{where(csv, i + 2)}: image not found: {df['path'].iloc[i]}")
    df["csv"] = str(csv)
    keep = ["ID", "labels", "split", "path", "csv", "row"] + [c for c in OPTIONAL_COLUMNS if c in df.columns]
    return df[keep].reset_index(drop=True)


def read_splits(root, splits, check_images: bool = True) -> pd.DataFrame:
    frames = [read_split(root, s, check_images) for s in splits]
    df = pd.concat(frames, ignore_index=True)
    opt = [c for c in OPTIONAL_COLUMNS if c in df.columns]
    df[opt] = df[opt].fillna("")  # a split without the column: unknown, as a blank cell
    check_disjoint(df)
    return df


def check_disjoint(df: pd.DataFrame) -> None:
    """Rows of several splits (columns ID, csv, row): an image in two of them (the pool and the test, say) leaks."""
    dup = df["ID"].duplicated()
    if dup.any():
        r = df[dup].iloc[0]
        raise WBCError(f"{where(r['csv'], r['row'])}: duplicate ID {r['ID']} (also in another split)")


def folds_path(cfg: dict) -> Path:
    """`folds.file`, else folds/<dataset>.csv (committed with the project)."""
    f = cfg["folds"]["file"]
    return resolve_path(f) if f else resolve_path("folds") / f"{dataset_name(cfg)}.csv"


def declaration_path(cfg: dict) -> Path:
    """folds/<dataset>.json, written with the folds: the dataset's classes, declared once."""
    return folds_path(cfg).with_suffix(".json")


def declared_classes(cfg: dict) -> list[str] | None:
    path = declaration_path(cfg)
    if not path.exists():
        return None
    try:
        classes = json.loads(path.read_text())["classes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WBCError(f"{path}: not a readable class declaration ({e}); `make folds` writes it") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise WBCError(f"{path}: `classes` must be a list of class codes")
    return classes


def class_list(cfg: dict, root=None) -> list[str]:
    """The dataset's classes, declared once: `data.classes`, else those `make folds` recorded beside the folds
    (folds/<dataset>.json), else (for `make folds` itself) the sorted label codes of the labelled splits, checked
    for typos. Every later step refuses a label outside them, naming file and row: a misspelt or stray label
    (`XX` in one row) never becomes a class of its own."""
    classes = cfg.get("data", {}).get("classes")
    if classes:
        return [str(c) for c in classes]
    declared = declared_classes(cfg) if cfg.get("folds") else None
    if declared:
        return declared
    root = Path(root) if root is not None else data_root(cfg)
    frames = [read_split(root, s, check_images=False) for s in LABELLED if (root / SPLITS[s][0]).exists()]
    if not frames:
        raise WBCError(f"{root}: no labelled images found")
    df = pd.concat(frames, ignore_index=True)
    _check_label_spelling(df)
    _check_learnable(df, cfg.get("data", {}).get("train_splits"))
    return sorted(set(df["labels"]))


def _check_label_spelling(df: pd.DataFrame) -> None:
    na = df["labels"].str.lower().isin(NA_LABELS)
    if na.any():
        r = df[na].iloc[0]
        raise WBCError(f"{where(r['csv'], r['row'])}: label '{r['labels']}' is a missing value, not a class")
    canon = {}  # case-folded label -> its most common spelling
    for lab in df["labels"].value_counts().index:
        canon.setdefault(lab.casefold(), lab)
    odd = df["labels"] != df["labels"].str.casefold().map(canon)
    if odd.any():
        r = df[odd].iloc[0]
        raise WBCError(f"{where(r['csv'], r['row'])}: label '{r['labels']}' differs from "
                       f"'{canon[r['labels'].casefold()]}' only by case (set data.classes if both are classes)")


def _check_learnable(df: pd.DataFrame, train_splits) -> None:
    """A class labelled only outside the training pool is one no model can learn."""
    if not train_splits:
        return
    unknown = [s for s in train_splits if s not in SPLITS]
    if unknown:
        raise WBCError(f"data.train_splits: unknown split '{unknown[0]}' (known: {', '.join(SPLITS)})")
    pool = df["split"].isin(train_splits)
    unseen = ~pool & ~df["labels"].isin(set(df.loc[pool, "labels"]))
    if unseen.any():
        r = df[unseen].iloc[0]
        raise WBCError(f"{where(r['csv'], r['row'])}: label '{r['labels']}' never appears in the training pool "
                       f"({', '.join(train_splits)}), so no model can learn it")


def check_labels(df: pd.DataFrame, classes: list[str]) -> None:
    """Every non-empty label must be one of the dataset's class codes."""
    bad = (df["labels"] != "") & ~df["labels"].isin(classes)
    if bad.any():
        r = df[bad].iloc[0]
        raise WBCError(f"{where(r['csv'], r['row'])}: unknown label '{r['labels']}' (classes: {', '.join(classes)}; "
                       "a new class is declared with data.classes, or by deleting folds/<dataset>.json and running "
                       "`make folds`)")


def group_column(df: pd.DataFrame) -> str | None:
    for c in GROUP_COLUMNS:
        if c in df.columns and (df[c] != "").any():
            return c
    return None


def row_groups(df: pd.DataFrame, col: str) -> np.ndarray:
    """Group code of each row; a blank is an unknown group, not one shared by every blank row, so each is its own."""
    codes = pd.factorize(df[col])[0]
    blank = (df[col] == "").to_numpy()
    codes[blank] = codes.max() + 1 + np.arange(blank.sum())
    return codes
