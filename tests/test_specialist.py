"""Specialists: a fold run on a class subset (`data.subset_classes`) trains and validates on those classes only but
predicts every image; `ensemble.specialists` composes it with the full-class blend (`wbc.s5_ensemble.specialist`)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.special import softmax

from helpers import write_folds
from wbc.__main__ import main
from wbc.core.config import CONFIG_DIR, load_config
from wbc.core.errors import WBCError
from wbc.core.io import Probs, load_probs, save_probs
from wbc.s3_train import loop
from wbc.s3_train.inputs import load_fold_data
from wbc.s4_predict.fold import predict_fold
from wbc.s4_predict.merge import merge_run
from wbc.s5_ensemble.blend import check_members, load_member
from wbc.s5_ensemble.run import run_ensemble
from wbc.s5_ensemble.specialist import apply_specialists, compose, fit_specialists, fit_weight, load_specialist
from wbc.s7_submit.submit import submit_from_predictions

GROUP = ["BNE", "MY", "SNE"]


@pytest.mark.slow
def test_fold_run_trains_on_its_classes_and_predicts_every_image(sample_root, make_cfg, monkeypatch):
    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=1", "data.subset_classes=[SNE,BNE,MY]")
    write_folds(cfg)
    data = load_fold_data(cfg)
    assert data.classes == GROUP  # the data's order, not the config's
    seen = {}
    real = loop.CellDataset

    def spy(images, targets, transform, seed):
        seen["n"], seen["targets"] = len(images), np.asarray(targets)
        return real(images, targets, transform, seed)

    monkeypatch.setattr(loop, "CellDataset", spy)
    loop.train_fold(cfg, 0, data=data)
    pool = data.pool
    in_group = pool["labels"].isin(GROUP).to_numpy()
    tr = (pool["fold"].to_numpy() != 0) & in_group
    assert seen["n"] == tr.sum() and 0 < tr.sum() < (pool["fold"].to_numpy() != 0).sum()
    assert seen["targets"].tolist() == [GROUP.index(c) for c in pool["labels"][tr]]

    res = predict_fold(cfg, 0, data)
    run = loop.run_dir(cfg)
    oof = load_probs(run / "fold0" / "oof.csv")
    va = pool["fold"].to_numpy() == 0
    assert sorted(oof.ids) == sorted(pool["ID"][va]) and oof.classes == GROUP  # every fold-0 image, 3 columns
    assert res["oof"]["n"] == (va & in_group).sum()  # scored on the group's images only
    ev = load_probs(run / "fold0" / "eval.csv")
    assert len(ev.ids) == len(data.holdout) and res["eval"]["n"] == data.holdout["labels"].isin(GROUP).sum()
    report = merge_run(run)
    assert report["n_oof"] == va.sum() and report["oof"]["n"] == (va & in_group).sum()

    with pytest.raises(WBCError, match="specialist's predictions .* cannot be submitted alone"):
        submit_from_predictions(run, sample_root, "spec", sorted(set(pool["labels"])), out_dir=run / "subs")
    assert not (run / "subs").exists()


@pytest.mark.parametrize("subset, match", [("[SNE,XX]", "unknown class.*XX"), ("[SNE,SNE]", "at least two")])
def test_bad_subsets_are_refused(sample_root, make_cfg, subset, match):
    cfg = make_cfg(sample_root, f"data.subset_classes={subset}")
    write_folds(cfg)
    with pytest.raises(WBCError, match=match):
        load_fold_data(cfg)


def test_compose_keeps_the_group_mass_and_the_other_classes():
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(0, 2, (50, 5)), axis=1)
    s = softmax(rng.normal(0, 2, (50, 2)), axis=1)
    g = [1, 3]
    np.testing.assert_allclose(compose(p, s, g, 0.0), p)
    for w in (0.3, 1.0):
        out = compose(p, s, g, w)
        np.testing.assert_allclose(out.sum(1), 1.0)
        np.testing.assert_allclose(out[:, [0, 2, 4]], p[:, [0, 2, 4]])
        np.testing.assert_allclose(out[:, g].sum(1), p[:, g].sum(1))
    # w = 1: the group's split is the specialist's; a hand check of one row at w = 0.5
    np.testing.assert_allclose(compose(p, s, g, 1.0)[:, g] / p[:, g].sum(1, keepdims=True), s)
    row = np.array([[0.2, 0.3, 0.1, 0.1, 0.3]])
    np.testing.assert_allclose(compose(row, np.array([[0.9, 0.1]]), g, 0.5),
                               [[0.2, 0.4 * (0.5 * 0.75 + 0.45), 0.1, 0.4 * (0.5 * 0.25 + 0.05), 0.3]])


def _group_problem(seed=0, n=600):
    """Five classes; the blend tells the group {1, 3} apart from the rest, and splits the group by a calibrated
    coin: 0.65 on the true class in 65 % of its images, 0.65 on the other class otherwise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    z = rng.normal(0, 1, (n, 5))
    z[np.arange(n), y] += 3.0
    p = softmax(z, axis=1)
    grp = np.flatnonzero(np.isin(y, [1, 3]))
    right = rng.random(len(grp)) < 0.65
    p3 = np.where((y[grp] == 3) == right, 0.65, 0.35)
    mass = p[grp][:, [1, 3]].sum(1)  # the group keeps its total probability
    p[grp, 1], p[grp, 3] = mass * (1 - p3), mass * p3
    return y, p, rng


