"""Classical cell / nucleus segmentation and morphology features for one blood-cell image.

Pipeline (`segment`): median + Gaussian denoising -> flat-field / white balance (divide each channel by a
smooth estimate of the bright plasma) -> a stain map (B - G, rescaled so the image median is 0 and the
nucleus level 1: the violet nucleus has B >> G, pink red cells and plasma do not) -> nucleus seed =
the big central component of the strong stain -> marker watershed on a clipped cell map (an RGB axis
separating cytoplasm from red cells) and the clipped darkness grows the seed to the cell boundary ->
K-means (K=3) on the cell's pixels splits nucleus from cytoplasm -> morphological clean-up.

Everything is scale-aware (kernel sizes follow the image size, 224 px = 1). A failure never raises: it
is returned as `Segmentation.error` and the features are NaN with `seg_ok=False`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from ..core.io import fingerprint

# Cached feature files are keyed by this file's source as well as the parameters: a fixed segmentation bug
# must not be served from features computed before the fix (a version number to bump was forgotten once).
SOURCE_HASH = fingerprint([__file__])
REGIONS = ("cell", "nuc", "cyto")
COLOUR_FEATURES = [f"{r}_{k}" for r in REGIONS for k in ("r", "g", "b", "intensity", "rb_ratio")]
SHAPE_FEATURES = ["cell_area", "cell_perimeter", "cell_circularity", "cell_solidity", "cell_eccentricity",
                  "cell_spikiness", "nuc_area", "nuc_perimeter", "nuc_circularity", "nuc_solidity",
                  "nuc_eccentricity", "nuc_spikiness", "nuc_lobes", "nuc_constriction", "nuc_components",
                  "nc_ratio", "nuc_offset"]
TEXTURE_FEATURES = ["cyto_texture", "cyto_granularity", "nuc_texture"]
FEATURES = SHAPE_FEATURES + COLOUR_FEATURES + TEXTURE_FEATURES
# Heavy-tailed positive features: modelled on a log scale by the class Gaussians.
LOG_FEATURES = ("cell_area", "cell_perimeter", "nuc_area", "nuc_perimeter", "cell_spikiness", "nuc_spikiness",
                "cyto_texture", "cyto_granularity", "nuc_texture", "cell_rb_ratio", "nuc_rb_ratio",
                "cyto_rb_ratio")


@dataclass(frozen=True)
class SegParams:
    median: int = 5              # px at 224; removes salt-and-pepper noise
    sigma: float = 1.5           # Gaussian denoising, px at 224
    flat_block: int = 16         # block size of the plasma-brightness estimate, px at 224
    seed_level: float = 0.55     # nucleus seed: stain above this fraction of the nucleus level
    seed_join: float = 30.0      # other seed components within this distance (px at 224) join the seed
    bg_level: float = 0.10       # sure outside: cell map below this fraction of the nucleus level (eroded)
    clip_level: float = 0.35     # cell map clipped here for the watershed (hides the nucleus edge)
    min_contrast: float = 0.08   # nucleus level minus median B-G below this: no stained cell
    cell_sigma: float = 2.5      # smoothing of the cell map, px at 224 (> 0)
    cell_axis: tuple = (0.35, -0.9, 1.0)  # RGB weights of the cell map (LDA of cytoplasm vs red cells)
    dark_weight: float = 1.0     # weight of the darkness edge (plasma / cell boundary) in the watershed
    kmeans_k: int = 3
    lobe_persistence: float = 0.4  # a lobe's peak rises this fraction of its height above its saddle
    lobe_min_height: float = 0.25  # and is at least this fraction of the thickest lobe
    min_cell_frac: float = 0.002  # cell area bounds as a fraction of the image
    max_cell_frac: float = 0.6
    max_border_frac: float = 0.25  # cell contour on the image border above this: leaked into neighbours
    # leak check: a cell less solid than leak_solidity and leak_ratio x larger than the seed is re-grown
    # with leak_retry x the smoothing and background level; if the two differ (IoU < leak_iou) the retry
    # is kept, and is a failure when still less solid than leak_solidity
    leak_solidity: float = 0.75
    leak_ratio: float = 1.8
    leak_retry: float = 2.5
    leak_iou: float = 0.9

    def key(self) -> str:
        """Cache key: the segmentation code, parameters and feature list."""
        blob = json.dumps({"source": SOURCE_HASH, "params": asdict(self), "features": FEATURES}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@dataclass
class Segmentation:
    cell: np.ndarray | None = None   # bool masks, image shape
    nucleus: np.ndarray | None = None
    norm: np.ndarray | None = None   # flat-fielded, denoised RGB float image
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def _odd(x: float) -> int:
    return max(1, int(round(x)) // 2 * 2 + 1)


def _disk(r: float) -> np.ndarray:
    r = max(1, int(round(r)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def flat_field(img: np.ndarray, block: int) -> np.ndarray:
    """Per-channel plasma brightness: 95th percentile per block, spread over a 3x3 block neighbourhood
    (so a large dark cell does not pull it down) and smoothed."""
    h, w = img.shape[:2]
    gh, gw = max(1, h // block), max(1, w // block)
    bh, bw = h // gh, w // gw
    blocks = img[:gh * bh, :gw * bw].reshape(gh, bh, gw, bw, 3).transpose(0, 2, 1, 3, 4).reshape(gh, gw, -1, 3)
    grid = np.percentile(blocks, 95, axis=2).astype(np.float32)
    grid = cv2.dilate(grid, np.ones((3, 3), np.uint8))
    grid = cv2.GaussianBlur(grid, (0, 0), 1.5)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.maximum(out, 1e-3)


def _dist(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each True pixel to the nearest False one."""
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _solidity(mask: np.ndarray) -> float:
    cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    hull = sum(cv2.contourArea(cv2.convexHull(c)) for c in cs)
    return float(mask.sum() / hull) if hull > 0 else 0.0


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, cs, -1, 1, cv2.FILLED)
    return out > 0


