"""Test-shift-aware validation: importance weights from a domain classifier and the re-weighted report."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from wbc.core.errors import WBCError
from wbc.core.metrics import macro_f1
from wbc.optional.shift.weights import cap_weights, domain_weights


def test_cap_weights_scale_to_mean_one_and_hold_the_cap():
    w, hit = cap_weights(np.r_[np.ones(99), 1000.0], 5.0)
    assert w.mean() == pytest.approx(1.0) and w.max() == pytest.approx(5.0) and hit == 1
    assert np.allclose(w[:99], w[0])  # the rest are only rescaled
    w, hit = cap_weights(np.array([1.0, 2.0, 3.0]), 10.0)
    assert np.allclose(w, [0.5, 1.0, 1.5]) and hit == 0


def test_domain_weights_recover_a_known_density_ratio():
    rng = np.random.default_rng(0)
    pool, target = rng.normal(size=(3000, 5)), rng.normal(size=(1500, 5))
    target[:, 0] += 1.0  # N(1, 1) vs N(0, 1) in one feature: p_t / p_p = exp(x - 0.5)
    sw = domain_weights(pool, target, cap=50.0)
    true = np.exp(pool[:, 0] - 0.5)
    assert np.corrcoef(sw.weights, true / true.mean())[0, 1] > 0.95
    assert np.average(pool[:, 0], weights=sw.weights) == pytest.approx(1.0, abs=0.12)  # unweighted: ~0
    assert 0.7 < sw.auc < 0.82  # the Bayes AUC of this shift is 0.76
    assert sw.ess < 0.7 * len(pool)


def test_no_shift_gives_near_uniform_weights():
    rng = np.random.default_rng(1)
    sw = domain_weights(rng.normal(size=(2000, 5)), rng.normal(size=(1000, 5)))
    assert sw.auc < 0.56 and sw.ess > 0.9 * 2000 and sw.capped == 0


def test_domain_probabilities_are_cross_fitted():
    # No shift, few images, many quadratic terms, weak regularisation: a classifier scoring the images it
    # was fitted on separates the domains perfectly (in-sample AUC 1.0); cross-fitted it cannot.
    rng = np.random.default_rng(3)
    sw = domain_weights(rng.normal(size=(40, 8)), rng.normal(size=(40, 8)), c=100.0)
    assert sw.auc < 0.65


def test_weighted_macro_f1_counts_an_image_w_times():
    rng = np.random.default_rng(2)
    y, p, w = rng.integers(0, 4, 200), rng.integers(0, 4, 200), rng.integers(1, 4, 200)
    assert macro_f1(y, p, 4, w) == pytest.approx(macro_f1(np.repeat(y, w), np.repeat(p, w), 4))
    assert macro_f1(y, p, 4, w) != pytest.approx(macro_f1(y, p, 4))


@pytest.fixture(scope="module")
def feature_cache(sample_root, tmp_path_factory):
    """The sample data's damage-feature cache, computed once for the module: each test copies it in."""
    from wbc.core.config import CONFIG_DIR, load_config
    from wbc.optional.shift.features import damage_feature_table, features_path
    from wbc.s1_data.layout import read_splits

    out = tmp_path_factory.mktemp("shift_features")
    cfg = load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", [f"data.root={sample_root}", f"shift.out_dir={out}"])
    damage_feature_table(cfg, read_splits(sample_root, ["phase1", "phase2_train", "phase2_eval", "phase2_test"]))
    return features_path(cfg)


