"""The `morph` (features + QA sheet + separation table) and `refine` (rare-class rescue) commands."""
from __future__ import annotations

from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.config import display_path, resolve_path
from ..core.console import console, print_table
from ..core.errors import WBCError, where
from ..core.io import Probs, load_probs, read_csv, read_json_or_none, save_probs, write_csv, write_json
from ..core.metrics import macro_f1, save_confusion_png, summary
from ..core.run_folder import outputs_together, require_complete
from .gaussian import FeatureScaler
from .morphology import FEATURES, SegParams, extract_features
from .qa import qa_sheet, separation_table
from .rule import (
    Settings,
    apply_hard,
    fit_gaussians,
    fit_hard,
    fit_soft,
    nested,
    new_evidence,
    oof_evidence,
    soft_probs,
)

SPLIT_NAMES = {"oof": "oof", "eval": "phase2_eval", "test": "phase2_test"}
METHODS = ("before", "hard", "soft")


# ---------------------------------------------------------------- morph

def seg_params(cfg: dict) -> SegParams:
    over = cfg["morph"]["seg"] or {}
    known = {f.name for f in fields(SegParams)}
    bad = sorted(set(over) - known)
    if bad:
        raise WBCError(f"morph.seg: unknown key(s) {', '.join(bad)} (known: {', '.join(sorted(known))})")
    return replace(SegParams(), **over)


def morph_paths(cfg: dict) -> dict:
    from ..core.config import dataset_name

    out = resolve_path(cfg["morph"]["out_dir"])
    ds = dataset_name(cfg)
    return {"features": out / f"{ds}_features.csv", "meta": out / f"{ds}_features.json",
            "qa": out / f"{ds}_qa.png", "separation": out / f"{ds}_separation.json"}


def cached_features(df: pd.DataFrame, params: SegParams, paths: dict, workers: int, force: bool) -> pd.DataFrame:
    """Features for every row of `df` (ID, labels, split, path); rows already in the cache with the same
    segmentation parameters are reused, the rest computed and the cache rewritten."""
    old = None
    meta = paths["meta"]
    if not force and paths["features"].exists() and meta.exists():
        if (read_json_or_none(meta) or {}).get("key") == params.key():  # unreadable: recomputed
            old = pd.read_csv(paths["features"], dtype={"ID": str, "labels": str, "seg_error": str},
                              keep_default_na=False, na_values=[""])
            old = old[old["ID"].isin(df["ID"])]
    todo = df if old is None else df[~df["ID"].isin(old["ID"])]
    if len(todo):
        console.print(f"morphology: {len(todo)} image(s) to segment ({len(df) - len(todo)} cached)")
        new = extract_features(todo["ID"], todo["path"], params, workers)
        feats = new if old is None else pd.concat([old[new.columns], new], ignore_index=True)
    else:
        feats = old[["ID", "seg_ok", "seg_error"] + FEATURES]
    feats["seg_ok"] = feats["seg_ok"].astype(str).str.lower().isin(["true", "1"])
    feats["seg_error"] = feats["seg_error"].fillna("").astype(str)
    feats = df[["ID", "split", "labels"]].merge(feats, on="ID", how="left")
    if len(todo):
        write_csv(paths["features"], feats)
        write_json(meta, {"key": params.key(), "seg_params": asdict(params), "n": len(feats)})
    return feats


