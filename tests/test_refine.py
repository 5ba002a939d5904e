"""Class Gaussians, Mahalanobis distances and the rare-class rescue rules (synthetic data only)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from scipy.stats import multivariate_normal
from sklearn.covariance import LedoitWolf

from wbc.core.errors import WBCError
from wbc.core.io import Probs, save_probs
from wbc.core.metrics import macro_f1
from wbc.s6_refine.gaussian import ClassGaussians, FeatureScaler, crossfit
from wbc.s6_refine.morphology import FEATURES
from wbc.s6_refine.rule import Evidence, Settings, apply_hard, fit_hard, fit_soft, nested, soft_probs

CLASSES = ["A", "B", "R"]  # R is the rare class
SEARCH = {"ratio": [0.01, 1.0], "maha_quantile": [0.5, 1.0], "shape_quantile": [0.0, 0.2],
          "soft_weight": [1e-3, 3.0], "soft_grid": 25}


def test_mahalanobis_equals_hand_computation():
    means, covs = np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([[[4.0, 0.0], [0.0, 1.0]], [[2.0, 1.0], [1.0, 2.0]]])
    g = ClassGaussians()._set(means, covs, ["full", "full"], np.zeros(2, int))  # fixed parameters, by hand
    x = np.array([[3.0, 3.0], [1.0, 0.0]])
    d = g.mahalanobis(x)
    assert d[0, 0] == pytest.approx(np.sqrt(2 ** 2 / 4 + 1 ** 2 / 1))       # diagonal: sum of z^2
    assert d[1, 1] == pytest.approx(np.sqrt(2 / 3))                          # inv = [[2,-1],[-1,2]] / 3
    ll = g.loglik(x)
    assert ll[0, 0] == pytest.approx(multivariate_normal([1, 2], [[4, 0], [0, 1]]).logpdf([3, 3]))
    assert ll[1, 1] == pytest.approx(multivariate_normal([0, 0], [[2, 1], [1, 2]]).logpdf([1, 0]))


def test_ledoit_wolf_fit_and_fallbacks():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 2.0]])
    x = np.vstack([rng.multivariate_normal([0, 0, 0], cov, 80), rng.normal(3, 1, (4, 3))])
    y = np.array([0] * 80 + [1] * 4)
    g = ClassGaussians(min_samples=10).fit(x, y, 3)
    assert g.kinds == ["full", "pooled", "none"]
    lw = LedoitWolf().fit(x[y == 0]).covariance_
    np.testing.assert_allclose(g.covs[0], lw)
    q = np.array([[1.0, -1.0, 2.0], [np.nan, 0.0, 0.0]])
    diff = q[0] - x[y == 0].mean(0)
    assert g.mahalanobis(q)[0, 0] == pytest.approx(np.sqrt(diff @ np.linalg.inv(lw) @ diff))
    assert np.isinf(g.mahalanobis(q)[0, 2]) and np.isnan(g.mahalanobis(q)[1]).all()
    # the pooled covariance is the Ledoit-Wolf of the within-class residuals
    resid = np.vstack([x[y == 0] - x[y == 0].mean(0), x[y == 1] - x[y == 1].mean(0)])
    np.testing.assert_allclose(g.covs[1], LedoitWolf(assume_centered=True).fit(resid).covariance_)
    gd = ClassGaussians(min_samples=10, fallback="diagonal").fit(x, y, 3)
    assert gd.kinds[1] == "diagonal"
    np.testing.assert_allclose(np.diag(gd.covs[1]), x[y == 1].var(0, ddof=1))
    assert np.count_nonzero(gd.covs[1] - np.diag(np.diag(gd.covs[1]))) == 0
    with pytest.raises(WBCError):
        ClassGaussians(fallback="magic")


def test_crossfit_never_sees_its_own_fold():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, (40, 2)), np.repeat([0, 1], 20)
    folds = np.arange(40) % 4
    dist, _ = crossfit(x, y, folds, 2, min_samples=5)
    out = folds == 2
    g = ClassGaussians(5).fit(x[~out], y[~out], 2)
    np.testing.assert_allclose(dist[out], g.mahalanobis(x[out]))


def test_scaler_logs_heavy_tails_and_blanks_missing_rows():
    df = pd.DataFrame({"cell_area": [100.0, 1000.0, 10000.0, np.nan], "nc_ratio": [0.2, 0.5, 0.8, 0.5]})
    z = FeatureScaler(["cell_area", "nc_ratio"]).fit(df).transform(df)
    assert z[0, 0] == pytest.approx(-z[2, 0]) and z[1, 0] == pytest.approx(0.0)  # symmetric on the log scale
    assert np.isnan(z[3]).all() and np.isfinite(z[:3]).all()


def evidence(n=900, seed=0, informative=True):
    """3 classes, R rare (8 %). The 'ensemble' is informative but biased against R; the morphology
    (2-D Gaussian per class, lobes 3 for R) separates R when `informative`."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=[0.5, 0.42, 0.08])
    means = np.array([[0.0, 0.0], [2.5, 0.0], [0.0, 3.5]])
    x = (means[y] if informative else 0) + rng.normal(0, 1, (n, 2))
    logits = 1.6 * np.eye(3)[y] + rng.normal(0, 1, (n, 3))
    logits[:, 2] -= 1.5
    probs = softmax(logits, axis=1)
    lobes = np.where(y == 2, 3, 1) + rng.integers(-1, 2, n) * (rng.random(n) < 0.2) if informative \
        else rng.integers(1, 4, n)
    folds = np.arange(n) % 5
    return x, y, folds, probs, np.stack([lobes.astype(float)], 1)


