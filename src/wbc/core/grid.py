"""Picture sheets where a person would rather look than read (the morphology step's, the restorer's and label
issues' QA sheets): captioned tiles laid out in rows, an optional label column, saved as PNG."""
from __future__ import annotations

import cv2
import numpy as np

from .io import save_png

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE = (255, 255, 255)
LINE = 14  # pixels per caption line at the caption scale


def fit(image: np.ndarray, size: int) -> np.ndarray:
    """`image` as a size x size tile (area averaging when shrinking)."""
    image = np.ascontiguousarray(image)
    interp = cv2.INTER_AREA if max(image.shape[:2]) > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def caption(tile: np.ndarray, lines, at: str = "top") -> np.ndarray:
    """White text lines over a darkened band at the top (legible on any stain), or outlined at the bottom (so
    drawings on the tile stay visible); a copy."""
    tile, lines = tile.copy(), [str(x) for x in lines if x]
    if not lines:
        return tile
    if at == "top":
        band = 6 + LINE * len(lines)
        tile[:band] = (tile[:band] * 0.35).astype(np.uint8)
        for k, text in enumerate(lines):
            cv2.putText(tile, text, (4, 13 + LINE * k), FONT, 0.4, WHITE, 1, cv2.LINE_AA)
        return tile
    size = tile.shape[0]
    for k, text in enumerate(lines):
        y = size - 6 - 16 * (len(lines) - 1 - k)
        cv2.putText(tile, text, (4, y), FONT, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(tile, text, (4, y), FONT, 0.45, WHITE, 1, cv2.LINE_AA)
    return tile


def blank(size: int) -> np.ndarray:
    return np.full((size, size, 3), 255, np.uint8)


def sheet(rows: list[list[np.ndarray]], labels: list[str] | None = None, label_width: int = 70,
          width: int = 0) -> np.ndarray:
    """Rows of equal square tiles, padded with white to the longest row (or `width` tiles), with a label column at
    the left when `labels`."""
    size = rows[0][0].shape[0] if rows and rows[0] else 64
    width = max([len(r) for r in rows] + [width, 1])
    out = []
    for k, row in enumerate(rows):
        row = list(row) + [blank(size)] * (width - len(row))
        if labels is not None:
            head = np.full((size, label_width, 3), 255, np.uint8)
            cv2.putText(head, labels[k], (6, size // 2 + 6), FONT, 0.6, (0, 0, 0), 2, cv2.LINE_AA)
            row = [head] + row
        out.append(np.hstack(row))
    if not out:
        return np.full((size, (label_width if labels is not None else 0) + size, 3), 255, np.uint8)
    return np.vstack(out)


def in_rows(tiles: list[np.ndarray], cols: int) -> list[list[np.ndarray]]:
    return [tiles[i:i + cols] for i in range(0, len(tiles), cols)]


def save_sheet(path, rows: list[list[np.ndarray]], labels: list[str] | None = None, width: int = 0) -> None:
    save_png(path, sheet(rows, labels, width=width))