def run_morph(cfg: dict) -> dict:
    from ..s1_data.layout import SPLITS, class_list, data_root, read_splits

    mc = cfg["morph"]
    root = data_root(cfg)
    unknown = [s for s in mc["splits"] if s not in SPLITS]
    if unknown:
        raise WBCError(f"morph.splits: unknown split(s) {', '.join(map(str, unknown))} (one of {', '.join(SPLITS)})")
    splits = [s for s in mc["splits"] if (root / SPLITS[s][0]).exists()]
    if not splits:
        raise WBCError(f"{root}: none of the splits {', '.join(mc['splits'])} exists")
    df = read_splits(root, splits)
    params, paths = seg_params(cfg), morph_paths(cfg)
    feats = cached_features(df, params, paths, int(mc["workers"]), bool(mc["force"]))
    console.print(f"wrote {paths['features']}")

    fail = feats.groupby("split")["seg_ok"].agg(lambda s: float((~s).mean()))
    print_table("segmentation failures", ["split", "images", "failed"],
                [[s, int((feats["split"] == s).sum()), f"{fail[s]:.1%}"] for s in splits])
    errors = feats.loc[~feats["seg_ok"], "seg_error"].str.replace(r"\(.*\)", "", regex=True).str.strip()
    failed = feats.loc[~feats["seg_ok"]].merge(df[["ID", "csv", "row"]], on="ID", how="left")
    for err, n in errors.value_counts().items():
        first = failed[errors.to_numpy() == err].iloc[0]  # where to look: the first such image's file and row
        console.print(f"  {n:5d}  {err} (first: {first['ID']}, {where(first['csv'], first['row'])})", highlight=False)

    qa_df = df.merge(feats[["ID", "seg_ok"]], on="ID")
    qa_sheet(qa_df, paths["qa"], int(mc["qa_per_class"]), int(mc["qa_tile"]), params, int(cfg["seed"]))
    console.print(f"wrote {paths['qa']}")

    classes = class_list(cfg, root)
    lab = feats[(feats["labels"] != "") & feats["seg_ok"]]
    sep = separation_table(lab, lab["labels"].to_numpy(), classes)
    write_json(paths["separation"], sep)
    rows = [[f, v["fisher_ratio"], v["anova_f"], v["most_distinct_class"],
             f"{v['class_mean'][v['most_distinct_class']]:.3g}"] for f, v in sep.items()]
    print_table("class separation (labelled images, classes weighted equally)",
                ["feature", "Fisher ratio", "ANOVA F", "most distinct", "its mean"], rows, floatfmt="{:.3f}")
    console.print(f"wrote {paths['separation']}")
    return {"features": feats, "separation": sep, "paths": paths}


# ---------------------------------------------------------------- refine

def base_decider(pred_dir: Path, classes: list[str]):
    """The tuned decision rule of an ensemble folder (`decision.json`), else argmax."""
    path = pred_dir / "decision.json"
    if not path.exists():
        return (lambda p: np.asarray(p).argmax(1)), "argmax"
    from ..s5_ensemble.decision import apply_rule, load_rule

    rule = load_rule(path)
    if list(rule["classes"]) != list(classes):
        raise WBCError(f"{path}: rule classes {rule['classes']} differ from the predictions' {classes}")
    return (lambda p: apply_rule(p, rule)), f"decision rule ({path.name})"


def rare_classes(rc: dict, classes: list[str], y: np.ndarray) -> list[str]:
    given = rc["rare_classes"]
    if given:
        bad = [c for c in given if c not in classes]
        if bad:
            raise WBCError(f"refine.rare_classes: unknown class(es) {', '.join(bad)} (classes: {', '.join(classes)})")
        return list(given)
    prior = np.bincount(y, minlength=len(classes)) / max(len(y), 1)
    cut = np.quantile(prior, float(rc["rare_quantile"]))
    return [c for c, p in zip(classes, prior) if p < cut]


