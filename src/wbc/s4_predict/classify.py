"""`classify`: a trained run's fold models on image files outside the dataset layout (your own cells, a new test
set). Each image is prepared as the cache prepares the training images (centre crop, resize, and the run's
restoration and stain normalisation when its config has them), predicted with the run's TTA (and BatchNorm adapted to
these images when `predict.adapt_bn` is set) by every fold model, and the folds' probabilities are averaged, as
`make predict` does for the test split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core import hooks
from ..core.config import display_path
from ..core.console import console, print_table
from ..core.errors import WBCError
from ..core.io import load_probs, write_csv
from ..core.run_folder import fold_dirs, fold_index, run_dir
from ..core.runtime import pick_device
from ..models.inference import predict_probs
from ..s1_data.cache import crop_fraction, decode_all
from ..s1_data.preprocess import build_preprocess
from ..s2_folds.folds import load_folds
from .fold import checkpoint_run, fold_weights, load_fold_model, training_mix

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def list_images(paths) -> pd.DataFrame:
    """ID (the path under a given folder, or a given file's name) and path of every image, folders searched
    recursively; duplicate IDs and paths that do not exist are refused."""
    rows = []
    for p in map(Path, paths):
        if p.is_dir():
            rows += [(f.relative_to(p).as_posix(), f) for f in sorted(p.rglob("*"))
                     if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        elif p.is_file():
            rows.append((p.name, p))
        else:
            raise WBCError(f"{p}: no such file or folder")
    if not rows:
        raise WBCError(f"no images ({' '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    df = pd.DataFrame(rows, columns=["ID", "path"])
    dup = df[df["ID"].duplicated(keep=False)]
    if len(dup):
        raise WBCError(f"ID {dup['ID'].iloc[0]} twice: {dup['path'].iloc[0]} and {dup['path'].iloc[1]}")
    return df


def _folds_or_none(cfg: dict):
    """The run's folds file (its training labels), or None with a warning when it is not here."""
    try:
        return load_folds(cfg)
    except WBCError as e:
        console.print(f"[yellow]warning:[/] {e}: the training class mix is unknown", highlight=False)
        return None


def classify(cfg: dict, paths, out: Path | None = None) -> pd.DataFrame:
    """`ID, prediction, prob_<class>...` for the images under `paths`, written to `out` (default
    outputs/<name>/classified.csv)."""
    if out is not None and Path(out).is_dir():  # before the models run, not after
        raise WBCError(f"--out {out}: a folder; give the CSV file to write (e.g. {Path(out) / 'classified.csv'})")
    source, weights = checkpoint_run(cfg), fold_weights(cfg)
    folds = [d for d in fold_dirs(source) if (d / weights).exists()]
    if not folds:
        raise WBCError(f"{source}: no fold*/{weights} to classify with (train the run first)")
    done = [d for d in folds if (d / "oof.csv").exists()]
    if not done:
        raise WBCError(f"{source}: no fold has predicted its OOF yet, so the class order is unknown (make predict)")
    classes = load_probs(done[0] / "oof.csv").classes  # the model's outputs, a specialist's subset included
    df = list_images(paths)
    size = int(cfg["data"]["image_size"])
    images = decode_all(df, size, desc="decode", crop=crop_fraction(cfg),
                        max_pixels=int(cfg["data"]["max_image_pixels"]))
    prep = build_preprocess(cfg)
    if prep is not None:
        images = prep(images, "classify")
    device = pick_device(cfg)
    adapt = hooks.enabled("predict_adapt", cfg)  # as `make predict` adapts to each split: here, to these images
    pool = _folds_or_none(cfg) if adapt else None
    probs = np.zeros((len(df), len(classes)))
    for d in folds:
        model, kw = load_fold_model(cfg, d / weights, len(classes), device)
        prior = None if pool is None else training_mix(cfg, pool, fold_index(d), classes)
        for step in adapt:
            model = step.adapt(model, images, cfg, int(cfg["seed"]), d.name, prior=prior, **kw)
        probs += predict_probs(model, images, desc=f"classify {d.name}", **kw) / len(folds)
    res = pd.DataFrame({"ID": df["ID"], "prediction": np.asarray(classes)[probs.argmax(1)]})
    res = pd.concat([res, pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])], axis=1)
    out = Path(out) if out else run_dir(cfg) / "classified.csv"
    write_csv(out, res)
    counts = res["prediction"].value_counts()
    print_table(f"{cfg['name']}: {len(res)} images, {len(folds)} fold model(s) ({weights}, TTA x{kw['tta']})",
                ["class", "predicted"], [[c, int(counts.get(c, 0))] for c in classes])
    console.print(f"wrote {display_path(out)}")
    return res
