"""Per-fold predictions: the fold model's probabilities for its held-out pool images (OOF), eval and test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core import hooks
from ..core.checkpoint import load_weights
from ..core.config import dataset_name, display_path, get_dotted, resolve_path
from ..core.console import print_table
from ..core.errors import WBCError
from ..core.io import Probs, read_json, save_probs, write_json
from ..core.metrics import save_confusion_png, summary
from ..core.run_folder import check_fold_record, fold_dir, outputs_together, run_dir
from ..core.runtime import device_precision, pick_device
from ..models.factory import create_model, model_data_config
from ..models.inference import predict_probs
from ..s1_data.layout import folds_path
from ..s3_train import distributed
from ..s3_train.inputs import FoldData, Rows
from ..s3_train.sampling import sampled_class_mix

FOLD_PREDICTIONS = ("oof.csv", "eval.csv", "test.csv", "prediction.json", "confusion_oof.png")


def checkpoint_run(cfg: dict):
    """The run folder whose fold checkpoints `predict` uses: `predict.checkpoints`, else the run itself."""
    src = cfg["predict"]["checkpoints"]
    return resolve_path(src) if src else run_dir(cfg)


def fold_weights(cfg: dict) -> str:
    """The checkpoint file each fold predicts with: `predict.weights` best | last."""
    w = cfg["predict"]["weights"]
    if w not in ("best", "last"):
        raise WBCError(f"predict.weights must be best or last, got {w!r}")
    return f"{w}.pt"


# Settings a fold's prediction.json names only when they are on, with what their absence means (a fold adapted before
# the guard existed was adapted without it).
_RECORDED_WHEN_ON = {"color_tta": 1, "adapt_bn_guard": "none"}


def prediction_settings(cfg: dict) -> dict:
    """What a fold's predictions were made with; `predict` re-predicts a fold whose recorded settings differ."""
    p = cfg["predict"]
    rec = {"weights": fold_weights(cfg), "checkpoints": display_path(checkpoint_run(cfg)), "tta": int(p["tta"]),
           "adapt_bn": float(p["adapt_bn"] or 0)}
    if int(p["color_tta"]) != 1:  # recorded only when on: folds predicted before it existed stay current
        rec["color_tta"] = int(p["color_tta"])
    if rec["adapt_bn"]:
        rec["adapt_bn_guard"] = p["adapt_bn_guard"]
    return rec


def predictions_current(cfg: dict, fold_dir) -> bool:
    """True when `fold_dir` holds predictions made with this config's settings. Folds predicted before the
    settings were recorded count as best.pt predictions of unknown TTA."""
    if not (fold_dir / "oof.csv").exists():
        return False
    rec = fold_dir / "prediction.json"
    done = read_json(rec) if rec.exists() else {"weights": "best.pt"}
    now = prediction_settings(cfg)
    if any(done.get(k, off) != now.get(k, off) for k, off in _RECORDED_WHEN_ON.items()):
        return False
    return all(done[k] == now[k] for k in done if k in now)


def training_mix(cfg: dict, pool, fold: int, classes) -> np.ndarray:
    """The class mix fold `fold`'s training batches were drawn with (its training rows of `pool`, a table with
    labels and fold, under `train.sampler`), in the model's class order: what BatchNorm adaptation's guard aims at."""
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[c] for c, f in zip(pool["labels"], pool["fold"]) if int(f) != fold and c in index]
    return sampled_class_mix(np.asarray(labels, dtype=np.int64), len(classes), cfg["train"]["sampler"])


