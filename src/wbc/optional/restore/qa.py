"""QA sheet: one row per example, damaged | restored | clean, with PSNR to the clean image."""
from __future__ import annotations

import numpy as np

from ...core.grid import caption, fit, save_sheet


def qa_sheet(path, damaged: np.ndarray, restored: np.ndarray, clean: np.ndarray, row_titles=None,
             tile: int = 160) -> None:
    """Write a PNG grid of (damaged, restored, clean) triplets (uint8 RGB NxHxWx3 each)."""
    from .pix2pix import psnr

    rows = []
    for i in range(len(clean)):
        title = f"{row_titles[i]} " if row_titles is not None else ""
        cells = [(damaged[i], f"{title}damaged {psnr(damaged[i], clean[i]):.1f} dB"),
                 (restored[i], f"restored {psnr(restored[i], clean[i]):.1f} dB"), (clean[i], "clean")]
        rows.append([caption(fit(im, tile), [t]) for im, t in cells])
    save_sheet(path, rows)
