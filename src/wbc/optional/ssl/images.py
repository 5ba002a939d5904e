"""The images self-supervised pretraining sees, keyed by ID: the pool, or the pool plus the eval and test splits without
their labels (`ssl.images: transductive`), optionally cut down to a list of IDs (`ssl.image_list`, e.g. `select-ssl`'s
selected.csv), optionally with the background around the central cell removed (`ssl.cell_filter`)."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from ...core import hooks
from ...core.config import resolve_path
from ...core.console import progress
from ...core.errors import WBCError
from ...core.io import read_csv, require_columns
from ...s1_data.cache import load_images, resize
from ...s1_data.layout import data_root, read_splits
from ...s1_data.preprocess import build_preprocess
from ...s6_refine.morphology import segment


def image_splits(cfg: dict, mode: str) -> list[str]:
    d = cfg["data"]
    splits = list(d["train_splits"])
    if mode == "transductive":  # the images a challenge scores: some challenges forbid training on them at all
        splits += [s for s in list(d.get("holdout_splits") or []) + [d.get("test_split")] if s and s not in splits]
    return splits


def image_frame(cfg: dict, s: dict) -> pd.DataFrame:
    """ID, labels, split, path, csv, row of every image pretraining may use, in split order."""
    df = read_splits(data_root(cfg), image_splits(cfg, s["images"]))
    if s["image_list"]:
        df = df[listed(s["image_list"], df, s["images"])].reset_index(drop=True)
    return df


def listed(path, df: pd.DataFrame, mode: str) -> np.ndarray:
    """Rows of `df` whose ID the CSV at `path` lists (column ID); an ID outside `df` is an error naming its row."""
    path = resolve_path(path)
    ids = read_csv(path, "ssl.image_list", dtype=str, keep_default_na=False)
    require_columns(ids, path, ("ID",))
    unknown = ~ids["ID"].isin(df["ID"])
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise WBCError(f"{path}:{i + 2}: ID {ids['ID'].iloc[i]} is not among the images of ssl.images={mode}")
    if not len(ids):
        raise WBCError(f"{path}: lists no image (ssl.image_list)")
    return df["ID"].isin(ids["ID"]).to_numpy()


def load_frame_images(cfg: dict, df: pd.DataFrame) -> np.ndarray:
    """The cached images of `df`'s rows, preprocessed as the fold runs' are (the `preprocess` hook point)."""
    first = df[df["split"] == df["split"].iloc[0]]
    pre = build_preprocess(cfg, lambda: load_images(hooks.without("preprocess", cfg), first))
    return load_images(cfg, df, pre)


def filter_cell(img: np.ndarray, mode: str, margin: float) -> tuple[np.ndarray, bool]:
    """The image with the background around its central cell whitened (`whiten`) or cropped away (`crop`: the cell's
    square box, resized back); the cell mask of the morphology segmentation grown by `margin` x the image side.
    An image the segmentation fails on comes back unchanged, with False."""
    seg = segment(img)
    if not seg.ok:
        return img.copy(), False
    r = int(round(margin * img.shape[0]))
    mask = seg.cell if r == 0 else cv2.dilate(seg.cell.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
    if mode == "whiten":
        out = img.copy()
        out[~mask] = 255
        return out, True
    ys, xs = np.nonzero(mask)
    side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    cy, cx = (ys.max() + ys.min()) // 2, (xs.max() + xs.min()) // 2
    y0 = int(np.clip(cy - side // 2, 0, img.shape[0] - side))
    x0 = int(np.clip(cx - side // 2, 0, img.shape[1] - side))
    return resize(np.ascontiguousarray(img[y0:y0 + side, x0:x0 + side]), img.shape[0]), True


def filter_cells(images, mode: str, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """`filter_cell` of every image (a new array) and whether its segmentation succeeded."""
    out = np.empty(images.shape, np.uint8)
    ok = np.zeros(len(images), bool)
    with progress() as bar:
        task = bar.add_task(f"cell filter ({mode})", total=len(images), info="")
        for i in range(len(images)):
            out[i], ok[i] = filter_cell(np.asarray(images[i]), mode, margin)
            bar.advance(task)
    return out, ok
