"""Procedural WBC-like images and a small synthetic dataset in the WBCBench layout (the tests' fixture).

    draw_cell(label: str, rng: np.random.Generator, size: int = 96) -> DrawnCell
        One RGB uint8 (size, size, 3) smear image with one cell of class `label` in the middle, plus its
        ground truth: DrawnCell(image, cell_mask, nucleus_mask, lobes), masks bool (size, size).
        cell_mask is the whole cell (cytoplasm + nucleus), nucleus_mask the nucleus, lobes the number of
        nuclear lobes (1 for round, kidney and band nuclei, 2 for EO/BA, 2-5 for SNE, 0 for PLT, whose
        masks are the platelet itself).
    clean_image(image_id: str, label: str, seed: int = 0, size: int = 96) -> np.ndarray
        The undamaged RGB rendering behind a file of a dataset made with that seed and size.
    make_sample_dataset(root, n_phase1=240, n_train=240, n_eval=80, n_test=120, image_size=96, seed=0,
                        classes=None, with_groups=False, overwrite=False) -> Path

Classes (default `CLASSES`): LY round nucleus filling most of a small cell; MO large grey-blue cell with a
kidney-shaped nucleus; BNE band (C-shaped) nucleus and SNE 2-5 lobes joined by thin strands, both in the
same lilac cytoplasm so only the nucleus tells them apart; EO bilobed with orange-red granules; BA bilobed
under dark blue-purple granules; MY eccentric oval nucleus in granular cytoplasm; PLT a small purple
fragment without a white cell. Red cells, stain, size, rotation and position vary per image.

Phase-2 images are damaged with `wbc.s1_data.damage.damage` (train mostly severity 0-1, eval 0-2, test mostly
2-3). Every image is a function of (seed, ID, label, size) only, so a dataset is byte-identical for a seed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd

from ..core.errors import WBCError
from . import damage as dmg

CLASSES = ("BA", "BNE", "EO", "LY", "MO", "MY", "PLT", "SNE")
# Long tail like WBCBench: the largest class is 20x the smallest.
CLASS_WEIGHTS = {"SNE": 20, "LY": 12, "BNE": 7, "MO": 5, "EO": 4, "MY": 2.5, "BA": 1.5, "PLT": 1}
DEFAULT_COUNTS = {"n_phase1": 240, "n_train": 240, "n_eval": 80, "n_test": 120}

# split -> (folder, CSV, first ID number, `split` column, severity probabilities for 0..3, minimum per class)
# Minimums give every class >= 5 images in the CV pool (phase1 + phase2 train) and >= 1 in eval and test.
_SPLITS = {
    "phase1": ("phase1", "phase1_label.csv", 10000001, "phase1_train", None, 3),
    "train": ("phase2/train", "phase2_train.csv", 20000001, "phase2_train", (0.6, 0.3, 0.1, 0.0), 2),
    "eval": ("phase2/eval", "phase2_eval.csv", 30000001, "phase2_eval", (1 / 3, 1 / 3, 1 / 3, 0.0), 1),
    "test": ("phase2/test", "phase2_test.csv", 40000001, None, (0.05, 0.15, 0.4, 0.4), 1),
}
JPEG_QUALITY = 95

_SHIFT = 4  # cv2 sub-pixel bits: shapes move smoothly with their float parameters
_ONE = 1 << _SHIFT

# RGB colours; each image jitters them (stain variation).
_BACKGROUND = (242, 226, 212)
_RBC = (222, 186, 190)
_CYTOPLASM = {"LY": (178, 182, 226), "MO": (196, 186, 216), "BNE": (222, 196, 214), "SNE": (222, 196, 214),
              "EO": (228, 196, 186), "BA": (200, 180, 215), "MY": (214, 188, 214)}
_NUCLEUS = {"LY": (66, 36, 116), "MO": (112, 76, 156), "BNE": (84, 46, 132), "SNE": (84, 46, 132),
            "EO": (90, 52, 138), "BA": (80, 44, 128), "MY": (100, 62, 150), "PLT": (132, 82, 164)}
# Cell radius as a fraction of the image size.
_RADIUS = {"LY": (0.19, 0.24), "MO": (0.30, 0.36), "BNE": (0.26, 0.31), "SNE": (0.26, 0.31),
           "EO": (0.26, 0.31), "BA": (0.24, 0.29), "MY": (0.29, 0.34), "PLT": (0.05, 0.08)}


class DrawnCell(NamedTuple):
    image: np.ndarray  # uint8 (size, size, 3), RGB
    cell_mask: np.ndarray  # bool (size, size)
    nucleus_mask: np.ndarray  # bool (size, size)
    lobes: int


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def _disc(mask: np.ndarray, c, r: float) -> None:
    cv2.circle(mask, _pt(*c), max(int(round(r * _ONE)), 1), 255, -1, cv2.LINE_AA, _SHIFT)


def _ellipse(mask: np.ndarray, c, axes, angle: float) -> None:
    cv2.ellipse(mask, _pt(*c), _pt(*axes), float(np.degrees(angle)), 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)


def _polyline(mask: np.ndarray, pts: np.ndarray, thickness: float, value: int = 255) -> None:
    cv2.polylines(mask, [np.round(pts * _ONE).astype(np.int32)], False, value, max(int(round(thickness)), 1),
                  cv2.LINE_AA, _SHIFT)


def _polar(c, rho: float, angle) -> np.ndarray:
    angle = np.asarray(angle, dtype=np.float64)
    return np.stack([c[0] + rho * np.cos(angle), c[1] + rho * np.sin(angle)], axis=-1)


def _lobed(mask, c, R, theta, n, lobe_r, rng) -> None:
    """n lobes on an arc round the centre, joined by thin strands (a segmented nucleus)."""
    step = np.radians(60 + 50 / max(n - 1, 1))  # wide enough that neighbouring lobes never touch
    angles = theta + (np.arange(n) - (n - 1) / 2) * step + rng.uniform(-0.04, 0.04, n)
    centres = _polar(c, 0.52 * R, angles) + rng.uniform(-0.02, 0.02, (n, 2)) * R
    _polyline(mask, centres, 0.03 * R)
    for p, jitter in zip(centres, rng.uniform(0.92, 1.08, n)):
        _ellipse(mask, p, (lobe_r * R * jitter, lobe_r * R * jitter * rng.uniform(0.75, 0.95)),
                 rng.uniform(0, np.pi))


def _nucleus(label: str, mask: np.ndarray, c, R: float, theta: float, rng) -> int:
    """Draw the nucleus of `label` into `mask`; returns the lobe count."""
    if label == "LY":
        off = _polar(c, rng.uniform(0.0, 0.1) * R, theta)
        _ellipse(mask, off, (rng.uniform(0.74, 0.8) * R, rng.uniform(0.68, 0.75) * R), theta)
        return 1
    if label == "MO":  # kidney: an oval with a bite out of one side
        off = _polar(c, 0.08 * R, theta)
        _ellipse(mask, off, (0.62 * R, rng.uniform(0.44, 0.5) * R), theta)
        bite = np.zeros_like(mask)
        _disc(bite, _polar(off, 0.55 * R, theta + np.pi / 2), rng.uniform(0.26, 0.32) * R)
        np.minimum(mask, 255 - bite, out=mask)
        return 1
    if label == "BNE":  # band: a thick C of even width
        span = np.radians(rng.uniform(190, 250))
        pts = _polar(c, 0.48 * R, theta + np.linspace(-span / 2, span / 2, 24))
        _polyline(mask, pts, rng.uniform(0.24, 0.3) * R)
        return 1
    if label == "SNE":
        n = int(rng.choice([2, 3, 4, 5], p=[0.2, 0.4, 0.3, 0.1]))
        _lobed(mask, c, R, theta, n, 0.33 - 0.03 * n, rng)
        return n
    if label in ("EO", "BA"):
        _lobed(mask, c, R, theta, 2, rng.uniform(0.25, 0.29), rng)
        return 2
    if label == "MY":  # oval pushed to one side
        off = _polar(c, rng.uniform(0.22, 0.3) * R, theta)
        _ellipse(mask, off, (rng.uniform(0.48, 0.55) * R, rng.uniform(0.38, 0.45) * R), theta + np.pi / 2)
        return 1
    raise ValueError(f"no drawing for class '{label}' (known: {', '.join(CLASSES)})")


def _smooth_noise(rng, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std noise with blobs about `sigma` px wide."""
    n = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), sigma)
    return n / (n.std() + 1e-6)


