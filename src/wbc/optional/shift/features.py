"""Damage features of every image of a dataset, cached by ID: the covariate the test shift is measured in.

Features are `wbc.optional.restore.score.FEATURES` (noise level, background lightness and colour, chroma blotches),
measured on the full-resolution JPEG at 224 px, so they do not depend on any run's input size.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ...core.config import dataset_name, resolve_path
from ...core.console import progress
from ...core.errors import WBCError
from ...core.io import fingerprint, write_csv, write_json
from ...s1_data.cache import read_image
from ..restore import score
from ..restore.score import FEATURES, damage_features

# the cache is stale when the code that measures the features changes
SOURCE_HASH = fingerprint([score.__file__])


SHIFT_DEFAULTS = {"out_dir": "outputs/shift", "match_dir": "outputs/damage_match"}  # the `shift:` section's keys


def shift_section(cfg: dict) -> dict:
    """The `shift:` section with its defaults; a key it does not know (`shift.out_dri`) is one error line."""
    s = cfg.get("shift") or {}
    unknown = sorted(set(s) - set(SHIFT_DEFAULTS))
    if unknown:
        raise WBCError(f"shift.{unknown[0]}: unknown key (known: {', '.join(SHIFT_DEFAULTS)})")
    return {**SHIFT_DEFAULTS, **s}


def shift_dir(cfg: dict) -> Path:
    return resolve_path(shift_section(cfg)["out_dir"])


def features_path(cfg: dict) -> Path:
    return shift_dir(cfg) / f"{dataset_name(cfg)}_damage_features.csv"


def _compute(df: pd.DataFrame, workers: int) -> np.ndarray:
    out = np.empty((len(df), len(FEATURES)))

    def work(i):
        r = df.iloc[i]
        out[i] = damage_features(read_image(r["path"], r["csv"], r["row"]))

    with progress() as bar, ThreadPoolExecutor(max(1, workers)) as pool:
        task = bar.add_task("damage features", total=len(df), info="")
        for _ in pool.map(work, range(len(df))):
            bar.advance(task)
    return out


def damage_feature_table(cfg: dict, df: pd.DataFrame, workers: int = 2) -> pd.DataFrame:
    """FEATURES for every row of `df` (ID, split, path, csv, row), in `df`'s order. Rows already in the cache
    are reused; new ones are computed and the cache rewritten (atomically)."""
    path = features_path(cfg)
    meta = path.with_suffix(".json")
    cached = None
    if path.exists() and meta.exists() and json.loads(meta.read_text()).get("source") == SOURCE_HASH:
        cached = pd.read_csv(path, dtype={"ID": str})
        if list(cached.columns) != ["ID", "split", *FEATURES]:
            cached = None  # written by another feature set: recompute
    key = df["ID"] + "|" + df["split"]
    known = set() if cached is None else set(cached["ID"] + "|" + cached["split"])
    todo = df[~key.isin(known)].reset_index(drop=True)
    if len(todo):
        new = pd.DataFrame(_compute(todo, workers), columns=list(FEATURES))
        new.insert(0, "split", todo["split"].to_numpy())
        new.insert(0, "ID", todo["ID"].to_numpy())
        cached = new if cached is None else pd.concat([cached, new], ignore_index=True)
        write_csv(path, cached)
        write_json(meta, {"source": SOURCE_HASH, "features": list(FEATURES)})
    cached = cached.assign(key=cached["ID"] + "|" + cached["split"]).set_index("key")
    return cached.loc[key.to_numpy()].reset_index(drop=True)
