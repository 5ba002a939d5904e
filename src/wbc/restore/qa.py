"""QA sheet: one row per example, damaged | restored | clean, with PSNR to the clean image."""
from __future__ import annotations

import cv2
import numpy as np

from ..io import save_png

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    tile = tile.copy()
    cv2.rectangle(tile, (0, 0), (tile.shape[1], 16), (0, 0, 0), -1)
    cv2.putText(tile, text, (3, 12), _FONT, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def qa_sheet(path, damaged: np.ndarray, restored: np.ndarray, clean: np.ndarray, row_titles=None,
             tile: int = 160) -> None:
    """Write a PNG grid of (damaged, restored, clean) triplets (uint8 RGB NxHxWx3 each)."""
    from .pix2pix import psnr

    rows = []
    for i in range(len(clean)):
        title = f"{row_titles[i]} " if row_titles is not None else ""
        cells = [(damaged[i], f"{title}damaged {psnr(damaged[i], clean[i]):.1f} dB"),
                 (restored[i], f"restored {psnr(restored[i], clean[i]):.1f} dB"), (clean[i], "clean")]
        rows.append(np.concatenate([_label(cv2.resize(np.ascontiguousarray(im), (tile, tile),
                                                      interpolation=cv2.INTER_AREA), t)
                                    for im, t in cells], 1))
    sheet = np.concatenate(rows, 0)
    save_png(path, sheet)