def _blend(img: np.ndarray, alpha: np.ndarray, colour) -> None:
    img += alpha[..., None] * (np.asarray(colour, np.float32) - img)


def _granules(rng, size, c, R, count, radius) -> np.ndarray:
    """Alpha of `count` small dots scattered over the disc of radius R round c."""
    m = np.zeros((size, size), np.uint8)
    rho = R * np.sqrt(rng.random(count))
    for p, r in zip(_polar(c, rho, rng.uniform(0, 2 * np.pi, count)), rng.uniform(0.7, 1.3, count) * radius):
        _disc(m, p, r)
    return m.astype(np.float32) / 255


def _jitter(colour, rng, amount: float = 10) -> np.ndarray:
    return np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def draw_cell(label: str, rng: np.random.Generator, size: int = 96) -> DrawnCell:
    """A smear image with one `label` cell in the middle and its masks (see the module docstring)."""
    if label not in _RADIUS:
        raise ValueError(f"no drawing for class '{label}' (known: {', '.join(CLASSES)})")
    s = size / 96  # drawing sizes below are tuned at 96 px
    stain = rng.uniform(0.95, 1.05, 3).astype(np.float32)  # per-slide colour balance
    img = np.empty((size, size, 3), np.float32)
    img[:] = _jitter(_BACKGROUND, rng, 6)
    img *= (1 + 0.025 * _smooth_noise(rng, (size, size), 12 * s))[..., None]

    # Red cells in two layers (bodies, pale centres); overlaps come out darker, as in a real smear.
    bodies = np.zeros((size, size), np.float32)
    pallor = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(4, 10))):
        m = np.zeros((size, size), np.uint8)
        p, r = rng.uniform(-0.1, 1.1, 2) * size, rng.uniform(0.14, 0.19) * size
        _ellipse(m, p, (r, r * rng.uniform(0.88, 1.0)), rng.uniform(0, np.pi))
        bodies += m
        _disc(pallor, p, r * rng.uniform(0.35, 0.5))
    _blend(img, 1 - 0.3 ** (bodies / 255), _jitter(_RBC, rng, 8))
    _blend(img, cv2.GaussianBlur(pallor, (0, 0), 2 * s).astype(np.float32) / 255 * 0.5, _BACKGROUND)

    c = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
    R = rng.uniform(*_RADIUS[label]) * size
    theta = rng.uniform(0, 2 * np.pi)
    cell = np.zeros((size, size), np.uint8)
    nucleus = np.zeros((size, size), np.uint8)
    tex = _smooth_noise(rng, (size, size), 0.8 * s)
    if label == "PLT":  # an irregular purple fragment, no white cell
        k = int(rng.integers(7, 11))
        pts = _polar(c, R * rng.uniform(0.7, 1.15, k), theta + np.linspace(0, 2 * np.pi, k, endpoint=False))
        cv2.fillPoly(cell, [np.round(pts * _ONE).astype(np.int32)], 255, cv2.LINE_AA, _SHIFT)
        nucleus[:] = cell
        alpha = cell.astype(np.float32) / 255
        _blend(img, alpha, _jitter(_NUCLEUS["PLT"], rng) * (1 + 0.15 * tex[..., None]))
        lobes = 0
    else:
        _ellipse(cell, c, (R, R * rng.uniform(0.9, 1.0)), theta)
        a_cell = cell.astype(np.float32) / 255
        _blend(img, a_cell * 0.95, _jitter(_CYTOPLASM[label], rng) * (1 + 0.04 * tex[..., None]))
        if label == "EO":
            _blend(img, _granules(rng, size, c, R * 0.95, int(140 * s * s), 1.4 * s) * a_cell * 0.9,
                   _jitter((230, 118, 86), rng))
        elif label in ("MY", "BNE", "SNE"):  # fine granules; stronger in the immature MY
            strength, count = (0.55, 90) if label == "MY" else (0.22, 60)
            _blend(img, _granules(rng, size, c, R * 0.95, int(count * s * s), 0.7 * s) * a_cell * strength,
                   _jitter((168, 108, 168), rng))
        elif label == "MO":  # a few pale vacuoles
            _blend(img, _granules(rng, size, c, R * 0.85, int(rng.integers(2, 6)), 1.8 * s) * a_cell * 0.5,
                   (235, 225, 235))
        lobes = _nucleus(label, nucleus, c, R, theta, rng)
        np.minimum(nucleus, cell, out=nucleus)
        a_nuc = nucleus.astype(np.float32) / 255
        _blend(img, a_nuc, _jitter(_NUCLEUS[label], rng) * (1 + 0.12 * tex[..., None]))
        if label == "BA":  # dark granules over cytoplasm and nucleus alike
            _blend(img, _granules(rng, size, c, R * 0.95, int(110 * s * s), 1.3 * s) * a_cell * 0.85,
                   _jitter((62, 36, 112), rng))

    img *= stain
    img = cv2.GaussianBlur(img, (0, 0), 0.55 * s)  # optics: no perfectly sharp edges
    img += 1.5 * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return DrawnCell(out, cell >= 128, nucleus >= 128, lobes)


