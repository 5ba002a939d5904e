"""Everything a fold run reads: the CV pool with folds, the eval and test splits, and their cached images."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..data.cache import load_images
from ..data.layout import check_labels, class_list, data_root, read_splits
from ..data.preprocess import build_preprocess
from ..errors import WBCError
from ..folds import load_folds


@dataclass
class FoldData:
    classes: list[str]
    pool: pd.DataFrame  # CV pool with a fold column
    holdout: pd.DataFrame  # eval splits (predicted, never trained on)
    test: pd.DataFrame  # test split
    pool_images: np.ndarray
    holdout_images: np.ndarray | None
    test_images: np.ndarray | None


def load_fold_data(cfg: dict, with_test: bool = True) -> FoldData:
    """Every image the run needs, from the cache; pool rows carry their fold."""
    root = data_root(cfg)
    classes = class_list(cfg, root)
    d = cfg["data"]
    pool = read_splits(root, d["train_splits"])
    check_labels(pool, classes)
    folds = load_folds(cfg)
    merged = pool.merge(folds[["ID", "fold"]], on="ID", how="left")
    if merged["fold"].isna().any():
        r = merged[merged["fold"].isna()].iloc[0]
        raise WBCError(f"{r['csv']}:{r['row']}: ID {r['ID']} has no fold (re-run `make folds`)")
    merged["fold"] = merged["fold"].astype(int)
    holdout_splits = [s for s in d.get("holdout_splits") or [] if s not in d["train_splits"]]
    holdout = read_splits(root, holdout_splits) if holdout_splits else merged.iloc[:0]
    check_labels(holdout, classes)
    test = read_splits(root, [d["test_split"]]) if with_test and d.get("test_split") else merged.iloc[:0]

    plain = {**cfg, "data": {**d, "stain_norm": False, "restore": False}}  # the stain reference sees raw images
    pre = build_preprocess(cfg, lambda: load_images(plain, merged[merged["split"] == merged["split"].iloc[0]]))
    imgs = lambda df: load_images(cfg, df, pre) if len(df) else None  # noqa: E731
    return FoldData(classes, merged, holdout, test, imgs(merged), imgs(holdout), imgs(test))


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