def _load_preds(pred_dir: Path):
    require_complete(pred_dir, "make predict / make ensemble")
    oof = load_probs(pred_dir / "oof.csv")
    if oof.folds is None or oof.labels is None:
        raise WBCError(f"{pred_dir / 'oof.csv'}: needs fold and labels columns (an out-of-fold file)")
    if len(np.unique(oof.folds)) < 2:
        raise WBCError(f"{pred_dir / 'oof.csv'}: out-of-fold predictions of fold {oof.folds[0]} only; the "
                       f"refinement fits and checks on other folds, so predict at least 2 folds")
    bad = np.flatnonzero(oof.label_index() < 0)
    if len(bad):
        raise WBCError(f"{pred_dir / 'oof.csv'}:{bad[0] + 2}: label '{oof.labels[bad[0]]}' is not a class")
    out = {"oof": oof}
    for split in ("eval", "test"):
        if (pred_dir / f"{split}.csv").exists():
            p = load_probs(pred_dir / f"{split}.csv")
            if p.classes != oof.classes:
                raise WBCError(f"{pred_dir / f'{split}.csv'}: classes {p.classes} differ from oof.csv's")
            out[split] = p
    return out


def _feature_rows(feats: pd.DataFrame, ids, path) -> pd.DataFrame:
    idx = feats.set_index("ID")
    missing = [i for i in ids if i not in idx.index]
    if missing:
        raise WBCError(f"{path}: {len(missing)} prediction ID(s) have no morphology features, e.g. "
                       f"{missing[0]} (run `make morph` on the same data)")
    return idx.loc[list(ids)].reset_index()


def _load_features(cfg: dict, columns: list[str]) -> tuple[pd.DataFrame, Path]:
    path = morph_paths(cfg)["features"]
    feats = read_csv(path, "morphology features file (run `make morph` first)",
                     dtype={"ID": str, "labels": str, "seg_error": str}, keep_default_na=False, na_values=[""])
    unknown = sorted(set(columns) - set(feats.columns))
    if unknown:
        raise WBCError(f"{path}: no column(s) {', '.join(unknown)} (re-run `make morph`)")
    feats["seg_ok"] = feats["seg_ok"].astype(str).str.lower().isin(["true", "1"])
    return feats, path


def _settings(cfg: dict, classes: list[str], y: np.ndarray) -> Settings:
    rc = cfg["refine"]
    return Settings(classes, rare_classes(rc, classes, y), rc["search"], int(rc["n_trials"]), int(cfg["seed"]),
                    int(rc["shape_top"]), int(rc["min_samples"]), str(rc["fallback"]))


