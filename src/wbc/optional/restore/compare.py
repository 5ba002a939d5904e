"""Does restoration help the classifier? A run's fold models score a labelled split twice: as given, and
after the damage gate + Pix2Pix restorer (`data.restore_dir`). Results per damage-score bin, and on the
split's gate-clean images damaged by the simulator at each severity (pbcbench has no severity column).
Only the inputs change: the models are the run's own, trained without restoration."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...core.config import display_path, resolve_path
from ...core.console import print_table
from ...core.errors import WBCError
from ...core.io import write_csv, write_json
from ...core.metrics import macro_f1
from ...core.run_folder import fold_dirs, fold_index, run_dir
from ...core.runtime import pick_device
from ...models.inference import predict_probs
from ...s1_data.cache import load_images
from ...s1_data.layout import check_labels, class_list, data_root, read_splits
from ...s1_data.preprocess import build_preprocess
from ...s4_predict.fold import fold_weights, load_fold_model
from . import Restorer
from .pairs import simulate


def _inputs(cfg: dict, split: str):
    """The split's rows and images exactly as the run's models saw their inputs, minus restoration, and
    the rest of the preprocessing (stain normalisation) to apply after restoration."""
    root = data_root(cfg)
    classes = class_list(cfg, root)
    df = read_splits(root, [split])
    unl = df["labels"] == ""
    if unl.any():
        r = df[unl].iloc[0]
        raise WBCError(f"{r['csv']}:{r['row']}: no label; compare-restore needs a labelled split, not {split}")
    check_labels(df, classes)
    d = cfg["data"]
    raw_cfg = {**cfg, "data": {**d, "restore": False, "stain_norm": False}}
    post = build_preprocess({**cfg, "data": {**d, "restore": False}},
                            lambda: load_images(raw_cfg, read_splits(root, d["train_splits"][:1])))
    return df.reset_index(drop=True), classes, np.asarray(load_images(raw_cfg, df)), post


def _score(y: np.ndarray, pred: np.ndarray, n: int) -> dict:
    return {"macro_f1": macro_f1(y, pred, n) if len(y) else float("nan"),
            "accuracy": float((y == pred).mean()) if len(y) else float("nan")}


def _delta_ci(y, a, b, n, rng, draws: int) -> list[float]:
    """Paired bootstrap 95 % interval of macro-F1(b) - macro-F1(a) over images."""
    if len(y) < 2:
        return [float("nan")] * 2
    d = []
    for _ in range(draws):
        i = rng.integers(0, len(y), len(y))
        d.append(macro_f1(y[i], b[i], n) - macro_f1(y[i], a[i], n))
    return [float(v) for v in np.percentile(d, [2.5, 97.5])]


def compare_restore(cfg: dict, split: str | None = None, severities=(1, 2, 3), n_bins: int = 3, tta: int | None = None,
                    seed: int = 0, bootstrap: int = 1000) -> dict:
    """Writes `<run>/restore_<split>.{json,csv}` (the CSV: one row per ID and condition) and returns the report."""
    d = cfg["data"]
    split = split or (d.get("holdout_splits") or [None])[0]
    if not split:
        raise WBCError("compare-restore: no split given and data.holdout_splits is empty")
    run = run_dir(cfg)
    weights = fold_weights(cfg)
    folds = [f for f in fold_dirs(run) if (f / weights).exists()]
    if not folds:
        raise WBCError(f"{run}: no fold checkpoints ({weights}); train the run first")
    device = pick_device(cfg)
    restore_dir = resolve_path(d["restore_dir"])
    restorer = Restorer.load(restore_dir, device=device)
    df, classes, raw, post = _inputs(cfg, split)
    post = post or (lambda images, _split: images)
    lut = {c: i for i, c in enumerate(classes)}
    y_all = df["labels"].map(lut).to_numpy()

    # Conditions: (name, row index into df, input images, damage scores, gate mask, restored images).
    restored, scores, mask = restorer(raw)
    conds = [("given", np.arange(len(df)), raw, scores, mask, restored)]
    clean = np.flatnonzero(~mask)
    for s in severities:
        dmg = simulate(raw[clean], int(s), seed)
        r, sc, m = restorer(dmg)
        conds.append((f"severity{s}", clean, dmg, sc, m, r))

    probs: dict = {}
    for fd in folds:
        model, kw = load_fold_model(cfg, fd / weights, len(classes), device, tta)
        for name, _, x, _, m, r in conds:
            p_raw = predict_probs(model, post(x, split), desc=f"{fd.name} {name}", **kw)
            p_res = p_raw.copy()  # gate-clean images pass through unchanged, so do their predictions
            if m.any():
                p_res[m] = predict_probs(model, post(r[m], split), desc=f"{fd.name} {name} restored", **kw)
            for k, p in (("raw", p_raw), ("restored", p_res)):
                probs[name, k] = probs.get((name, k), 0) + p / len(folds)

    rng = np.random.default_rng(seed)
    rows, report = [], {"run": cfg["name"], "split": split, "restorer": display_path(restore_dir),
                        "gate_threshold": float(restorer.gate.threshold), "folds": [fold_index(f) for f in folds],
                        "tta": kw["tta"], "conditions": {}, "damage_bins": []}
    n = len(classes)
    for name, idx, _, sc, m, _ in conds:
        y = y_all[idx]
        a, b = probs[name, "raw"].argmax(1), probs[name, "restored"].argmax(1)
        report["conditions"][name] = {"n": int(len(idx)), "sent_to_restorer": float(m.mean()) if len(m) else 0.0,
                                      "raw": _score(y, a, n), "restored": _score(y, b, n),
                                      "delta_macro_f1_ci95": _delta_ci(y, a, b, n, rng, bootstrap)}
        rows.append(pd.DataFrame({"ID": df["ID"].to_numpy()[idx], "condition": name,
                                  "label": df["labels"].to_numpy()[idx],
                                  "damage_score": sc, "restored": m.astype(int), "pred_raw": np.array(classes)[a],
                                  "pred_restored": np.array(classes)[b],
                                  "p_true_raw": probs[name, "raw"][np.arange(len(y)), y],
                                  "p_true_restored": probs[name, "restored"][np.arange(len(y)), y]}))
        if name == "given":
            report["damage_bins"] = _bins(y, a, b, sc, m, n, n_bins, float(restorer.gate.threshold))

    write_csv(run / f"restore_{split}.csv", pd.concat(rows, ignore_index=True))
    write_json(run / f"restore_{split}.json", report)
    table = [[k, v["n"], v["sent_to_restorer"], v["raw"]["macro_f1"], v["restored"]["macro_f1"],
              v["restored"]["macro_f1"] - v["raw"]["macro_f1"], v["raw"]["accuracy"], v["restored"]["accuracy"]]
             for k, v in report["conditions"].items()]
    table += [[f"score {b['range']}", b["n"], b["sent_to_restorer"], b["raw"]["macro_f1"],
               b["restored"]["macro_f1"], b["restored"]["macro_f1"] - b["raw"]["macro_f1"], b["raw"]["accuracy"],
               b["restored"]["accuracy"]] for b in report["damage_bins"]]
    print_table(f"{cfg['name']} on {split}: without vs with restoration ({display_path(restore_dir)})",
                ["condition", "n", "restored", "F1 raw", "F1 restored", "delta", "acc raw", "acc restored"], table)
    return report


def _bins(y, a, b, scores, mask, n, n_bins, threshold) -> list[dict]:
    """Gate-clean images, then the gated ones in `n_bins` damage-score quantile bins."""
    groups = [(f"<= {threshold:.2f} (clean)", ~mask)]
    dmg = scores[mask]
    if len(dmg):
        edges = np.quantile(dmg, np.linspace(0, 1, n_bins + 1))
        for i in range(n_bins):
            lo, hi = edges[i], edges[i + 1]
            sel = mask & (scores >= lo) & ((scores <= hi) if i == n_bins - 1 else (scores < hi))
            groups.append((f"{lo:.2f}-{hi:.2f}", sel))
    return [{"range": r, "n": int(s.sum()), "sent_to_restorer": float(mask[s].mean()) if s.any() else 0.0,
             "raw": _score(y[s], a[s], n), "restored": _score(y[s], b[s], n)} for r, s in groups]