@pytest.fixture
def shifted_run(sample_root, make_cfg, tmp_path, feature_cache):
    """Folds on the sample data and a fake run that is right on undamaged-looking images and wrong on damaged
    ones, so its score falls with the damage mix it is measured on."""
    import shutil

    from wbc.core.io import Probs, save_probs, write_csv
    from wbc.optional.restore.score import FEATURES, fit_reference, score_features
    from wbc.optional.shift.features import damage_feature_table, features_path
    from wbc.s1_data.layout import read_splits
    from wbc.s2_folds.folds import build_folds, folds_path

    cfg = make_cfg(sample_root, f"shift.out_dir={tmp_path / 'shift'}")
    features_path(cfg).parent.mkdir(parents=True, exist_ok=True)
    for src in (feature_cache, feature_cache.with_suffix(".json")):
        shutil.copy(src, features_path(cfg).parent / src.name)
    folds = build_folds(cfg)
    write_csv(folds_path(cfg), folds)
    rows = read_splits(sample_root, ["phase1", "phase2_train", "phase2_eval", "phase2_test"])
    f = damage_feature_table(cfg, rows)[list(FEATURES)].to_numpy()
    score = pd.Series(score_features(f, fit_reference(f[(rows["split"] == "phase1").to_numpy()])),
                      index=rows["ID"].to_numpy())
    classes = sorted(folds["labels"].unique())
    cut = np.quantile(score[rows["split"].isin(["phase1", "phase2_train"]).to_numpy()], 0.7)

    def probs(ids, labels):
        y = np.array([classes.index(c) for c in labels])
        wrong = score.loc[list(ids)].to_numpy() > cut
        return np.eye(len(classes))[np.where(wrong, (y + 1) % len(classes), y)]

    run = tmp_path / "outputs" / "fake"
    save_probs(run / "oof.csv", Probs(folds["ID"], probs(folds["ID"], folds["labels"]), classes, folds["fold"],
                                      folds["labels"]))
    ev = rows[rows["split"] == "phase2_eval"]
    for path in (run / "eval.csv", run / "fold0" / "eval.csv"):
        save_probs(path, Probs(ev["ID"], probs(ev["ID"], ev["labels"]), classes, labels=ev["labels"]))
    return cfg, run, folds


def test_report_reweights_towards_the_damaged_target(shifted_run, tmp_path):
    from wbc.optional.shift.report import shift_report

    cfg, run, folds = shifted_run
    rep = shift_report(cfg, [run], bootstrap=20)  # target: phase2_test, more damaged than the pool
    r = next(iter(rep["runs"].values()))
    assert rep["pool"]["domain_auc"] > 0.7
    assert r["oof_weighted"] < r["oof"] - 0.05
    assert r["oof_per_bin"][0] > r["oof_per_bin"][2]  # light vs heavy damage
    assert r["holdout_weighted"] < r["holdout"]
    out = tmp_path / "shift" / "sample_phase2_test"
    w = pd.read_csv(out / "weights.csv", dtype={"ID": str})
    assert list(w.columns) == ["ID", "split", "damage_score", "weight"] and not w["ID"].duplicated().any()
    pool = w[w["split"].isin(["phase1", "phase2_train"])]
    assert set(pool["ID"]) == set(folds["ID"]) and pool["weight"].mean() == pytest.approx(1.0)
    assert json.loads((out / "report.json").read_text())["runs"] and (out / "damage_scores.png").stat().st_size > 0


def test_estimate_tracks_the_actual_score_on_a_labelled_damaged_target(shifted_run):
    from wbc.optional.shift.report import shift_report

    cfg, run, _ = shifted_run
    rep = shift_report(cfg, [run], target="phase2_eval", quantile=0.5, bootstrap=20)
    r = next(iter(rep["runs"].values()))
    assert r["target_actual"] == r["target_actual_single_fold"]
    assert r["target_actual_per_fold"] == {"fold0": r["target_actual_single_fold"]}  # the fixture's one fold model
    assert abs(r["oof_weighted"] - r["target_actual"]) < abs(r["oof"] - r["target_actual"]) / 2
    v = rep["validation"]
    assert v["n_runs"] == 1 and v["oof_weighted"]["mae"] < v["oof"]["mae"] / 2
    assert v["oof"]["bias"] == pytest.approx(r["oof"] - r["target_actual_single_fold"])


def test_bad_targets_and_runs_are_refused(shifted_run, tmp_path):
    from wbc.optional.shift.report import shift_report

    cfg, run, _ = shifted_run
    with pytest.raises(WBCError, match="part of the training pool"):
        shift_report(cfg, [run], target="phase1")
    with pytest.raises(WBCError, match="oof.csv: prediction file not found"):
        shift_report(cfg, [tmp_path / "nothing"], bootstrap=5)