def run_refine(cfg: dict) -> dict:
    from ..s1_data.layout import data_root

    rc = cfg["refine"]
    if not rc["predictions"]:
        raise WBCError("refine.predictions: no predictions folder given (an ensemble or run output folder)")
    pred_dir = resolve_path(rc["predictions"])
    if not pred_dir.is_dir():
        raise WBCError(f"{pred_dir}: predictions folder not found")
    preds = _load_preds(pred_dir)
    oof = preds["oof"]
    classes = oof.classes
    submit = rc["submit"] and "test" in preds
    if submit:
        from ..s1_data.submission import submission_classes

        sub_classes = submission_classes(cfg, classes, pred_dir)  # before any output is written
    y = oof.label_index()
    decide, base_name = base_decider(pred_dir, classes)
    columns = list(rc["features"] or FEATURES)
    shape_names = list(rc["shape_features"])
    feats, fpath = _load_features(cfg, columns + shape_names)
    rows = {k: _feature_rows(feats, p.ids, pred_dir / f"{k}.csv") for k, p in preds.items()}
    scaler = FeatureScaler(columns).fit(rows["oof"][rows["oof"]["seg_ok"]])  # unsupervised: no label leak
    x = {k: scaler.transform(r) for k, r in rows.items()}
    shape = {k: r[shape_names].apply(pd.to_numeric, errors="coerce").to_numpy(float) for k, r in rows.items()}
    s = _settings(cfg, classes, y)
    console.print(f"refine {pred_dir}: base = {base_name}; rare classes {', '.join(s.rare) or '(none)'}")

    base = {k: decide(p.probs) for k, p in preds.items()}
    ev = {"oof": oof_evidence(x["oof"], y, oof.folds, oof.probs, base["oof"], shape["oof"], shape_names, s)}
    hard_params, _ = fit_hard(ev["oof"], y, classes, s.rare, s.search, s.n_trials, s.seed, s.shape_top)
    weight, _ = fit_soft(ev["oof"], y, decide, s.search, len(classes))
    g = fit_gaussians(x["oof"], y, s)
    for k in preds.keys() - {"oof"}:
        ev[k] = new_evidence(g, x[k], preds[k].probs, base[k], shape[k], shape_names)
    soft = {k: soft_probs(e, weight) for k, e in ev.items()}
    pred = {k: {"before": base[k], "hard": apply_hard(e, hard_params, classes), "soft": decide(soft[k])}
            for k, e in ev.items()}

    report = {"predictions": display_path(pred_dir), "base_decision": base_name, "features_file": display_path(fpath),
              "features": columns, "shape_features": shape_names, "rare_classes": s.rare, "n_trials": s.n_trials,
              "seg_ok": {k: float(r["seg_ok"].mean()) for k, r in rows.items()},
              "covariance": dict(zip(classes, g.kinds)),
              "hard": hard_params, "soft": {"weight": weight}, "scores": {}}
    for k, p in preds.items():
        yy = p.label_index()
        if (yy >= 0).any():
            lab = yy >= 0
            report["scores"][k] = {m: _scores(yy[lab], pred[k][m][lab], classes) for m in METHODS}
    if rc["nested"]:
        nest = nested(x["oof"], y, oof.folds, oof.probs, base["oof"], shape["oof"], shape_names, decide, s)
        report["scores"]["oof_nested"] = {"before": report["scores"]["oof"]["before"],
                                          **{m: _scores(y, nest[m], classes) for m in ("hard", "soft")},
                                          "per_fold": nest["per_fold"]}
    names = {"oof": "oof (in-sample)", "oof_nested": "oof nested", "eval": "phase2_eval"}
    print_table("macro-F1 before / after refinement", ["", "before", "hard rule", "soft"],
                [[names[k]] + [report["scores"][k][m]["macro_f1"] for m in METHODS]
                 for k in ("oof", "oof_nested", "eval") if k in report["scores"]])

    method = _choose(rc["method"], report["scores"])
    report["method"] = method
    out_dir = resolve_path(cfg["output_dir"]) / "refine" / (rc["out_name"] or pred_dir.name)
    with outputs_together(out_dir, ("*.csv", "*.png", "report.json")):  # a kill leaves no mixed set
        changes = _write_outputs(out_dir, preds, pred, soft, method, classes, report)
        if rc["nested"]:  # the chosen rule fitted without each row's fold: what `make shift` scores as OOF
            if method != "none":
                held = np.asarray(classes)[nest[method]]
            elif (pred_dir / "oof_nested_pred.csv").exists():  # an ensemble's own held-out decisions
                done = read_csv(pred_dir / "oof_nested_pred.csv", "decisions", dtype=str, keep_default_na=False)
                held = done.set_index("ID")["labels"].reindex(oof.ids).to_numpy()
            else:
                held = np.asarray(classes)[base["oof"]]
            write_csv(out_dir / "oof_nested_pred.csv", pd.DataFrame({"ID": oof.ids, "labels": held}))
        _print_changes(changes, classes)

        if submit:
            from ..s1_data.submission import write_submission

            key = "before" if method == "none" else method
            scores = report["scores"]
            sidecar = {"predictions": display_path(pred_dir), "refine_dir": display_path(out_dir), "method": method,
                       "cv_macro_f1": scores.get("oof_nested", scores["oof"])[key]["macro_f1"],
                       "eval_macro_f1": scores.get("eval", {}).get(key, {}).get("macro_f1"), "report": report}
            path = write_submission(data_root(cfg), preds["test"].ids, np.asarray(classes)[pred["test"][key]],
                                    rc["submission_name"] or f"{out_dir.name}_refined", sub_classes, sidecar,
                                    out_dir=rc["submission_dir"])
            console.print(f"wrote {path}")
    return {"report": report, "out_dir": out_dir, "pred": pred, "changes": changes}