def make_ev(x, y, folds, probs, shape):
    dist, ll = crossfit(x, y, folds, 3, min_samples=10)
    return Evidence(probs, probs.argmax(1), dist, ll, shape, ["nuc_lobes"])


def test_closed_gate_never_changes_a_prediction():
    rng = np.random.default_rng(3)
    n = 500
    probs = rng.dirichlet(np.ones(3), n)
    ev = Evidence(probs, probs.argmax(1), rng.uniform(0, 5, (n, 3)), rng.normal(size=(n, 3)),
                  rng.integers(1, 5, (n, 1)).astype(float), ["nuc_lobes"])
    open_gate = {"ratio": 0.0, "maha": np.inf, "shape": {}}
    closed = [{"ratio": 1.01, "maha": np.inf, "shape": {}},            # p_R can never exceed 1.01 x the top
              {"ratio": 0.0, "maha": -1.0, "shape": {}},               # no distance below -1
              {"ratio": 0.0, "maha": np.inf, "shape": {"nuc_lobes": [5.0, 4.0]}}]  # empty interval
    for gate in closed:
        np.testing.assert_array_equal(apply_hard(ev, {"gates": {"R": gate}}, CLASSES), ev.base)
    np.testing.assert_array_equal(apply_hard(ev, {"gates": {}}, CLASSES), ev.base)
    moved = apply_hard(ev, {"gates": {"R": open_gate}}, CLASSES)
    assert (moved == 2).all()  # every gate open: every row goes to R
    # rows without morphology (NaN distance) keep their decision even with every gate open
    ev.dist[:50] = np.nan
    np.testing.assert_array_equal(apply_hard(ev, {"gates": {"R": open_gate}}, CLASSES)[:50], ev.base[:50])


def test_every_gate_must_agree():
    probs = np.array([[0.6, 0.1, 0.3]] * 5)
    dist = np.array([[1, 1, 2.0], [1, 1, 2.0], [1, 1, 9.0], [1, 1, 2.0], [1, 1, np.nan]])
    lobes = np.array([[3.0], [3.0], [3.0], [1.0], [3.0]])
    probs[1] = [0.8, 0.15, 0.05]  # ensemble disagrees: p_R / p_top = 0.0625
    ev = Evidence(probs, probs.argmax(1), dist, np.zeros((5, 3)), lobes, ["nuc_lobes"])
    params = {"gates": {"R": {"ratio": 0.25, "maha": 3.0, "shape": {"nuc_lobes": [2.0, 5.0]}}}}
    np.testing.assert_array_equal(apply_hard(ev, params, CLASSES), [2, 0, 0, 0, 0])