def test_run_predictions_prefer_a_runs_own_decisions(tmp_path):
    """Ensembles and refinements decide with a tuned rule: `<part>_pred.csv` is what they submit, not the argmax."""
    from wbc.core.io import Probs, save_probs
    from wbc.optional.shift.report import run_predictions

    save_probs(tmp_path / "oof.csv", Probs(np.array(["a", "b"]), np.array([[0.9, 0.1], [0.8, 0.2]]), ["X", "Y"]))
    assert run_predictions(tmp_path, "oof").to_dict() == {"a": "X", "b": "X"}
    pd.DataFrame({"ID": ["b", "a"], "labels": ["Y", "X"]}).to_csv(tmp_path / "oof_pred.csv", index=False)
    assert run_predictions(tmp_path, "oof").to_dict() == {"a": "X", "b": "Y"}
    pd.DataFrame({"id": ["a"], "label": ["X"]}).to_csv(tmp_path / "oof_pred.csv", index=False)
    with pytest.raises(WBCError, match="expected columns ID,labels"):
        run_predictions(tmp_path, "oof")
    # an ensemble's or refinement's OOF decisions were tuned on those rows: its nested held-out ones are scored
    pd.DataFrame({"ID": ["a", "b"], "labels": ["Y", "Y"]}).to_csv(tmp_path / "oof_nested_pred.csv", index=False)
    assert run_predictions(tmp_path, "oof").to_dict() == {"a": "Y", "b": "Y"}
    pd.DataFrame({"ID": ["a", "b"], "labels": ["X", "X"]}).to_csv(tmp_path / "eval_pred.csv", index=False)
    assert run_predictions(tmp_path, "eval").to_dict() == {"a": "X", "b": "X"}


def test_feature_cache_is_reused_and_keyed_by_id_and_split(sample_root, make_cfg, tmp_path, monkeypatch):
    from wbc.optional.shift import features
    from wbc.s1_data.layout import read_splits

    cfg = make_cfg(sample_root, f"shift.out_dir={tmp_path / 'shift'}")
    rows = read_splits(sample_root, ["phase1"]).iloc[:6].reset_index(drop=True)
    first = features.damage_feature_table(cfg, rows.iloc[:4])
    computed = []
    real = features._compute
    monkeypatch.setattr(features, "_compute", lambda df, w: (computed.append(list(df["ID"] + "|" + df["split"])),
                                                            real(df, w))[1])
    again = features.damage_feature_table(cfg, rows)
    assert computed == [list(rows["ID"][4:] + "|phase1")]  # only the two new rows
    pd.testing.assert_frame_equal(again.iloc[:4].reset_index(drop=True), first, check_exact=False, rtol=1e-6)
    other = rows.iloc[:2].assign(split="elsewhere")  # same ID in another split: another image
    features.damage_feature_table(cfg, other)
    assert computed[-1] == list(other["ID"] + "|elsewhere")
    cache = pd.read_csv(features.features_path(cfg), dtype={"ID": str})
    assert len(cache) == 8 and not cache[["ID", "split"]].duplicated().any()
    monkeypatch.setattr(features, "SOURCE_HASH", "edited")  # the measuring code changed: every row again
    features.damage_feature_table(cfg, rows)
    assert computed[-1] == list(rows["ID"] + "|phase1")