def _largest_central(mask: np.ndarray, scale: float) -> np.ndarray:
    """The component with the best area / (1 + distance to the centre)^2: big and central."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return lab == 1
    h, w = mask.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    idx = np.arange(1, n + 1)
    areas = ndi.sum(mask, lab, idx)
    yy, xx = np.mgrid[:h, :w]
    dist = ndi.minimum(np.hypot(yy - cy, xx - cx), lab, idx)
    best = idx[np.argmax(areas / (1 + dist / (20 * scale)) ** 2)]
    return lab == best


def segment(rgb: np.ndarray, params: SegParams = SegParams()) -> Segmentation:
    """Cell and nucleus masks of the central cell of an RGB uint8 image."""
    if rgb is None or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 32:
        return Segmentation(error="not an RGB image of at least 32x32")
    h, w = rgb.shape[:2]
    scale = min(h, w) / 224.0
    den = cv2.medianBlur(rgb, _odd(params.median * scale))
    den = cv2.GaussianBlur(den.astype(np.float32) / 255.0, (0, 0), params.sigma * scale)
    norm = np.clip(den / flat_field(den, max(4, int(params.flat_block * scale))), 0, 1.5)
    bg = norm[..., 2] - norm[..., 1]
    lo, hi = float(np.median(bg)), float(np.percentile(bg, 99.5))
    seg = Segmentation(norm=norm)
    if hi - lo < params.min_contrast:
        seg.error = f"no stained cell (contrast {hi - lo:.3f})"
        return seg
    stain = ((bg - lo) / (hi - lo)).astype(np.float32)
    dark = (1.0 - norm.mean(-1)).astype(np.float32)

    seed = _largest_central(stain > params.seed_level, scale)
    lab, n = ndi.label(stain > params.seed_level)
    near = _dist(~seed) < params.seed_join * scale
    for i in np.unique(lab[near & (lab > 0)]):  # lobes of a segmented nucleus are separate seeds
        part = lab == i
        if part.sum() >= 20 * scale ** 2:
            seed |= part
    if seed.sum() < 10 * scale ** 2:
        seg.error = "no nucleus seed"
        return seg

    # cell map: an RGB axis (LDA of cytoplasm vs red-cell pixels) with the image median at 0 and the
    # nucleus at 1
    cm = norm @ np.asarray(params.cell_axis, np.float32)
    cm = ((cm - np.median(cm)) / max(float(np.percentile(cm[seed], 50) - np.median(cm)), 1e-3)).astype(np.float32)
    cell = _grow_cell(seed, cm, dark, params, scale, 1.0)
    # a boundary that leaked into noisy / dark background is ragged, much larger than the nucleus and
    # unstable: retry with a smoother map and more background markers; a ragged cell that the retry
    # reproduces is a real (spiky) shape, one that still is ragged after a changed retry is a failure
    failed = False
    if _solidity(cell) < params.leak_solidity and cell.sum() > params.leak_ratio * seed.sum():
        retry = _grow_cell(seed, cm, dark, params, scale, params.leak_retry)
        if (cell & retry).sum() / max((cell | retry).sum(), 1) < params.leak_iou:
            cell = retry
            failed = _solidity(cell) < params.leak_solidity
    nucleus = _split_nucleus(cell, stain, dark, params, scale)
    seg.cell, seg.nucleus = cell, nucleus

    area = cell.sum()
    if failed:
        seg.error = f"cell boundary leaked into the background (solidity {_solidity(cell):.2f})"
    elif not params.min_cell_frac * h * w <= area <= params.max_cell_frac * h * w:
        seg.error = f"implausible cell area ({area} px)"
    elif nucleus.sum() < 10 * scale ** 2:
        seg.error = "empty nucleus"
    else:
        # two pixels wide: the watershed claims the image's outermost pixel frame for its boundary (-1), so a
        # cell cut off by the edge stops one pixel in
        border = np.zeros((h, w), bool)
        border[:2, :] = border[-2:, :] = border[:, :2] = border[:, -2:] = True
        contour = cell & ~(cv2.erode(cell.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
        frac = (contour & border).sum() / max(contour.sum(), 1)
        if frac > params.max_border_frac:
            seg.error = f"cell leaks over the image border ({frac:.0%} of its contour)"
    return seg


def _grow_cell(seed, cm, dark, params: SegParams, scale: float, strength: float) -> np.ndarray:
    """Marker watershed from the nucleus seed to the cell boundary. `strength` > 1 smooths the cell map
    more and marks more background (the retry after a leak)."""
    h, w = seed.shape
    markers = np.zeros((h, w), np.int32)
    markers[cv2.erode(seed.astype(np.uint8), _disk(1)) > 0] = 2
    # smoothing fades thin red-cell rims while the cytoplasm disk stays
    coarse = cv2.GaussianBlur(cm, (0, 0), params.cell_sigma * strength * scale)
    outside = cv2.erode((coarse < params.bg_level * strength).astype(np.uint8), _disk(2 * scale)) > 0
    markers[outside & ~seed] = 1
    # OpenCV floods by the largest channel step between neighbours: the clipped cell map (cell vs red
    # cells; the clip hides the nucleus edge) and the clipped darkness (cell vs plasma)
    clip_d = max(float(np.percentile(dark, 75)), 1e-3)
    a = np.clip(coarse, 0, params.clip_level) / params.clip_level
    if strength > 1:
        dark = cv2.GaussianBlur(dark, (0, 0), params.sigma * strength * scale)
    b = params.dark_weight * np.clip(dark, 0, clip_d) / clip_d
    cv2.watershed((np.stack([a, b, b], -1) * 120).clip(0, 255).astype(np.uint8), markers)
    cell = cv2.morphologyEx((markers == 2).astype(np.uint8), cv2.MORPH_OPEN, _disk(3 * strength * scale)) > 0
    return _fill_holes(_largest_central(cell | seed, scale))


def _split_nucleus(cell, stain, dark, params: SegParams, scale: float) -> np.ndarray:
    """K-means on the cell's (stain, darkness) pixels. The strongest cluster is nucleus, the weakest
    cytoplasm, a middle one joins the nearer; each pixel then goes to the nearer group centre, which puts
    the boundary half-way across a blurred edge (where it was drawn)."""
    feats = np.stack([stain[cell], dark[cell]], 1).astype(np.float32)
    feats /= feats.std(0) + 1e-6
    k = min(params.kmeans_k, len(feats))
    crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 1e-3)
    cv2.setRNGSeed(0)
    fit = feats[:: max(1, len(feats) // 2000)]  # centres from a subsample
    _, lbl, cent = cv2.kmeans(fit, k, None, crit, 2, cv2.KMEANS_PP_CENTERS)
    order = np.argsort(cent.sum(1))
    nuc_ids, cyto_ids = [order[-1]], [order[0]]
    if k == 3:
        mid = order[1]
        near_nuc = np.linalg.norm(cent[mid] - cent[order[2]]) < np.linalg.norm(cent[mid] - cent[order[0]])
        (nuc_ids if near_nuc else cyto_ids).append(mid)
    counts = np.bincount(lbl.ravel(), minlength=k).astype(float)
    centre = [np.average(cent[ids], axis=0, weights=counts[ids] + 1e-9) for ids in (nuc_ids, cyto_ids)]
    dist = [((feats - c) ** 2).sum(1) for c in centre]
    nuc = np.zeros(cell.shape, bool)
    nuc[cell] = dist[0] < dist[1]
    nuc = cv2.morphologyEx(nuc.astype(np.uint8), cv2.MORPH_OPEN, _disk(1.5 * scale)) > 0
    nuc = cv2.morphologyEx(nuc.astype(np.uint8), cv2.MORPH_CLOSE, _disk(1.5 * scale)) > 0
    nuc = _fill_holes(nuc) & cell
    # small specks (granules) are dropped; the lobes of one nucleus are kept
    lab, n = ndi.label(nuc)
    if n > 1:
        sizes = ndi.sum(nuc, lab, np.arange(1, n + 1))
        nuc = np.isin(lab, 1 + np.flatnonzero(sizes >= 0.05 * sizes.max()))
    return nuc


# ---------------------------------------------------------------- features

def _smooth_contour(mask: np.ndarray) -> np.ndarray | None:
    cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not cs:
        return None
    c = max(cs, key=cv2.contourArea)[:, 0, :].astype(np.float64)
    if len(c) >= 9:  # pixel staircase inflates the perimeter; smooth along the contour
        c = ndi.gaussian_filter1d(c, 1.5, axis=0, mode="wrap")
    return c


def shape_features(mask: np.ndarray) -> dict:
    """Area (pixels), perimeter, circularity, solidity, eccentricity and spikiness of the largest contour.
    Circularity and solidity use the smoothed contour's own area so that a disc scores about 1."""
    c = _smooth_contour(mask)
    area = float(mask.sum())
    if c is None or len(c) < 5:
        return dict(area=area, perimeter=np.nan, circularity=np.nan, solidity=np.nan,
                    eccentricity=np.nan, spikiness=np.nan)
    poly = c.astype(np.float32)
    perim = float(cv2.arcLength(poly, True))
    poly_area = float(cv2.contourArea(poly))
    hull_area = float(cv2.contourArea(cv2.convexHull(poly)))
    m = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    cx, cy = m["m10"] / max(m["m00"], 1), m["m01"] / max(m["m00"], 1)
    r = np.hypot(c[:, 0] - cx, c[:, 1] - cy)
    mu = np.array([[m["mu20"], m["mu11"]], [m["mu11"], m["mu02"]]]) / max(m["m00"], 1)
    ev = np.sort(np.linalg.eigvalsh(mu))
    return dict(area=area, perimeter=perim, circularity=float(4 * np.pi * poly_area / max(perim, 1e-6) ** 2),
                solidity=poly_area / max(hull_area, 1.0),
                eccentricity=float(np.sqrt(max(0.0, 1 - ev[0] / max(ev[1], 1e-9)))),
                spikiness=float(r.max() / max(np.median(r), 1e-6)))


