"""Everything a fold run reads: the CV pool with folds, the eval and test splits, and their cached images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import display_path, resolve_path
from ..console import console
from ..data.cache import load_images
from ..data.layout import check_disjoint, check_labels, class_list, data_root, read_splits
from ..data.preprocess import build_preprocess
from ..errors import WBCError, where
from ..folds import load_folds


@dataclass
class FoldData:
    classes: list[str]  # the model's outputs: every class, or a specialist's `data.subset_classes`
    pool: pd.DataFrame  # CV pool with a fold column
    holdout: pd.DataFrame  # eval splits (predicted, never trained on)
    test: pd.DataFrame  # test split
    pool_images: np.ndarray
    holdout_images: np.ndarray | None
    test_images: np.ndarray | None
    pseudo: pd.DataFrame | None = None  # data.pseudo_labels rows: ID, labels, source ("holdout"/"test"), index
    excluded: np.ndarray | None = None  # data.exclude_from_training: pool rows that never train (bool per row)

    def in_classes(self, df: pd.DataFrame) -> np.ndarray:
        """Rows whose label is one of the model's classes: a specialist trains and validates on these only,
        but predicts every image, so that an ensemble can compose it with full-class members."""
        return df["labels"].isin(self.classes).to_numpy()

    def trainable(self) -> np.ndarray:
        """Pool rows a fold may train on (all but `data.exclude_from_training`'s)."""
        return np.ones(len(self.pool), bool) if self.excluded is None else ~self.excluded

    def pseudo_rows(self):
        """(images, labels) of the pseudo-labelled rows in `pseudo`'s order; ([], []) without a pseudo-label file."""
        if self.pseudo is None:
            return [], np.array([], dtype=object)
        arrays = {"holdout": self.holdout_images, "test": self.test_images}
        parts = [Rows(arrays[src], g["index"].to_numpy()) for src, g in self.pseudo.groupby("source")]
        return Chain(parts), self.pseudo["labels"].to_numpy()


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
    check_disjoint(pd.concat([merged, holdout, test], ignore_index=True))  # no image both trained on and scored

    plain = {**cfg, "data": {**d, "stain_norm": False, "restore": False}}  # the stain reference sees raw images
    pre = build_preprocess(cfg, lambda: load_images(plain, merged[merged["split"] == merged["split"].iloc[0]]))
    if d.get("pseudo_labels") and not len(test) and d.get("test_split"):
        test = read_splits(root, [d["test_split"]])
    imgs = lambda df: load_images(cfg, df, pre) if len(df) else None  # noqa: E731
    pseudo = read_pseudo(d.get("pseudo_labels"), all_classes, merged, holdout, test)
    if pseudo is not None and len(classes) < len(all_classes):  # a specialist trains on its own classes only
        pseudo = pseudo[pseudo["labels"].isin(classes)].reset_index(drop=True)
    excluded = read_exclusions(d.get("exclude_from_training"), merged)
    return FoldData(classes, merged, holdout, test, imgs(merged), imgs(holdout), imgs(test), pseudo, excluded)


def read_id_file(path, key: str, columns: tuple[str, ...]) -> tuple[Path, pd.DataFrame]:
    """The CSV that config key `key` names, as strings, with its required `columns`."""
    path = resolve_path(path)
    if not path.is_file():
        raise WBCError(f"{path}: not found ({key})")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
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


def read_pseudo(path, classes: list[str], pool: pd.DataFrame, holdout: pd.DataFrame,
                test: pd.DataFrame) -> pd.DataFrame | None:
    """The pseudo-label file (`make pseudo-label`), each row located in the holdout or test images."""
    if not path:
        return None
    path, df = read_id_file(path, "data.pseudo_labels", ("ID", "labels"))
    if not len(df):
        raise WBCError(f"{path}: no pseudo-labelled rows")
    in_pool = set(pool["ID"])
    where_id = {**{i: ("holdout", k) for k, i in enumerate(holdout["ID"])},
                **{i: ("test", k) for k, i in enumerate(test["ID"])}}
    seen, src, idx = set(), [], []
    for k, (i, lbl) in enumerate(zip(df["ID"], df["labels"])):
        at = where(path, k + 2)
        if i in seen:
            raise WBCError(f"{at}: duplicate ID {i}")
        if lbl not in classes:
            raise WBCError(f"{at}: unknown label '{lbl}' (classes: {', '.join(classes)})")
        if i in in_pool:
            raise WBCError(f"{at}: ID {i} is in the labelled training pool; pseudo-labels are for unlabelled splits")
        if i not in where_id:
            raise WBCError(f"{at}: ID {i} is in neither the holdout nor the test split")
        seen.add(i)
        src.append(where_id[i][0])
        idx.append(where_id[i][1])
    out = pd.DataFrame({"ID": df["ID"], "labels": df["labels"], "source": src, "index": idx})
    return out.sort_values("source", kind="stable", ignore_index=True)  # grouped as pseudo_rows chains them


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
    """Several row views read as one sequence (the fold's pool rows, then pseudo-labelled rows)."""

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