def _stem(image_id: str) -> int:
    stem = Path(str(image_id)).stem
    if not stem.isdigit():
        raise ValueError(f"sample image IDs are numeric like 10000001.jpg, got '{image_id}'")
    return int(stem)


def clean_image(image_id: str, label: str, seed: int = 0, size: int = 96) -> np.ndarray:
    """The undamaged RGB rendering of `image_id` in a dataset made with `seed` and `size`."""
    return draw_cell(label, np.random.default_rng([seed, _stem(image_id), 0]), size).image


def _allocate(n: int, classes: list[str], minimum: int, what: str) -> np.ndarray:
    """Per-class counts summing to n, proportional to CLASS_WEIGHTS, each at least `minimum`."""
    if n < minimum * len(classes):
        raise WBCError(f"{what}: {n} images cannot hold {minimum} of each of {len(classes)} classes")
    w = np.array([CLASS_WEIGHTS[c] for c in classes], float)
    raw = n * w / w.sum()
    counts = np.maximum(np.floor(raw).astype(int), minimum)
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    i = 0
    while counts.sum() < n:  # largest remainders first
        counts[order[i % len(order)]] += 1
        i += 1
    while counts.sum() > n:  # minimums overshot: take from the biggest classes
        counts[int(np.argmax(counts))] -= 1
    return counts