def _scores(y, pred, classes) -> dict:
    s = summary(y, pred, classes)
    return {"macro_f1": s["macro_f1"], "per_class_f1": s["per_class_f1"]}


def _choose(method: str, scores: dict) -> str:
    """auto: the rule with the better nested OOF macro-F1 (in-sample OOF without nesting), or `none`
    (keep the base decisions) when neither beats them."""
    if method in ("hard", "soft", "none"):
        return method
    if method != "auto":
        raise WBCError(f"refine.method must be auto, hard, soft or none, not {method!r}")
    sc = scores.get("oof_nested", scores["oof"])
    best = max(("hard", "soft"), key=lambda m: sc[m]["macro_f1"])
    return best if sc[best]["macro_f1"] > sc["before"]["macro_f1"] + 1e-9 else "none"


def _changes(ids, split, before, after, y, classes, method) -> pd.DataFrame:
    moved = before != after
    cls = np.asarray(classes)
    truth = np.where(y[moved] >= 0, cls[np.maximum(y[moved], 0)], "")
    return pd.DataFrame({"ID": ids[moved], "split": split, "method": method, "before": cls[before[moved]],
                         "after": cls[after[moved]], "labels": truth})


def _write_outputs(out_dir: Path, preds, pred, soft, method, classes, report) -> pd.DataFrame:
    """Soft-refined probabilities, the chosen method's decisions, changes, confusion PNGs, report."""
    cls = np.asarray(classes)
    changes = []
    for k, p in preds.items():
        save_probs(out_dir / f"{k}.csv", Probs(p.ids, soft[k], classes, p.folds, p.labels))
        write_csv(out_dir / f"{k}_pred.csv", pd.DataFrame(
            {"ID": p.ids, "labels": cls[pred[k]["before" if method == "none" else method]]}))
        yy = p.label_index()
        for m in ("hard", "soft"):
            changes.append(_changes(p.ids, SPLIT_NAMES[k], pred[k]["before"], pred[k][m], yy, classes, m))
        lab = yy >= 0
        for m in METHODS if lab.any() else ():
            save_confusion_png(out_dir / f"{k}_{m}.png", yy[lab], pred[k][m][lab], classes,
                               f"{k} {m}: macro-F1 {macro_f1(yy[lab], pred[k][m][lab], len(classes)):.4f}")
    changes = pd.concat(changes, ignore_index=True)
    write_csv(out_dir / "changes.csv", changes)
    report["changes"] = _change_counts(changes, classes)
    write_json(out_dir / "report.json", report)
    console.print(f"wrote {out_dir}")
    return changes


def _change_counts(changes: pd.DataFrame, classes) -> dict:
    """Per rule, split and class: rows moved in / out, and of the labelled rows moved in how many are right."""
    out = {}
    for (m, split), g in changes.groupby(["method", "split"]):
        per = {}
        for c in classes:
            to, frm = g[g["after"] == c], g[g["before"] == c]
            if len(to) or len(frm):
                lab = to[to["labels"] != ""]
                per[c] = {"moved_in": int(len(to)), "moved_out": int(len(frm)),
                          "in_correct": int((lab["labels"] == c).sum()), "in_labelled": int(len(lab))}
        out.setdefault(m, {})[split] = per
    return out


def _print_changes(changes: pd.DataFrame, classes) -> None:
    counts = _change_counts(changes, classes)
    rows = [[m, split, c, v["moved_in"], v["moved_out"],
             f"{v['in_correct']}/{v['in_labelled']}" if v["in_labelled"] else "-"]
            for m, per_split in counts.items() for split, per in per_split.items() for c, v in per.items()]
    if rows:
        print_table("changed predictions per class", ["rule", "split", "class", "moved in", "moved out",
                                                      "right (labelled)"], rows)
    else:
        console.print("no prediction changed")
