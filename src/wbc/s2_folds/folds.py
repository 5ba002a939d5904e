"""K-fold splits of the training pool, committed as `folds/<dataset>.csv` (ID,labels,fold[,group]), with the
dataset's classes declared beside them (`folds/<dataset>.json`).

StratifiedGroupKFold when the data has groups (patient, or the original image of damaged copies), so no
group straddles folds; StratifiedKFold otherwise. A fixed seed makes the file reproducible.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..core.config import dataset_name, display_path
from ..core.console import console, print_table
from ..core.errors import WBCError, first_line, where
from ..core.io import fingerprint, write_csv, write_json
from ..s1_data.layout import (
    check_labels,
    class_list,
    data_root,
    declaration_path,
    folds_path,
    group_column,
    read_splits,
    read_table,
    row_groups,
)


def make_folds(df: pd.DataFrame, n_folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index per row of `df` (column labels); rows sharing a value of `groups` share a fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # slow to import: used here only

    y = df["labels"].to_numpy()
    try:
        with warnings.catch_warnings():
            # Classes rarer than K: sklearn spreads them one per fold and warns; we warn once ourselves.
            warnings.simplefilter("ignore", UserWarning)
            if groups is not None:
                splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
                splits = splitter.split(np.zeros(len(y)), y, groups)
            else:
                splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
                splits = splitter.split(np.zeros(len(y)), y)
            fold = np.full(len(y), -1)
            for k, (_, val) in enumerate(splits):
                fold[val] = k
    except ValueError as e:  # e.g. every class rarer than K: sklearn's reason, as one line
        raise WBCError(f"cannot split the training pool into {n_folds} folds: {first_line(e)}") from None
    return fold


def fold_count(cfg: dict) -> int:
    return int(cfg["folds"]["n_folds"])  # checked with every config value (core/validate.py)


def build_folds(cfg: dict) -> pd.DataFrame:
    k = fold_count(cfg)
    root = data_root(cfg)
    classes = class_list(cfg, root)
    pool = read_splits(root, cfg["data"]["train_splits"])
    check_labels(pool, classes)
    if len(pool) < k:
        raise WBCError(f"training pool has {len(pool)} images, fewer than {k} folds")
    gcol = group_column(pool)
    groups = row_groups(pool, gcol) if gcol else None
    if gcol and len(np.unique(groups)) < k:
        raise WBCError(f"training pool has {len(np.unique(groups))} groups in column '{gcol}' (a blank counts as "
                       f"its own), fewer than {k} folds")
    out = pool[["ID", "labels"]].copy()
    out["fold"] = make_folds(pool, k, int(cfg["folds"]["seed"]), groups)
    if gcol:
        out["group"] = pool[gcol].to_numpy()
    counts = pool["labels"].value_counts()
    rare = counts[counts < k]
    if len(rare):  # after the split, which refuses a pool it cannot split: one error line, not a warning too
        def named(c, n):  # a class of one image is often a typo: say where it is
            row = pool[pool["labels"] == c].iloc[0]
            return f"{c} ({n}" + (f": {where(row['csv'], row['row'])}, a typo?)" if n == 1 else ")")

        console.print(f"[yellow]warning:[/] classes rarer than {k} folds appear in only some folds: "
                      + ", ".join(named(c, n) for c, n in rare.items()), highlight=False)
    return out


def write_folds(cfg: dict) -> tuple[pd.DataFrame, list[str]]:
    """folds/<dataset>.csv and, beside it, folds/<dataset>.json declaring the dataset's classes (what every later
    step checks labels against). Both are committed with the project."""
    folds = build_folds(cfg)
    classes = class_list(cfg)
    counts = folds["labels"].value_counts()
    path = folds_path(cfg)
    write_csv(path, folds)
    write_json(declaration_path(cfg), {"dataset": dataset_name(cfg), "classes": classes,
                                       "images": {c: int(counts.get(c, 0)) for c in classes},
                                       "n_folds": fold_count(cfg), "seed": int(cfg["folds"]["seed"]),
                                       "group": "group" if "group" in folds else None})
    return folds, classes


def dataset_record(cfg: dict) -> dict:
    """What a run folder records of its data (`run_folder.claim`): the dataset's name, its folds file's and class
    declaration's fingerprint, and its classes."""
    path = folds_path(cfg)
    if not path.exists():
        raise WBCError(f"{path}: folds file not found (run `make folds`)")
    return {"dataset": dataset_name(cfg), "folds": fingerprint([path, declaration_path(cfg)]),
            "classes": class_list(cfg)}


def fold_table(folds: pd.DataFrame, classes: list[str]) -> None:
    k = int(folds["fold"].max()) + 1
    ct = pd.crosstab(folds["labels"], folds["fold"]).reindex(index=classes, columns=range(k), fill_value=0)
    rows = [[c] + [int(v) for v in ct.loc[c]] + [int(ct.loc[c].sum())] for c in classes]
    rows.append(["total"] + [int(v) for v in ct.sum(0)] + [int(ct.values.sum())])
    print_table("images per class and fold", ["class"] + [f"fold {i}" for i in range(k)] + ["all"], rows)


def load_folds(cfg: dict) -> pd.DataFrame:
    path = folds_path(cfg)
    if not path.exists():
        raise WBCError(f"{path}: folds file not found (run `make folds`)")
    df = read_table(path)
    for c in ("ID", "labels", "fold"):
        if c not in df.columns:
            raise WBCError(f"{path}:1: missing column {c}")
    df["ID"] = df["ID"].str.strip()  # as read_split, which the IDs are matched against
    dup = df["ID"].duplicated()
    if dup.any():  # one image would train in one fold and validate in another
        i = int(np.flatnonzero(dup)[0])
        raise WBCError(f"{where(path, i + 2)}: duplicate ID {df['ID'].iloc[i]}")
    k = fold_count(cfg)
    ok = df["fold"].str.fullmatch(r"\d+")
    ok[ok] = df.loc[ok, "fold"].astype(int) < k
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise WBCError(f"{where(path, i + 2)}: fold '{df['fold'].iloc[i]}' is not one of 0..{k - 1} "
                       f"(folds.n_folds={k})")
    df["fold"] = df["fold"].astype(int)
    return df


def register(sub) -> None:
    from ..core.cli import add_config_args, config_from_args

    p = add_config_args(sub.add_parser("folds", help="write folds/<dataset>.csv"))

    def run(args):
        cfg = config_from_args(args)
        folds, classes = write_folds(cfg)
        fold_table(folds, classes)
        console.print(f"wrote {display_path(folds_path(cfg))} ({len(folds)} images, {folds['fold'].nunique()} folds"
                      + (", grouped" if "group" in folds else "") + f") and the {len(classes)} classes in "
                      f"{display_path(declaration_path(cfg))}")

    p.set_defaults(func=run)