def lobe_peaks(nucleus: np.ndarray, levels: int = 32) -> list[tuple[float, float]]:
    """(height, persistence) of every peak of the nucleus distance map (a lobe's "radius" and how far it
    rises above the saddle joining it to a higher peak; the highest peak of each piece: its height).
    A thin bridge between lobes makes a deep saddle; the ridge of a band or kidney nucleus is flat."""
    if not nucleus.any():
        return []
    ys, xs = np.nonzero(nucleus)
    crop = np.pad(nucleus[ys.min():ys.max() + 1, xs.min():xs.max() + 1], 1).astype(np.uint8)
    d = _dist(crop)
    alive: list[tuple[float, tuple]] = []  # (peak height, a pixel of the peak)
    dead: list[tuple[float, float]] = []
    for t in np.linspace(float(d.max()), 0, levels + 1)[1:]:
        n, lab = cv2.connectedComponents((d >= t).astype(np.uint8), connectivity=8)
        owner: dict[int, list] = {}
        for peak in alive:
            owner.setdefault(int(lab[peak[1]]), []).append(peak)
        for peaks in owner.values():  # peaks meeting at this level: all but the highest die here
            peaks.sort(key=lambda p: -p[0])
            dead += [(h, h - t) for h, _ in peaks[1:]]
        alive = [peaks[0] for peaks in owner.values()]
        for i in set(range(1, n)) - set(owner):  # a new peak is born
            yx = np.unravel_index(np.argmax(np.where(lab == i, d, -1)), d.shape)
            alive.append((float(d[yx]), yx))
    return [(h, h) for h, _ in alive] + dead