def test_the_most_likely_of_several_open_rare_classes_wins():
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.2, 0.3]])
    ev = Evidence(probs, np.zeros(2, int), np.ones((2, 3)), np.zeros((2, 3)), np.ones((2, 1)), ["nuc_lobes"])
    open_gate = {"ratio": 0.1, "maha": 5.0, "shape": {}}
    for order in (["B", "R"], ["R", "B"]):  # the larger p_r / max p wins, whatever the gate order
        params = {"gates": {k: open_gate for k in order}}
        np.testing.assert_array_equal(apply_hard(ev, params, CLASSES), [1, 2])


def test_a_row_in_an_open_rare_class_stays_there():
    probs = np.array([[0.2, 0.5, 0.3]])  # the base decision is B, itself a rare class with an open gate
    ev = Evidence(probs, probs.argmax(1), np.ones((1, 3)), np.zeros((1, 3)), np.ones((1, 1)), ["nuc_lobes"])
    open_gate = {"ratio": 0.1, "maha": 5.0, "shape": {}}
    assert apply_hard(ev, {"gates": {"B": open_gate, "R": open_gate}}, CLASSES)[0] == 1  # not moved to R (0.3)
    closed_b = {**open_gate, "maha": -1.0}  # B's morphology does not fit: R may take the row
    assert apply_hard(ev, {"gates": {"B": closed_b, "R": open_gate}}, CLASSES)[0] == 2


def test_fit_hard_starts_from_closed_gates():
    x, y, folds, probs, shape = evidence()
    ev = make_ev(x, y, folds, probs, shape)
    params, best = fit_hard(ev, y, CLASSES, ["R"], SEARCH, n_trials=1, seed=0)  # trial 0 only
    assert params["gates"] == {} and best == pytest.approx(macro_f1(y, ev.base, 3))


def test_shape_gate_picks_the_discriminating_feature():
    from wbc.s6_refine.rule import discriminating_shapes

    x, y, folds, probs, shape = evidence()
    noise = np.random.default_rng(5).normal(size=(len(y), 2))
    ev = make_ev(x, y, folds, probs, np.column_stack([noise[:, 0], shape[:, 0], noise[:, 1]]))
    ev.shape_names = ["noise_a", "nuc_lobes", "noise_b"]
    assert discriminating_shapes(ev, y, 2, 1) == ["nuc_lobes"]


def test_fit_hard_rescues_the_rare_class_and_never_scores_below_base():
    x, y, folds, probs, shape = evidence()
    ev = make_ev(x, y, folds, probs, shape)
    base = macro_f1(y, ev.base, 3)
    params, best = fit_hard(ev, y, CLASSES, ["R"], SEARCH, n_trials=40, seed=0)
    pred = apply_hard(ev, params, CLASSES)
    assert best == pytest.approx(macro_f1(y, pred, 3)) and best > base + 0.03
    assert (pred[ev.base != pred] == 2).all() and "R" in params["gates"]
    # uninformative morphology: the search may keep the gates closed, but never ends below base
    x, y, folds, probs, shape = evidence(informative=False, seed=1)
    ev = make_ev(x, y, folds, probs, shape)
    _, best = fit_hard(ev, y, CLASSES, ["R"], SEARCH, n_trials=20, seed=0)
    assert best >= macro_f1(y, ev.base, 3)