def _patients(rng, n: int, first: int) -> list[str]:
    """Consecutive runs of 2-6 images per patient (rows are already shuffled)."""
    out: list[str] = []
    p = first
    while len(out) < n:
        out += [f"P{p:04d}"] * int(rng.integers(2, 7))
        p += 1
    return out[:n]


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise WBCError(f"{path}: JPEG encoding failed")
    path.write_bytes(buf.tobytes())


_README = """# Synthetic WBC sample dataset

Procedural white-blood-cell-like images made by `wbc.s1_data.sample.make_sample_dataset`
(`python -m wbc sample-data`), seed {seed}, {size}x{size} px. Not real cells: for tests and demos only.

Layout (WBCBench 2026):

- `phase1/`, `phase1_label.csv` (ID,labels,split{groups}): clean images
- `phase2/train/`, `phase2_train.csv` (ID,labels,split,severity{groups}): damaged, severity mostly 0-1
- `phase2/eval/`, `phase2_eval.csv` (ID,labels,split,severity{groups}): damaged, severity 0-2
- `phase2/test/`, `phase2_test.csv` (ID,labels; labels empty): damaged, severity mostly 2-3
- `test_labels_hidden.csv` (ID,labels,severity): the test answers, for demo scoring only

`severity` is the `wbc.s1_data.damage.damage` level (0 = clean; else one blur, one lighting and one noise
fault). {groups_note}

Classes: {classes}. Counts:

{counts}
"""