def count_lobes(nucleus: np.ndarray, persistence: float = 0.4, min_height: float = 0.25) -> int:
    """Peaks rising at least `persistence` x their height above their saddle and at least `min_height` x
    the thickest lobe (spurs and specks do not count)."""
    peaks = lobe_peaks(nucleus)
    top = max((h for h, _ in peaks), default=0.0)
    return int(sum(p >= persistence * h and h >= min_height * top for h, p in peaks))


def constriction(nucleus: np.ndarray, min_height: float = 0.25) -> float:
    """How deeply the nucleus is pinched between lobes: the largest relative persistence of any but the
    main peak (0 for one convex blob, 1 for separate pieces); a continuous twin of the lobe count."""
    peaks = sorted(lobe_peaks(nucleus), key=lambda hp: -hp[1])
    top = max((h for h, _ in peaks), default=0.0)
    rel = [p / h for h, p in peaks[1:] if h >= min_height * top and h > 0]
    return float(max(rel, default=0.0))


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def features(seg: Segmentation, rgb: np.ndarray, params: SegParams = SegParams()) -> dict:
    """Morphology, colour and texture features of a successful segmentation (NaN where undefined)."""
    cell, nuc, norm = seg.cell, seg.nucleus, seg.norm
    cyto = cell & ~nuc
    out = {}
    for name, m in (("cell", cell), ("nuc", nuc)):
        out.update({f"{name}_{k}": v for k, v in shape_features(m).items()})
    out["nuc_lobes"] = count_lobes(nuc, params.lobe_persistence, params.lobe_min_height)
    out["nuc_constriction"] = constriction(nuc, params.lobe_min_height)
    out["nuc_components"] = int(ndi.label(nuc)[1])
    out["nc_ratio"] = float(nuc.sum() / max(cell.sum(), 1))
    out["nuc_offset"] = float(np.linalg.norm(_centroid(nuc) - _centroid(cell)) / np.sqrt(cell.sum() / np.pi))
    for name, m in (("cell", cell), ("nuc", nuc), ("cyto", cyto)):
        if m.sum() < 5:
            out.update({f"{name}_{k}": np.nan for k in ("r", "g", "b", "intensity", "rb_ratio")})
            continue
        mean = norm[m].mean(0)
        out.update({f"{name}_r": float(mean[0]), f"{name}_g": float(mean[1]), f"{name}_b": float(mean[2]),
                    f"{name}_intensity": float(mean.mean()), f"{name}_rb_ratio": float(mean[0] / max(mean[2], 1e-3))})
    # texture on the median-filtered (noise-free) but not Gaussian-smoothed image, flat-fielded
    scale = min(rgb.shape[:2]) / 224.0
    med = cv2.medianBlur(rgb, _odd(3 * scale)).astype(np.float32) / 255.0
    grey = (med / flat_field(med, max(4, int(params.flat_block * scale)))).mean(-1)
    dog = cv2.GaussianBlur(grey, (0, 0), 1.0 * scale) - cv2.GaussianBlur(grey, (0, 0), 3.0 * scale)
    inner_cyto = cyto & (cv2.erode(cell.astype(np.uint8), _disk(2 * scale)) > 0)
    for name, m in (("cyto", inner_cyto), ("nuc", nuc)):
        ok = m.sum() >= 20
        out[f"{name}_texture"] = float(grey[m].std()) if ok else np.nan
        if name == "cyto":
            out["cyto_granularity"] = float(np.abs(dog[m]).mean()) if ok else np.nan
    return {k: out[k] for k in FEATURES}