@pytest.mark.parametrize("fit", ["macro_f1", "log_loss"])
def test_fitted_weight_trusts_a_good_specialist_and_ignores_noise(fit):
    y, p, rng = _group_problem()
    g = [1, 3]
    good = np.where(y == 3, 0.9, 0.1)[:, None] * np.array([-1, 1]) + np.array([1, 0])  # P(3 | G) = 0.9 if y = 3
    noise = softmax(rng.normal(0, 2, (len(y), 2)), axis=1)
    acc = lambda probs: (probs.argmax(1) == y)[np.isin(y, g)].mean()  # noqa: E731
    assert acc(p) < 0.7
    w_good, w_noise = fit_weight(p, good, g, y, fit=fit), fit_weight(p, noise, g, y, fit=fit)
    assert w_good > 0.8 and w_noise <= 0.15  # F1 on a grid: a noise draw may tip a few near-ties
    assert acc(compose(p, good, g, w_good)) > acc(p) + 0.2
    # specialists apply in order, each fitted on the previous one's output
    ws = fit_specialists(p, [noise, good], [g, g], y, fit=fit)
    assert ws[0] == pytest.approx(w_noise, abs=1e-6)
    np.testing.assert_allclose(apply_specialists(p, [noise, good], [g, g], ws),
                               compose(compose(p, noise, g, ws[0]), good, g, ws[1]))
    with pytest.raises(WBCError, match="ensemble.specialist_fit: 'f1' is not one of macro_f1, log_loss"):
        fit_weight(p, good, g, y, fit="f1")


def _write_runs(root):
    """A full-class member and a specialist on {BNE, SNE} over the same IDs, folds and labels."""
    classes = ["BA", "BNE", "LY", "SNE"]
    rng = np.random.default_rng(1)
    n, n_ev, n_te = 240, 80, 40
    y = np.repeat(np.arange(4), [30, 40, 70, 100])
    folds = rng.permutation(n) % 3
    y_ev, y_te = rng.integers(0, 4, n_ev), rng.integers(0, 4, n_te)
    ids = {"oof": [f"p{i:03d}.jpg" for i in range(n)], "eval": [f"e{i:03d}.jpg" for i in range(n_ev)],
           "test": [f"t{i:03d}.jpg" for i in range(n_te)]}

    def member(yy):  # knows the group {BNE, SNE} (1, 3) but not which of the two
        z = rng.normal(0, 1, (len(yy), 4))
        z[np.arange(len(yy)), yy] += 3.0
        grp = np.isin(yy, [1, 3])
        z[grp, 1] = z[grp, 3] = z[grp].max(1) + rng.normal(0, 0.3, grp.sum())
        return softmax(z, axis=1)

    def special(yy):
        s = np.where(yy == 3, 0.85, 0.15)
        return np.stack([1 - s, s], 1)

    lab = np.array(classes)
    for name, make, cls in (("member", member, classes), ("spec", special, ["BNE", "SNE"])):
        save_probs(root / name / "oof.csv", Probs(ids["oof"], make(y), cls, folds, lab[y]))
        save_probs(root / name / "eval.csv", Probs(ids["eval"], make(y_ev), cls, labels=lab[y_ev]))
        save_probs(root / name / "test.csv", Probs(ids["test"], make(y_te), cls, labels=[""] * n_te))
    return root / "member", root / "spec", ids["test"], classes