def test_soft_rule_weight_zero_is_identity_and_missing_rows_stay():
    x, y, folds, probs, shape = evidence()
    ev = make_ev(x, y, folds, probs, shape)
    np.testing.assert_allclose(soft_probs(ev, 0.0), probs, atol=1e-9)
    ev.loglik[:10] = np.nan
    np.testing.assert_allclose(soft_probs(ev, 2.0)[:10], probs[:10], atol=1e-9)
    moved = soft_probs(ev, 2.0)[10:]
    best_ll = np.nanargmax(ev.loglik[10:], 1)
    gain = moved[np.arange(len(moved)), best_ll] - probs[10:][np.arange(len(moved)), best_ll]
    assert (gain >= -1e-12).all()  # the morphologically likeliest class never loses probability
    w, f1 = fit_soft(ev, y, lambda p: p.argmax(1), SEARCH, 3)
    assert w > 0 and f1 > macro_f1(y, ev.base, 3)
    ev.loglik[:] = 0.0  # morphology without information: every weight ties, the smallest (0) is kept
    assert fit_soft(ev, y, lambda p: p.argmax(1), SEARCH, 3)[0] == 0.0


def test_nested_estimate_scores_held_out_folds():
    x, y, folds, probs, shape = evidence()
    s = Settings(CLASSES, ["R"], SEARCH, n_trials=25, seed=0, min_samples=10)
    res = nested(x, y, folds, probs, probs.argmax(1), shape, ["nuc_lobes"], lambda p: p.argmax(1), s)
    assert len(res["per_fold"]) == 5 and res["hard"].shape == y.shape
    base = macro_f1(y, probs.argmax(1), 3)
    assert macro_f1(y, res["hard"], 3) > base and macro_f1(y, res["soft"], 3) > base
    two = folds % 2  # two folds leave one to cross-fit the distances in: said, not a misleading fit error
    with pytest.raises(WBCError, match=r"refine.nested needs predictions over at least 3 folds, these cover 2"):
        nested(x, y, two, probs, probs.argmax(1), shape, ["nuc_lobes"], lambda p: p.argmax(1), s)


def write_case(root, seed=0):
    """A predictions folder, a feature cache and the test split file for the refine command."""
    x, y, folds, probs, shape = evidence(n=300, seed=seed)
    rng = np.random.default_rng(seed)
    n_ev, n_te = 80, 60
    xe = np.vstack([x, *(evidence(n=k, seed=seed + i + 1)[0] for i, k in enumerate((n_ev, n_te)))])
    ids = [f"{i:08d}.jpg" for i in range(len(xe))]
    feats = pd.DataFrame(rng.normal(0, 1, (len(xe), len(FEATURES))), columns=FEATURES)
    feats["nc_ratio"], feats["nuc_offset"] = xe[:, 0], xe[:, 1]
    feats["nuc_lobes"] = np.concatenate([shape[:, 0], rng.integers(1, 4, n_ev + n_te)])
    feats.insert(0, "ID", ids)
    feats.insert(1, "seg_ok", True)
    feats.insert(2, "seg_error", "")
    feats.loc[5, "seg_ok"], feats.loc[5, "seg_error"] = False, "no nucleus seed"
    (root / "data" / "toy").mkdir(parents=True)
    (root / "morph").mkdir()
    feats.to_csv(root / "morph" / "toy_features.csv", index=False)
    pd.DataFrame({"ID": ids[300 + n_ev:], "labels": ""}).to_csv(root / "data" / "toy" / "phase2_test.csv",
                                                                   index=False)
    pd.DataFrame({"ID": [f"lab{c}.jpg" for c in CLASSES], "labels": CLASSES}).to_csv(
        root / "data" / "toy" / "phase1_label.csv", index=False)  # the dataset's classes, for the submission
    pred = root / "preds"
    yl = np.asarray(CLASSES)[y]
    save_probs(pred / "oof.csv", Probs(ids[:300], probs, CLASSES, folds, yl))
    ye = evidence(n=n_ev, seed=seed + 1)[1]
    pe = softmax(1.6 * np.eye(3)[ye] - [0, 0, 1.5] + rng.normal(0, 1, (n_ev, 3)), axis=1)
    save_probs(pred / "eval.csv", Probs(ids[300:300 + n_ev], pe, CLASSES, None, np.asarray(CLASSES)[ye]))
    save_probs(pred / "test.csv", Probs(ids[300 + n_ev:], rng.dirichlet(np.ones(3), n_te), CLASSES))
    return pred