def load_fold_model(cfg: dict, weights, n_classes: int, device, tta: int | None = None):
    """A fold checkpoint on `device`, and the `predict_probs` keywords that go with it (normalisation, TTA,
    batch size, AMP)."""
    check_fold_record(Path(weights).parent, weights=Path(weights))  # another fold's copy would leak its OOF
    model = create_model({**cfg["model"], "pretrained": False, "pretrained_file": None}, n_classes,
                         cfg["data"]["image_size"])
    load_weights(weights, model)
    prec = device_precision(cfg["train"], device)
    model.to(device)
    if prec["channels_last"]:
        model.to(memory_format=torch.channels_last)
    norm = model_data_config(model)
    p = cfg["predict"]
    return model, dict(device=device, mean=norm["mean"], std=norm["std"], tta=int(tta or p["tta"]),
                       batch_size=int(p["batch_size"]), amp=prec["amp"], channels_last=prec["channels_last"],
                       color_tta=int(p["color_tta"]))


def predict_fold(cfg: dict, fold: int, data: FoldData, device=None) -> dict:
    """Probabilities of fold `fold`'s model for its held-out pool images, the eval split and the test split."""
    device = device or pick_device(cfg)
    out = fold_dir(run_dir(cfg), fold)
    classes, n_cls = data.classes, len(data.classes)
    source = fold_dir(checkpoint_run(cfg), fold)
    check_fold_record(source, folds_path(cfg))  # trained on these folds, or its OOF rows were training rows
    model, kw = load_fold_model(cfg, source / fold_weights(cfg), n_cls, device)
    p = cfg["predict"]
    adapt = hooks.enabled("predict_adapt", cfg)
    prior = training_mix(cfg, data.pool, fold, classes) if adapt else None

    def predict(images, desc):
        m = model  # an optional step may adapt it to each split alone first (no labels used)
        for step in adapt:
            m = step.adapt(m, images, cfg, int(cfg["seed"]), desc, prior=prior, **kw)
        # under torchrun each process predicts a share of the rows; every process gets them all back in order
        return distributed.predict_rows(lambda rows: predict_probs(m, rows, desc=desc, **kw), images)

    va = data.pool["fold"].to_numpy() == fold
    pool_va = data.pool[va]
    oof = Probs(pool_va["ID"], predict(Rows(data.pool_images, np.flatnonzero(va)), "oof"),
                classes, np.full(int(va.sum()), fold), pool_va["labels"])
    ev = None if data.holdout_images is None else Probs(data.holdout["ID"], predict(data.holdout_images, "eval"),
                                                        classes, labels=data.holdout["labels"])
    te = None if data.test_images is None else Probs(data.test["ID"], predict(data.test_images, "test"), classes,
                                                     labels=data.test["labels"])
    # Scores count the images labelled with one of the model's classes (all of them, except in a specialist).
    y, k = oof.label_index(), oof.label_index() >= 0
    result = {"fold": fold, "oof": summary(y[k], oof.probs[k].argmax(1), classes)}
    if ev is not None and (ev.label_index() >= 0).any():  # an unlabelled eval split has no score, not a score of 0
        ye = ev.label_index()
        result["eval"] = summary(ye[ye >= 0], ev.probs[ye >= 0].argmax(1), classes)
    if not distributed.is_main():  # rank 0 writes
        return result
    with outputs_together(out, FOLD_PREDICTIONS):
        save_confusion_png(out / "confusion_oof.png", y[k], oof.probs[k].argmax(1), classes,
                           f"{cfg['name']} on {dataset_name(cfg)}, fold {fold} OOF: macro-F1 "
                           f"{result['oof']['macro_f1']:.4f}")
        for name, probs in (("eval.csv", ev), ("test.csv", te)):
            if probs is not None:
                save_probs(out / name, probs)
        write_json(out / "prediction.json", prediction_settings(cfg))
        save_probs(out / "oof.csv", oof)  # last: `predict` takes a fold with oof.csv as done
    rows = [["OOF (this fold)", result["oof"]["macro_f1"]]]
    if "eval" in result:
        rows.append(["phase2_eval", result["eval"]["macro_f1"]])
    title = (f"{cfg['name']} fold {fold} ({fold_weights(cfg)}, TTA x{p['tta']}"
             + "".join(f", {s} {get_dotted(cfg, s)}" for s in hooks.switched_on("predict_adapt", cfg)) + ")")
    print_table(title, ["split", "macro-F1"], rows)
    return result