def analyse(rgb: np.ndarray, params: SegParams = SegParams()) -> tuple[Segmentation, dict]:
    """Segmentation + feature row (`seg_ok`, `seg_error`, then FEATURES). Never raises on bad pixels."""
    try:
        seg = segment(rgb, params)
        feats = features(seg, rgb, params) if seg.ok else {}
    except (cv2.error, ValueError, IndexError, ZeroDivisionError) as e:
        seg, feats = Segmentation(error=f"segmentation crashed: {type(e).__name__}: {e}"), {}
    row = {"seg_ok": seg.ok, "seg_error": seg.error}
    row.update({k: feats.get(k, np.nan) for k in FEATURES})
    return seg, row


def read_rgb(path) -> np.ndarray | None:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _analyse_path(args) -> dict:
    path, params = args
    rgb = read_rgb(path)
    if rgb is None:
        row = {"seg_ok": False, "seg_error": "unreadable image"}
        row.update({k: np.nan for k in FEATURES})
        return row
    return analyse(rgb, params)[1]


def _init_worker():
    cv2.setNumThreads(1)


def extract_features(ids, paths, params: SegParams = SegParams(), workers: int = 1, desc: str = "morphology"):
    """Feature table (one row per ID, columns ID, seg_ok, seg_error, FEATURES); `workers` > 1 uses a
    process pool."""
    import multiprocessing as mp

    import pandas as pd

    from ..core.console import progress

    jobs = [(p, params) for p in paths]
    rows = []
    with progress() as bar:
        task = bar.add_task(desc, total=len(jobs), info="")
        if workers > 1 and len(jobs) > 1:
            # forkserver: workers start clean (forking a process that already ran OpenCV threads can hang)
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers, initializer=_init_worker) as pool:
                for row in pool.imap(_analyse_path, jobs, chunksize=16):
                    rows.append(row)
                    bar.advance(task)
        else:
            for job in jobs:
                rows.append(_analyse_path(job))
                bar.advance(task)
    df = pd.DataFrame(rows, columns=["seg_ok", "seg_error"] + FEATURES)
    df.insert(0, "ID", [str(i) for i in ids])
    return df
