"""`make shift`: how would each run score on the target split's mix of damage?

For every run (a training run, an ensemble or a refinement folder) the report gives its OOF macro-F1 as is and
importance-weighted towards the target, the OOF macro-F1 per damage-score bin (bins = the target's tertiles),
and the same for the hold-out split. When the target is itself labelled (the hold-out split, optionally only its
most damaged images: `--target-quantile`), it also gives the run's actual score there, which validates the
estimator: that is the check to run before trusting it on the unlabelled test split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ...core.config import dataset_name, display_path, resolve_path
from ...core.console import console, print_table
from ...core.errors import WBCError
from ...core.io import atomic_path, load_probs, write_csv, write_json
from ...core.metrics import macro_f1
from ...core.run_folder import require_complete
from ...s1_data.layout import check_labels, class_list, data_root, read_splits
from ...s2_folds.folds import load_folds
from ..restore.score import FEATURES, fit_reference, score_features
from .features import damage_feature_table, features_path, shift_dir
from .weights import domain_weights


def run_predictions(run: Path, part: str) -> pd.Series:
    """Predicted class code by ID for `part` (oof / eval) of a run: its decisions when present, else the argmax of
    its probabilities (`<part>.csv`). An ensemble's or refinement's OOF decisions are its nested held-out ones
    (`oof_nested_pred.csv`): its `oof_pred.csv` was tuned on those very rows."""
    nested = run / "oof_nested_pred.csv"
    pred = nested if part == "oof" and nested.exists() else run / f"{part}_pred.csv"
    if pred.exists():
        df = pd.read_csv(pred, dtype=str, keep_default_na=False)
        if list(df.columns[:2]) != ["ID", "labels"]:
            raise WBCError(f"{pred}:1: expected columns ID,labels, found {','.join(df.columns)}")
        return pd.Series(df["labels"].to_numpy(), index=df["ID"].to_numpy())
    p = load_probs(run / f"{part}.csv")
    return pd.Series(np.array(p.classes)[p.probs.argmax(1)], index=p.ids)


def _aligned(pred: pd.Series, ids, path: Path) -> np.ndarray:
    missing = pd.Index(ids).difference(pred.index)
    if len(missing):
        raise WBCError(f"{path}: {len(missing)} IDs missing, e.g. {missing[0]}")
    return pred.loc[list(ids)].to_numpy()


def _bootstrap(y, p, w, n, draws: int, rng) -> list[float]:
    """95 % interval of the weighted macro-F1 over images resampled with their weights."""
    vals = []
    for _ in range(draws):
        i = rng.integers(0, len(y), len(y))
        vals.append(macro_f1(y[i], p[i], n, w[i]))
    return [float(v) for v in np.percentile(vals, [2.5, 97.5])]


def _target_rows(all_rows: pd.DataFrame, score: np.ndarray, target: str, quantile: float) -> np.ndarray:
    """Boolean mask over `all_rows`: the target split, only its images at or above the score quantile."""
    sel = (all_rows["split"] == target).to_numpy().copy()
    if quantile > 0:
        sel &= score >= np.quantile(score[sel], quantile)
    return sel


def _histogram_png(path: Path, groups: list[tuple[str, np.ndarray, np.ndarray | None]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allv = np.concatenate([np.log1p(v) for _, v, _ in groups])
    bins = np.linspace(allv.min(), allv.max(), 40)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for name, v, w in groups:
        ax.hist(np.log1p(v), bins, weights=w, density=True, histtype="step", lw=1.5, label=name)
    ax.set_xlabel("log(1 + damage score)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def shift_report(cfg: dict, runs: list, target: str | None = None, quantile: float = 0.0, cap: float = 20.0,
                 clean_split: str = "phase1", workers: int = 2, bootstrap: int = 200, seed: int = 0) -> dict:
    d = cfg["data"]
    for r in runs:  # before the feature work: a killed merge's folder is refused
        require_complete(resolve_path(r), "make predict")
    target = target or d["test_split"]
    pool_splits, holdout = list(d["train_splits"]), (d.get("holdout_splits") or [None])[0]
    if target in pool_splits:
        raise WBCError(f"shift target '{target}' is part of the training pool {pool_splits}: pick another split")
    if not 0 <= quantile < 1:
        raise WBCError(f"--target-quantile must be in [0, 1), got {quantile}")
    root = data_root(cfg)
    classes = class_list(cfg, root)
    lut = {c: i for i, c in enumerate(classes)}
    n = len(classes)
    folds = load_folds(cfg)
    splits = list(dict.fromkeys(pool_splits + [s for s in (holdout, target, clean_split) if s]))
    rows = read_splits(root, splits)
    check_labels(rows, classes)
    feats = damage_feature_table(cfg, rows, workers)[list(FEATURES)].to_numpy()

    clean = (rows["split"] == clean_split).to_numpy()
    if not clean.any():
        raise WBCError(f"shift: clean split '{clean_split}' has no images")
    score = score_features(feats, fit_reference(feats[clean]))
    tgt = _target_rows(rows, score, target, quantile)
    pool = rows["split"].isin(pool_splits).to_numpy()
    pool_ids = rows["ID"].to_numpy()[pool]
    if set(pool_ids) != set(folds["ID"]):
        raise WBCError(f"shift: the folds file does not cover the training pool {pool_splits}; rerun `make folds`")
    y_pool = folds.set_index("ID").loc[pool_ids, "labels"].map(lut).to_numpy()
    sw = domain_weights(feats[pool], feats[tgt], cap=cap, seed=seed)
    edges = np.quantile(score[tgt], [1 / 3, 2 / 3])
    bin_of = np.digitize(score, edges)  # 0 light, 1 middle, 2 heavy (by the target's tertiles)

    ho = None
    # the hold-out's labelled rows only: an unlabelled one would be scored as one more class
    hmask = ((rows["split"] == holdout) & (rows["labels"] != "")).to_numpy()
    if holdout and holdout != target and hmask.any():
        ho = {"mask": hmask, "ids": rows["ID"].to_numpy()[hmask],
              "y": rows.loc[hmask, "labels"].map(lut).to_numpy(),
              "w": domain_weights(feats[hmask], feats[tgt], cap=cap, seed=seed)}
    labelled_target = target == holdout and (rows.loc[tgt, "labels"] != "").all()

    tag = target + (f"_q{round(quantile * 100):02d}" if quantile else "")
    out = shift_dir(cfg) / f"{dataset_name(cfg)}_{tag}"
    wdf = pd.DataFrame({"ID": pool_ids, "split": rows["split"].to_numpy()[pool], "damage_score": score[pool],
                        "weight": sw.weights})
    if ho:
        wdf = pd.concat([wdf, pd.DataFrame({"ID": ho["ids"], "split": holdout, "damage_score": score[ho["mask"]],
                                            "weight": ho["w"].weights})], ignore_index=True)
    write_csv(out / "weights.csv", wdf)

    rng = np.random.default_rng(seed)
    report = {"dataset": dataset_name(cfg), "target": target, "target_quantile": quantile, "n_target": int(tgt.sum()),
              "features": display_path(features_path(cfg)), "cap": cap,
              "pool": {"n": int(pool.sum()), "domain_auc": sw.auc, "ess": sw.ess, "capped": sw.capped},
              "bin_edges": [float(e) for e in edges],
              "pool_share_per_bin": [float((bin_of[pool] == b).mean()) for b in range(3)], "runs": {}}
    if ho:
        report["holdout"] = {"split": holdout, "n": int(len(ho["ids"])), "domain_auc": ho["w"].auc, "ess": ho["w"].ess,
                             "capped": ho["w"].capped}
    for r in runs:
        run = resolve_path(r)
        p = np.array([lut.get(c, -1) for c in _aligned(run_predictions(run, "oof"), pool_ids, run / "oof")])
        res = {"oof": macro_f1(y_pool, p, n), "oof_weighted": macro_f1(y_pool, p, n, sw.weights),
               "oof_weighted_ci95": _bootstrap(y_pool, p, sw.weights, n, bootstrap, rng),
               "oof_per_bin": [macro_f1(y_pool[bin_of[pool] == b], p[bin_of[pool] == b], n) for b in range(3)]}
        if ho or labelled_target:
            e = run_predictions(run, "eval")
            if ho:
                pe = np.array([lut.get(c, -1) for c in _aligned(e, ho["ids"], run / "eval")])
                res["holdout"] = macro_f1(ho["y"], pe, n)
                res["holdout_weighted"] = macro_f1(ho["y"], pe, n, ho["w"].weights)
            if labelled_target:
                ids = rows["ID"].to_numpy()[tgt]
                yt = rows.loc[tgt, "labels"].map(lut).to_numpy()
                pt = np.array([lut.get(c, -1) for c in _aligned(e, ids, run / "eval")])
                res["target_actual"] = macro_f1(yt, pt, n)
                # Each OOF image is predicted by one fold model, the run's eval by their mean: the like-for-like
                # check of the estimate is the mean score of the single fold models.
                single = {f.parent.name: macro_f1(yt, np.array([lut.get(c, -1) for c in _aligned(
                    run_predictions(f.parent, "eval"), ids, f)]), n) for f in sorted(run.glob("fold*/eval.csv"))}
                if single:
                    res["target_actual_single_fold"] = float(np.mean(list(single.values())))
                    res["target_actual_per_fold"] = single  # for paired comparisons of runs, fold by fold
        report["runs"][display_path(run).removeprefix("outputs/")] = res
    if labelled_target:
        report["validation"] = _validation(report["runs"])
    write_json(out / "report.json", report)
    groups = [("pool", score[pool], None), ("pool weighted", score[pool], sw.weights), (tag, score[tgt], None)]
    _histogram_png(out / "damage_scores.png", groups)
    _print(report, tag, ho is not None, labelled_target)
    console.print(f"weights, report and histogram: {display_path(out)}/", highlight=False)
    return report


def _validation(runs: dict) -> dict | None:
    """How well plain and weighted OOF predict the target's actual score, over the runs that have single-fold
    scores there (the like-for-like comparison): mean error (bias) and mean absolute error."""
    rs = [r for r in runs.values() if "target_actual_single_fold" in r]
    if not rs:
        return None
    actual = np.array([r["target_actual_single_fold"] for r in rs])
    out = {"n_runs": len(rs)}
    for key in ("oof", "oof_weighted"):
        err = np.array([r[key] for r in rs]) - actual
        out[key] = {"bias": float(err.mean()), "mae": float(np.abs(err).mean())}
    return out


def _print(report: dict, tag: str, has_holdout: bool, labelled: bool) -> None:
    pool = report["pool"]
    console.print(f"pool -> {tag}: domain AUC {pool['domain_auc']:.3f}, "
                  f"effective sample size {pool['ess']:.0f} of {pool['n']} ({pool['capped']} capped); "
                  f"pool share in the target's damage tertiles "
                  + " / ".join(f"{s:.2f}" for s in report["pool_share_per_bin"]), highlight=False)
    cols = ["run", "OOF", f"OOF -> {tag}", "95 % CI", "OOF light", "OOF mid", "OOF heavy"]
    cols += ["hold-out", f"hold-out -> {tag}"] if has_holdout else []
    cols += [f"actual {tag}", "actual, single folds"] if labelled else []
    rows = []
    for name, r in report["runs"].items():
        row = [name, r["oof"], r["oof_weighted"], "{:.3f}-{:.3f}".format(*r["oof_weighted_ci95"]), *r["oof_per_bin"]]
        row += [r["holdout"], r["holdout_weighted"]] if has_holdout else []
        row += [r["target_actual"], r.get("target_actual_single_fold", "-")] if labelled else []
        rows.append(row)
    print_table(f"macro-F1 as measured and re-weighted to {tag}'s damage", cols, rows, floatfmt="{:.3f}")
    v = report.get("validation")
    if v:
        console.print(f"estimate - actual (single folds) over {v['n_runs']} run(s): plain OOF bias "
                      f"{v['oof']['bias']:+.3f}, MAE {v['oof']['mae']:.3f}; weighted OOF bias "
                      f"{v['oof_weighted']['bias']:+.3f}, MAE {v['oof_weighted']['mae']:.3f}", highlight=False)
