"""Decoded, resized images in a uint8 memmap per split, so data loading never re-decodes JPEGs.

`cache/<dataset>_<size>[_crop<fraction>][<preprocess tag>...]/<split>.u8` holds an (N, S, S, 3) RGB array in the
row order of `<split>.ids.json`. A cache is rebuilt when the split's IDs, its image files (path, size, modification
time) or this module's code (decoding, resizing) change; images made by an optional preprocessing step
(`preprocess.py`) live under a tag of what made them, so a retrained restorer never meets its predecessor's images.
Builds write to a temp file and rename.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ..core.config import dataset_name, resolve_path
from ..core.console import progress
from ..core.errors import WBCError, where
from ..core.io import atomic_path, fingerprint, read_json_or_none, write_json
from .preprocess import cache_tag

cv2.setNumThreads(1)  # threads come from the pool below; nested OpenCV threads only contend
CODE_HASH = fingerprint([__file__])  # a changed decoder or resize must not serve images made by the old one


MAX_PIXELS = 4096 * 4096  # data.max_image_pixels: a cell crop is a few hundred pixels across


def image_size(path) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding it; None when the header is unreadable."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit decides, after this
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 -- any unreadable header: the decoder below names the file
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_image(path, csv=None, row=None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB uint8 HxWx3; a missing, undecodable or oversized file is a one-line error naming the CSV row. The size
    is read from the header first: a small file can hold a huge image (30000 x 30000 PNG: 2.6 MB, 2.7 GB decoded)."""
    buf = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    ctx = f"{where(csv, row)}: " if csv else ""
    if buf is None:
        raise WBCError(f"{ctx}image not found: {path}")
    wh = image_size(path)
    if wh is not None and wh[0] * wh[1] > max_pixels:
        raise WBCError(f"{ctx}image {wh[0]} x {wh[1]} is larger than data.max_image_pixels ({max_pixels}): {path}")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise WBCError(f"{ctx}unreadable image: {path}")
    if buf[:2].tobytes() == b"\xff\xd8" and not _jpeg_complete(buf):  # by content: a PNG named .jpg is whole
        raise WBCError(f"{ctx}truncated JPEG: {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _jpeg_complete(buf: np.ndarray) -> bool:
    """Whether the JPEG's marker walk reaches end-of-image (FFD9). OpenCV silently decodes a truncated JPEG (grey
    bottom rows). Segments are skipped by their length (an EXIF thumbnail's own FFD9 lies inside one); what follows
    the EOI (padding, a trailer) is never read."""
    data, i = buf.tobytes(), 2
    while (i := data.find(b"\xff", i)) >= 0 and i + 1 < len(data):
        m = data[i + 1]
        if m == 0xD9:
            return True
        if m == 0xFF:  # fill byte before a marker
            i += 1
        elif m in (0x00, 0x01) or 0xD0 <= m <= 0xD7:  # stuffed FF, TEM or restart marker: no length
            i += 2
        else:  # a segment: its 2-byte length counts itself
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def center_crop(img: np.ndarray, fraction: float) -> np.ndarray:
    """The central square whose side is `fraction` of the short side: the cell fills more of the input, so a
    CPU-sized input keeps more of its native detail (the WBCBench and PBC crops centre the cell)."""
    if fraction >= 1.0:
        return img
    h, w = img.shape[:2]
    side = max(1, int(round(min(h, w) * fraction)))
    y, x = (h - side) // 2, (w - side) // 2
    return img[y:y + side, x:x + side]


def resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def cache_dir(cfg: dict) -> Path:
    d = cfg["data"]
    tag = f"{dataset_name(cfg)}_{d['image_size']}"
    crop = crop_fraction(cfg)
    if crop < 1.0:
        tag += f"_crop{crop:g}"
    return resolve_path(d["cache_dir"]) / (tag + cache_tag(cfg))


def crop_fraction(cfg: dict) -> float:
    f = cfg["data"]["center_crop"]
    f = 1.0 if f is None else float(f)  # 0 must be refused, not read as "off"
    if not 0.0 < f <= 1.0:
        raise WBCError(f"data.center_crop must be in (0, 1], got {f}")
    return f


def _sources(paths) -> str:
    """Signature of the image files (path, size, modification time): regenerated or replaced images under the
    same IDs (a new `make sample-data`, a re-released split) rebuild the cache instead of being served stale."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def decode_all(df: pd.DataFrame, size: int, workers: int = 4, desc: str = "decode", crop: float = 1.0,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode, centre-crop and resize every image of `df` (columns path, csv, row) into one array."""
    out = np.empty((len(df), size, size, 3), np.uint8)

    def work(i):
        r = df.iloc[i]
        out[i] = resize(center_crop(read_image(r["path"], r.get("csv"), r.get("row"), max_pixels), crop), size)

    with progress() as bar, ThreadPoolExecutor(workers) as pool:
        task = bar.add_task(desc, total=len(df), info="")
        for _ in pool.map(work, range(len(df))):
            bar.advance(task)
    return out


def split_images(cfg: dict, df: pd.DataFrame, split: str, transform=None) -> np.ndarray:
    """(N, S, S, 3) uint8 array for one split's rows of `df`, from the cache (built on first use).

    `transform(images, split) -> images` post-processes a fresh build (stain normalisation, restoration).
    """
    sub = df[df["split"] == split]
    d = cache_dir(cfg)
    arr_path, ids_path = d / f"{split}.u8", d / f"{split}.ids.json"
    size = int(cfg["data"]["image_size"])
    ids = sub["ID"].tolist()
    key = {"ids": ids, "sources": _sources(sub["path"]), "code": CODE_HASH}
    whole = arr_path.exists() and arr_path.stat().st_size == len(ids) * size * size * 3  # a truncated one is rebuilt
    if whole and ids_path.exists() and read_json_or_none(ids_path) == key:
        return np.memmap(arr_path, np.uint8, "r", shape=(len(ids), size, size, 3))
    images = decode_all(sub.reset_index(drop=True), size, desc=f"cache {split}", crop=crop_fraction(cfg),
                        max_pixels=int(cfg["data"]["max_image_pixels"]))
    if transform is not None:
        images = transform(images, split)
    with atomic_path(arr_path, suffix=".u8") as tmp:
        images.tofile(tmp)
    write_json(ids_path, key)
    return np.memmap(arr_path, np.uint8, "r", shape=(len(ids), size, size, 3))


def load_images(cfg: dict, df: pd.DataFrame, transform=None) -> np.ndarray:
    """Images for every row of `df` (any mix of splits), in `df`'s row order."""
    parts, order = [], []
    for split in df["split"].unique():
        mask = (df["split"] == split).to_numpy()
        parts.append(split_images(cfg, df, split, transform))
        order.append(np.flatnonzero(mask))
    if len(parts) == 1:
        return parts[0]
    out = np.empty((len(df),) + parts[0].shape[1:], np.uint8)
    for arr, idx in zip(parts, order):
        out[idx] = arr
    return out