def test_single_fold_check_bins_and_target_quantile(shifted_run, tmp_path):
    """The like-for-like check averages the single fold models; the target quantile keeps the most damaged
    half; bins are the target's tertiles; a folds file not covering the pool is refused."""
    from wbc.core.io import Probs, load_probs, save_probs, write_csv
    from wbc.optional.restore.score import FEATURES, fit_reference, score_features
    from wbc.optional.shift.features import damage_feature_table
    from wbc.optional.shift.report import shift_report
    from wbc.s1_data.layout import data_root, read_splits
    from wbc.s2_folds.folds import folds_path

    cfg, run, folds = shifted_run
    ev = load_probs(run / "eval.csv")
    right = np.eye(len(ev.classes))[ev.label_index()]  # a second fold model that is always right
    save_probs(run / "fold1" / "eval.csv", Probs(ev.ids, right, ev.classes, labels=ev.labels))
    rep = shift_report(cfg, [run], target="phase2_eval", quantile=0.5, bootstrap=5)
    r = next(iter(rep["runs"].values()))
    assert r["target_actual_per_fold"]["fold1"] == 1.0 and r["target_actual_per_fold"]["fold0"] < 0.5
    assert r["target_actual_single_fold"] == pytest.approx((r["target_actual_per_fold"]["fold0"] + 1) / 2)
    assert r["target_actual"] == r["target_actual_per_fold"]["fold0"]  # the run's eval.csv is fold 0's here
    rows = read_splits(data_root(cfg), ["phase1", "phase2_train", "phase2_eval", "phase2_test"])
    f = damage_feature_table(cfg, rows)[list(FEATURES)].to_numpy()
    score = score_features(f, fit_reference(f[(rows["split"] == "phase1").to_numpy()]))
    s_ev = score[(rows["split"] == "phase2_eval").to_numpy()]
    top = s_ev >= np.quantile(s_ev, 0.5)
    assert rep["n_target"] == int(top.sum()) < len(s_ev)
    np.testing.assert_allclose(rep["bin_edges"], np.quantile(s_ev[top], [1 / 3, 2 / 3]))
    write_csv(folds_path(cfg), folds.iloc[1:])
    with pytest.raises(WBCError, match="does not cover the training pool"):
        shift_report(cfg, [run], bootstrap=5)


def test_cap_weights_iterate_when_rescaling_lifts_another_weight_over_the_cap():
    # Capping 100 and rescaling lifts 20 above the cap too: one pass would leave it there.
    w, hit = cap_weights(np.r_[np.ones(8), 20.0, 100.0], 3.0)
    assert w.mean() == pytest.approx(1.0) and w.max() <= 3.0 + 1e-9 and hit == 2
    assert np.allclose(w[8:], 3.0) and np.allclose(w[:8], 0.5)  # (10 - 2 x 3) / 8 each


def test_domain_weights_catch_a_shift_in_spread():
    # Damage that narrows a feature (blur lowers the noise level): the log density ratio is quadratic in x,
    # invisible to a linear classifier. p_t / p_p for N(0, 0.5^2) vs N(0, 1) is 2 exp(-1.5 x^2).
    rng = np.random.default_rng(4)
    pool, target = rng.normal(size=(3000, 3)), rng.normal(size=(1500, 3))
    target[:, 0] *= 0.5
    sw = domain_weights(pool, target, cap=50.0)
    true = np.exp(-1.5 * pool[:, 0] ** 2)
    assert np.corrcoef(sw.weights, true / true.mean())[0, 1] > 0.9
    assert sw.auc > 0.65


def test_unlabelled_holdout_rows_are_not_scored(shifted_run, monkeypatch):
    import wbc.optional.shift.report as report
    from wbc.core.io import load_probs

    cfg, run, folds = shifted_run
    real = report.read_splits
    blanked = []

    def read_splits(root, splits):  # three eval images lose their label
        rows = real(root, splits)
        idx = rows.index[rows["split"] == "phase2_eval"][:3]
        blanked.extend(rows.loc[idx, "ID"])
        rows.loc[idx, "labels"] = ""
        return rows

    monkeypatch.setattr(report, "read_splits", read_splits)
    r = next(iter(report.shift_report(cfg, [run], bootstrap=5)["runs"].values()))
    ev = load_probs(run / "eval.csv")
    keep = ~np.isin(ev.ids, blanked)
    classes = sorted(folds["labels"].unique())
    y = np.array([classes.index(c) for c in ev.labels])
    assert r["holdout"] == pytest.approx(macro_f1(y[keep], ev.probs[keep].argmax(1), len(classes)))
