"""Everything a fold run reads: the CV pool with folds, the eval and test splits, and their cached images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import hooks
from ..core.config import display_path, resolve_path
from ..core.console import console
from ..core.errors import WBCError
from ..core.io import read_csv
from ..s1_data.cache import load_images
from ..s1_data.layout import check_disjoint, check_labels, class_list, data_root, read_splits
from ..s1_data.preprocess import build_preprocess
from ..s2_folds.folds import load_folds


@dataclass
class ExtraRows:
    """Labelled training rows beyond the pool, for every fold and never validated on (e.g. pseudo-labels)."""
    images: object  # a row view (Chain / Rows) or []
    labels: np.ndarray  # class codes
    ids: np.ndarray  # image IDs
    note: str = ""  # printed when a fold trains with them


@dataclass
class FoldData:
    classes: list[str]  # the model's outputs: every class, or a specialist's `data.subset_classes`
    pool: pd.DataFrame  # CV pool with a fold column
    holdout: pd.DataFrame  # eval splits (predicted, never trained on)
    test: pd.DataFrame  # test split
    pool_images: np.ndarray
    holdout_images: np.ndarray | None
    test_images: np.ndarray | None
    extra: ExtraRows | None = None  # labelled rows from the unlabelled splits (the `train_rows` hook point)
    excluded: np.ndarray | None = None  # data.exclude_from_training: pool rows that never train (bool per row)

    def in_classes(self, df: pd.DataFrame) -> np.ndarray:
        """Rows whose label is one of the model's classes: a specialist trains and validates on these only,
        but predicts every image, so that an ensemble can compose it with full-class members."""
        return df["labels"].isin(self.classes).to_numpy()

    def trainable(self) -> np.ndarray:
        """Pool rows a fold may train on (all but `data.exclude_from_training`'s)."""
        return np.ones(len(self.pool), bool) if self.excluded is None else ~self.excluded

    def extra_rows(self) -> ExtraRows:
        """The extra training rows (none without an optional step that adds them)."""
        return self.extra or ExtraRows([], np.array([], dtype=object), np.array([], dtype=object))


def load_fold_data(cfg: dict, with_test: bool = True) -> FoldData:
    """Every image the run needs, from the cache; pool rows carry their fold."""
    root = data_root(cfg)
    all_classes = class_list(cfg, root)
    d = cfg["data"]
    pool = read_splits(root, d["train_splits"])
    check_labels(pool, all_classes)
    classes = subset_classes(d.get("subset_classes"), all_classes)
    folds = load_folds(cfg)
    merged = pool.merge(folds[["ID", "fold"]], on="ID", how="left")
    if merged["fold"].isna().any():
        r = merged[merged["fold"].isna()].iloc[0]
        raise WBCError(f"{r['csv']}:{r['row']}: ID {r['ID']} has no fold (re-run `make folds`)")
    merged["fold"] = merged["fold"].astype(int)
    holdout_splits = [s for s in d.get("holdout_splits") or [] if s not in d["train_splits"]]
    holdout = read_splits(root, holdout_splits) if holdout_splits else merged.iloc[:0]
    check_labels(holdout, all_classes)
    test = read_splits(root, [d["test_split"]]) if with_test and d.get("test_split") else merged.iloc[:0]
    check_test_labels(test, all_classes)
    check_disjoint(pd.concat([merged, holdout, test], ignore_index=True))  # no image both trained on and scored

    # a step that fits itself on the pool (the stain reference) sees the images as decoded
    first_split = merged[merged["split"] == merged["split"].iloc[0]]
    pre = build_preprocess(cfg, lambda: load_images(hooks.without("preprocess", cfg), first_split))
    rows_hook = hooks.enabled("train_rows", cfg)
    if rows_hook and not len(test) and d.get("test_split"):  # extra rows come from the unlabelled splits
        test = read_splits(root, [d["test_split"]])
    imgs = lambda df: load_images(cfg, df, pre) if len(df) else None  # noqa: E731
    pool_images = imgs(merged)  # first: a bad pool image stops the run before any other split is cached
    holdout_images, test_images = imgs(holdout), imgs(test)
    extra = rows_hook[0].load(cfg, all_classes, classes, merged, (holdout, holdout_images), (test, test_images)) \
        if rows_hook else None
    excluded = read_exclusions(d.get("exclude_from_training"), merged)
    return FoldData(classes, merged, holdout, test, pool_images, holdout_images, test_images, extra, excluded)


def check_test_labels(test: pd.DataFrame, classes: list[str]) -> None:
    """A test split is predicted, never scored or trained on here: labels in it are refused when they are not class
    codes (a wrong file?) and otherwise left unused with a warning."""
    if "labels" not in test.columns or not len(test):
        return
    check_labels(test, classes)
    n = int((test["labels"] != "").sum())
    if n:
        console.print(f"[yellow]warning:[/] {test['csv'].iloc[0]}: {n} of {len(test)} test rows carry labels; they are "
                      "not used (a test split is predicted, not scored)")


def read_id_file(path, key: str, columns: tuple[str, ...]) -> tuple[Path, pd.DataFrame]:
    """The CSV that config key `key` names, as strings, with its required `columns`."""
    path = resolve_path(path)
    df = read_csv(path, f"file ({key})", dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise WBCError(f"{path}:1: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns)}; "
                       f"expected {','.join(columns)})")
    return path, df


def read_exclusions(path, pool: pd.DataFrame) -> np.ndarray | None:
    """`data.exclude_from_training`: a bool per pool row, True for the IDs the file lists; None without a file."""
    if not path:
        return None
    path, ids = read_id_file(path, "data.exclude_from_training", ("ID",))
    unknown = ~ids["ID"].isin(pool["ID"])
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise WBCError(f"{path}:{i + 2}: ID {ids['ID'].iloc[i]} is not in the training pool")
    excluded = pool["ID"].isin(ids["ID"]).to_numpy()
    console.print(f"data.exclude_from_training: {int(excluded.sum())} pool images never train ({display_path(path)})")
    return excluded


def subset_classes(subset, classes: list[str]) -> list[str]:
    """`data.subset_classes` (a specialist's classes, e.g. a confusable group) in the data's class order."""
    if not subset:
        return classes
    subset = [str(c) for c in subset]
    unknown = [c for c in subset if c not in classes]
    if unknown:
        raise WBCError(f"data.subset_classes: unknown class(es) {', '.join(unknown)} (classes: {', '.join(classes)})")
    if len(set(subset)) < 2:
        raise WBCError("data.subset_classes: a specialist needs at least two distinct classes")
    return [c for c in classes if c in set(subset)]


class Rows:
    """A lazy row view of a (memmap) image array: training never copies the whole pool into RAM."""

    def __init__(self, arr, idx):
        self.arr, self.idx = arr, np.asarray(idx)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return np.stack([self.arr[j] for j in self.idx[i]])
        return self.arr[self.idx[i]]


class Chain:
    """Several row views read as one sequence (the fold's pool rows, then extra rows)."""

    def __init__(self, parts):
        self.parts = [p for p in parts if len(p)]
        self.ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i):
        if i < 0 or i >= len(self):
            raise IndexError(i)
        j = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[j][i - (int(self.ends[j - 1]) if j else 0)]