def test_ensemble_composes_a_specialist_and_reports_it(tmp_path):
    member, spec, test_ids, classes = _write_runs(tmp_path / "outputs")
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"ID": test_ids, "labels": ""}).to_csv(data / "phase2_test.csv", index=False)
    cfg_file = tmp_path / "spec_ens.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "spec_ens", "data": {"classes": classes}, "ensemble": {
        "members": [str(member)], "specialists": [str(spec)],
        "tuning": {"n_trials": 5, "seed": 0, "storage": f"journal:{tmp_path / 'j.journal'}"},
        "submit_dir": str(tmp_path / "subs")}}))
    assert main(["ensemble", "--config", str(cfg_file), f"output_dir={tmp_path / 'out'}", f"data.root={data}"]) == 0
    out = tmp_path / "out" / "ensemble" / "spec_ens"
    decision = json.loads((out / "decision.json").read_text())
    (s,) = decision["specialists"]
    assert s["classes"] == ["BNE", "SNE"] and s["weight"] > 0.8
    base, sp = load_probs(member / "oof.csv"), load_probs(spec / "oof.csv")
    np.testing.assert_allclose(load_probs(out / "oof.csv").probs, compose(base.probs, sp.probs, [1, 3], s["weight"]))
    te = load_probs(out / "test.csv")
    np.testing.assert_allclose(te.probs, compose(load_probs(member / "test.csv").probs,
                                                 load_probs(spec / "test.csv").probs, [1, 3], s["weight"]))
    report = json.loads((out / "report.json").read_text())
    oof = report["scores"]["oof"]
    assert oof["blend"]["macro_f1"] > oof["blend w/o specialists"]["macro_f1"] + 0.1
    assert report["scores"]["oof_nested_blend"] > report["scores"]["oof_nested_no_specialist"] + 0.1
    check = decision["specialist_check"]
    assert s["kept"] and check["with"] == pytest.approx(report["scores"]["oof_nested_blend"])
    assert len(report["nested"]["fold_specialist_weights"]) == 3
    assert json.loads((tmp_path / "subs" / "spec_ens.json").read_text())["specialists"][0]["weight"] == s["weight"]


def test_a_specialist_that_loses_out_of_sample_is_left_out(tmp_path):
    member, spec, test_ids, classes = _write_runs(tmp_path / "outputs")
    oof = load_probs(spec / "oof.csv")  # turned into a specialist that is wrong where it is sure
    save_probs(spec / "oof.csv", Probs(oof.ids, oof.probs[:, ::-1], oof.classes, oof.folds, oof.labels))
    cfg = load_config(CONFIG_DIR / "ensemble" / "sample.yaml", [
        f"ensemble.members=[{member}]", f"ensemble.specialists=[{spec}]", "ensemble.submit=false",
        f"output_dir={tmp_path / 'out'}", "name=noise", "ensemble.tuning.n_trials=3", "ensemble.tuning.quota=false",
        f"data.classes=[{','.join(classes)}]", f"ensemble.tuning.storage=journal:{tmp_path / 'j.journal'}"])
    report = run_ensemble(cfg)
    check = json.loads((tmp_path / "out" / "ensemble" / "noise" / "decision.json").read_text())["specialist_check"]
    assert check["with"] <= check["without"] and report["specialists"][0]["kept"] is False
    np.testing.assert_allclose(load_probs(tmp_path / "out" / "ensemble" / "noise" / "oof.csv").probs,
                               load_probs(member / "oof.csv").probs)
    assert report["scores"]["oof_nested_blend"] == pytest.approx(check["without"])