def refine_cfg(root, *extra):
    from wbc.core.config import load_config

    return load_config("configs/steps/refine.yaml", [
        f"data.root={root / 'data' / 'toy'}", f"output_dir={root / 'out'}", f"morph.out_dir={root / 'morph'}",
        f"refine.predictions={root / 'preds'}", f"refine.submission_dir={root / 'subs'}", "refine.n_trials=15",
        "refine.features=[nc_ratio, nuc_offset, nuc_lobes]", "refine.shape_features=[nuc_lobes]", *extra])


def test_refine_command_end_to_end(tmp_path):
    from wbc.core.io import load_probs, write_json
    from wbc.s6_refine.run import run_refine

    pred = write_case(tmp_path)
    bias = {"A": 0.0, "B": 0.0, "R": 0.7}  # a tuned rule (biased argmax): refine must start from it
    write_json(pred / "decision.json", {"rule": {"classes": CLASSES, "bias": bias, "thresholds": {}, "quota": 0.0,
                                                 "prior": {c: 1 / 3 for c in CLASSES}}})
    res = run_refine(refine_cfg(tmp_path))
    out = res["out_dir"]
    assert out == tmp_path / "out" / "refine" / "preds"
    rep = json.loads((out / "report.json").read_text())
    assert rep["rare_classes"] == ["R"] and rep["base_decision"].startswith("decision rule")
    assert set(rep["scores"]) == {"oof", "oof_nested", "eval"}
    oof = load_probs(pred / "oof.csv")
    ruled = np.argmax(np.log(oof.probs) + list(bias.values()), 1)
    assert rep["scores"]["oof"]["before"]["macro_f1"] == pytest.approx(macro_f1(oof.label_index(), ruled, 3))
    for split in rep["scores"].values():
        assert {"before", "hard", "soft"} <= set(split)
    assert rep["scores"]["oof"]["hard"]["macro_f1"] >= rep["scores"]["oof"]["before"]["macro_f1"]
    assert rep["method"] in ("hard", "soft", "none")
    ch = pd.read_csv(out / "changes.csv", dtype=str, keep_default_na=False)
    assert list(ch.columns) == ["ID", "split", "method", "before", "after", "labels"]
    assert (ch["before"] != ch["after"]).all() and set(ch["split"]) <= {"oof", "phase2_eval", "phase2_test"}
    assert "00000005.jpg" not in set(ch.loc[ch["method"] == "hard", "ID"])  # failed segmentation: gate closed
    test_pred = pd.read_csv(out / "test_pred.csv", dtype=str)
    sub = pd.read_csv(tmp_path / "subs" / "preds_refined.csv", dtype=str)
    assert list(sub.columns) == ["ID", "labels"] and len(sub) == 60
    assert sub.set_index("ID")["labels"].equals(test_pred.set_index("ID")["labels"].loc[sub["ID"]])
    for name in ("oof.csv", "eval.csv", "test.csv", "oof_before.png", "oof_hard.png", "eval_soft.png"):
        assert (out / name).exists(), name
    side = json.loads((tmp_path / "subs" / "preds_refined.json").read_text())
    key = "before" if rep["method"] == "none" else rep["method"]
    assert side["method"] == rep["method"]
    assert side["cv_macro_f1"] == rep["scores"]["oof_nested"][key]["macro_f1"]  # the honest estimate
    held = pd.read_csv(out / "oof_nested_pred.csv", dtype=str, keep_default_na=False)  # and its decisions
    assert held["ID"].tolist() == list(oof.ids)
    assert macro_f1(oof.label_index(), held["labels"].map(CLASSES.index), 3) == pytest.approx(side["cv_macro_f1"])
    assert side["eval_macro_f1"] == rep["scores"]["eval"][key]["macro_f1"]