def _is_sample(root: Path) -> bool:
    readme = root / "README.md"
    return readme.is_file() and readme.read_text().startswith(_README.split("\n", 1)[0])


def _readme(seed, size, classes, with_groups, frames) -> str:
    lines = ["| class | " + " | ".join(frames) + " |", "|---" * (len(frames) + 1) + "|"]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(str(int((f['labels'] == c).sum())) for f in frames.values()) + " |")
    note = ("`patient` groups 2-6 images; patients never span splits." if with_groups
            else "No patient column (make it with `with_groups=True` / `--groups`).")
    return _README.format(seed=seed, size=size, groups=",patient" if with_groups else "", groups_note=note,
                          classes=", ".join(classes), counts="\n".join(lines))


def make_sample_dataset(root, n_phase1: int = 240, n_train: int = 240, n_eval: int = 80, n_test: int = 120,
                        image_size: int = 96, seed: int = 0, classes=None, with_groups: bool = False,
                        overwrite: bool = False) -> Path:
    """Write a synthetic dataset in the WBCBench layout to `root`; returns `root`.

    Built in a temporary folder beside `root` and renamed into place, so a crash leaves nothing behind.
    An existing non-empty `root` is replaced when it is an earlier sample dataset or with `overwrite=True`.
    """
    root = Path(root)
    classes = list(CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in CLASS_WEIGHTS]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise WBCError(f"sample classes must be distinct codes from {', '.join(CLASSES)}; got {', '.join(classes)}")
    if image_size < 32:
        raise WBCError(f"sample image size must be at least 32 px, got {image_size}")
    if root.exists() and any(root.iterdir()) and not (overwrite or _is_sample(root)):
        raise WBCError(f"{root}: folder exists and is not a sample dataset (pass --force to replace it)")
    sizes = {"phase1": n_phase1, "train": n_train, "eval": n_eval, "test": n_test}
    rng = np.random.default_rng(seed)
    plans, patient = {}, 1
    for split, n in sizes.items():
        _, _, first, split_name, sev_p, minimum = _SPLITS[split]
        counts = _allocate(int(n), classes, minimum, f"split {split}")
        labels = rng.permutation(np.repeat(classes, counts))
        df = pd.DataFrame({"ID": [f"{first + i}.jpg" for i in range(len(labels))], "labels": labels})
        if split_name:
            df["split"] = split_name
        df["severity"] = 0 if sev_p is None else rng.choice(4, size=len(df), p=sev_p)
        if split != "test":
            df["patient"] = _patients(rng, len(df), patient)
            patient += df["patient"].nunique()
        plans[split] = df

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset should read like any folder
        for split, df in plans.items():
            folder, csv, *_ = _SPLITS[split]
            (tmp / folder).mkdir(parents=True, exist_ok=True)
            for image_id, label, sev in zip(df["ID"], df["labels"], df["severity"]):
                img = clean_image(image_id, label, seed, image_size)
                if sev:
                    img = dmg.damage(img, int(sev), np.random.default_rng([seed, _stem(image_id), 1]))
                _write_jpeg(tmp / folder / image_id, img)
            cols = ["ID", "labels", "split"] + (["severity"] if split != "phase1" else [])
            if with_groups and "patient" in df:
                cols.append("patient")
            if split == "test":
                df[["ID", "labels", "severity"]].to_csv(tmp / "test_labels_hidden.csv", index=False)
                df = df.assign(labels="")
                cols = ["ID", "labels"]
            df[cols].to_csv(tmp / csv, index=False)
        (tmp / "README.md").write_text(_readme(seed, image_size, classes, with_groups, plans))
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "data")
        os.replace(tmp, root)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