def test_specialists_that_do_not_match_the_members_are_refused(tmp_path):
    member, spec, _, _ = _write_runs(tmp_path / "outputs")
    ref = check_members([load_member(member)])[0]
    assert load_specialist(spec, ref).group == [1, 3]
    with pytest.raises(WBCError, match="must be two or more of the members' classes"):
        load_specialist(member, ref)  # a full-class run is not a specialist
    df = pd.read_csv(spec / "oof.csv", dtype=str, keep_default_na=False)
    df.assign(labels=df["labels"].where(df.index != 5, "LY")).to_csv(spec / "oof.csv", index=False)  # p005 is BA
    with pytest.raises(WBCError, match=r"spec/oof.csv:7: ID p005.jpg has label LY, but label BA"):
        load_specialist(spec, ref)
    df.loc[5, "fold"] = str((int(df.loc[5, "fold"]) + 1) % 3)
    df.to_csv(spec / "oof.csv", index=False)
    with pytest.raises(WBCError, match=r"spec/oof.csv:7: ID p005.jpg has fold"):
        load_specialist(spec, ref)
    df.iloc[:-1].to_csv(spec / "oof.csv", index=False)
    with pytest.raises(WBCError, match="IDs differ from the first member"):
        load_specialist(spec, ref)


def test_a_seed_group_of_specialists_is_their_equal_weight_mean(tmp_path):
    member, spec, _, _ = _write_runs(tmp_path / "outputs")
    ref = check_members([load_member(member)])[0]
    spec2 = tmp_path / "outputs" / "spec_seed2"
    for split in ("oof", "eval", "test"):  # another seed: a sharper split of the same group
        p = load_probs(spec / f"{split}.csv")
        save_probs(spec2 / f"{split}.csv", Probs(p.ids, softmax(3 * np.log(p.probs), axis=1), p.classes, p.folds,
                                                 p.labels))
    group = load_specialist([str(spec), str(spec2)], ref)
    assert group.name == "spec+spec_seed2" and group.parts == (spec, spec2) and group.group == [1, 3]
    one, two = load_specialist(spec, ref), load_specialist(spec2, ref)
    for split in ("oof", "eval", "test"):
        want = (getattr(one, split).probs + getattr(two, split).probs) / 2
        np.testing.assert_allclose(getattr(group, split).probs, want, atol=1e-12)
    other = tmp_path / "outputs" / "spec_other"  # a specialist on other classes cannot join the group
    for split in ("oof", "eval", "test"):
        p = load_probs(spec / f"{split}.csv")
        save_probs(other / f"{split}.csv", Probs(p.ids, p.probs, ["BA", "LY"], p.folds, p.labels))
    with pytest.raises(WBCError, match=r"spec_other/oof.csv: classes BA, LY differ .*must share their classes"):
        load_specialist([str(spec), str(other)], ref)
    with pytest.raises(WBCError, match="not a run folder or a list of run folders"):
        load_specialist([], ref)


def test_a_specialist_keeps_only_its_classes_pseudo_labels(sample_root, make_cfg, tmp_path):
    from wbc.s1_data.layout import read_split

    test_ids = read_split(sample_root, "phase2_test", check_images=False)["ID"].iloc[:6]
    labels = ["SNE", "LY", "MY", "EO", "BNE", "LY"]
    path = tmp_path / "pseudo.csv"
    pd.DataFrame({"ID": test_ids, "labels": labels}).to_csv(path, index=False)
    cfg = make_cfg(sample_root, "folds.n_folds=2", "data.subset_classes=[SNE,BNE,MY]", f"data.pseudo_labels={path}")
    write_folds(cfg)
    data = load_fold_data(cfg, with_test=False)  # the test images still load for its pseudo rows
    extra = data.extra_rows()
    assert list(extra.ids) == list(test_ids.iloc[[0, 2, 4]])
    assert len(extra.images) == 3 and list(extra.labels) == ["SNE", "MY", "BNE"]