def test_refine_submission_follows_the_chosen_method(tmp_path):
    from wbc.s6_refine.run import run_refine

    write_case(tmp_path)
    res = run_refine(refine_cfg(tmp_path, "refine.method=hard", "refine.nested=false"))
    sub = pd.read_csv(tmp_path / "subs" / "preds_refined.csv", dtype=str)
    assert res["report"]["method"] == "hard"
    hard = np.asarray(CLASSES)[res["pred"]["test"]["hard"]]
    assert (sub["labels"].to_numpy() == hard).all()
    assert (res["pred"]["test"]["hard"] != res["pred"]["test"]["before"]).any()  # the check can tell them apart


def test_auto_method_is_chosen_by_nested_oof_and_can_keep_the_base():
    from wbc.s6_refine.run import _choose

    def sc(before, hard, soft):
        return {"before": {"macro_f1": before}, "hard": {"macro_f1": hard}, "soft": {"macro_f1": soft}}

    # In-sample the hard rule wins; nested (held-out folds) the soft one does: nested decides.
    assert _choose("auto", {"oof": sc(0.5, 0.9, 0.6), "oof_nested": sc(0.5, 0.55, 0.6)}) == "soft"
    assert _choose("auto", {"oof": sc(0.5, 0.9, 0.6)}) == "hard"  # without nesting, in-sample
    assert _choose("auto", {"oof": sc(0.5, 0.9, 0.6), "oof_nested": sc(0.5, 0.45, 0.5)}) == "none"
    assert _choose("soft", {"oof": sc(0.5, 0.9, 0.6)}) == "soft"
    with pytest.raises(WBCError, match="refine.method"):
        _choose("best", {"oof": sc(0.5, 0.9, 0.6)})


def test_refine_rejects_missing_features(tmp_path):
    from wbc.s6_refine.run import run_refine

    write_case(tmp_path)
    with pytest.raises(WBCError, match="unknown class"):
        run_refine(refine_cfg(tmp_path, "refine.rare_classes=[XX]"))
    feats = pd.read_csv(tmp_path / "morph" / "toy_features.csv")
    feats.iloc[1:].to_csv(tmp_path / "morph" / "toy_features.csv", index=False)
    with pytest.raises(WBCError, match="no morphology features"):
        run_refine(refine_cfg(tmp_path))
    # predictions over fewer classes than the dataset has could never make a whole submission
    with pytest.raises(WBCError, match="but the dataset's are A,B,R,ZZ"):
        run_refine(refine_cfg(tmp_path, f"data.classes=[{','.join(CLASSES)},ZZ]"))
    assert not (tmp_path / "out").exists()


def test_scaler_scales_integer_features_by_std_and_clips_outliers():
    lobes = [1.0] * 8 + [2.0, 3.0]  # MAD 0: scaled by the standard deviation instead
    nc = list(np.linspace(0.4, 0.6, 9)) + [90.0]  # one segmentation outlier
    df = pd.DataFrame({"nuc_lobes": lobes, "nc_ratio": nc})
    s = FeatureScaler(["nuc_lobes", "nc_ratio"]).fit(df)
    z = s.transform(df)
    assert s.scale[0] == pytest.approx(np.std(lobes))
    assert z[9, 0] == pytest.approx(2.0 / np.std(lobes))
    assert z[9, 1] == 8.0 and np.abs(z[:9, 1]).max() < 2  # clipped at CLIP


def test_crossfit_fits_only_on_fit_rows():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0, 1, (60, 2)), np.repeat([0, 1], 30)
    x[::3] += 5.0  # rows kept out of fitting are shifted: they must not move the means
    folds, fit_rows = np.arange(60) % 3, np.arange(60) % 3 != 0
    dist, ll = crossfit(x, y, folds, 2, min_samples=5, fit_rows=fit_rows)
    out = folds == 1
    g = ClassGaussians(5).fit(x[fit_rows & ~out], y[fit_rows & ~out], 2)
    np.testing.assert_allclose(dist[out], g.mahalanobis(x[out]))
    np.testing.assert_allclose(ll[out], g.loglik(x[out]))
