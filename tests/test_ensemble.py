"""Ensemble: member checks, blend weights, decision rule, Optuna tuning (bias recovery, nested honesty,
resume) and the `ensemble` command end to end on synthetic run folders."""
from __future__ import annotations

import json

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from scipy.special import softmax

from wbc.__main__ import main
from wbc.core.config import load_config
from wbc.core.errors import WBCError
from wbc.core.io import Probs, load_probs, save_probs
from wbc.core.metrics import macro_f1
from wbc.s5_ensemble import apply_rule, load_rule
from wbc.s5_ensemble.blend import check_members, combine, fit_weights, load_member, resolve_weights
from wbc.s5_ensemble.decision import class_prior, make_rule
from wbc.s5_ensemble.run import rule_steps, run_ensemble
from wbc.s5_ensemble.tune import RuleSpace, make_storage, n_finished, nested_estimate, tune_rule

CLASSES = ["BA", "EO", "LY", "MO", "NE"]
COUNTS = [12, 24, 60, 40, 120]  # long tail


def _probs(rng, y, n_cls, strength, bias=None):
    z = rng.normal(0, 1, (len(y), n_cls))
    z[np.arange(len(y)), y] += strength
    return softmax(z + (0 if bias is None else bias), axis=1)


def _make_run(root, name, seed, strength, n_folds=3, eval_n=60, test_n=40, bias=None):
    """A run folder as `make predict` writes it: oof.csv (with fold, labels), eval.csv, test.csv."""
    rng = np.random.default_rng(seed)
    data_rng = np.random.default_rng(0)  # same IDs, labels and folds for every member
    y = np.repeat(np.arange(len(CLASSES)), COUNTS)
    ids = np.array([f"img{i:04d}.jpg" for i in range(len(y))])
    folds = data_rng.permutation(len(y)) % n_folds
    y_ev = data_rng.integers(0, len(CLASSES), eval_n)
    run = root / name
    lab = np.array(CLASSES)
    save_probs(run / "oof.csv", Probs(ids, _probs(rng, y, 5, strength, bias), CLASSES, folds, lab[y]))
    save_probs(run / "eval.csv", Probs([f"ev{i:03d}.jpg" for i in range(eval_n)],
                                       _probs(rng, y_ev, 5, strength, bias), CLASSES, labels=lab[y_ev]))
    save_probs(run / "test.csv", Probs([f"te{i:03d}.jpg" for i in range(test_n)],
                                       _probs(rng, data_rng.integers(0, 5, test_n), 5, strength, bias), CLASSES,
                                       labels=[""] * test_n))
    return run


@pytest.fixture()
def runs(tmp_path):
    # Member b is biased towards the head class: the rule has something to correct.
    return (_make_run(tmp_path / "outputs", "run_a", 1, 2.0),
            _make_run(tmp_path / "outputs", "run_b", 2, 1.2, bias=np.array([0, 0, 0.3, 0, 0.8])))


# ---------------------------------------------------------------- decision rule

def test_apply_rule_bias_thresholds_quota():
    p = np.array([[0.6, 0.3, 0.1],
                  [0.5, 0.1, 0.4],
                  [0.7, 0.1, 0.2],
                  [0.2, 0.7, 0.1],
                  [0.8, 0.05, 0.15]])
    classes = ["a", "b", "c"]
    prior = np.array([0.5, 0.3, 0.2])
    assert apply_rule(p, make_rule(classes, [0, 0, 0], {}, 0.0, prior)).tolist() == [0, 0, 0, 1, 0]
    # log(0.4) + 0.3 > log(0.5): row 1 flips to c; nothing else does
    assert apply_rule(p, make_rule(classes, [0, 0, 0.3], {}, 0.0, prior)).tolist() == [0, 2, 0, 1, 0]
    # threshold 0.2 on c: rows with p_c >= 0.2 become c, whatever the argmax
    assert apply_rule(p, make_rule(classes, [0, 0, 0], {"c": 0.2}, 0.0, prior)).tolist() == [0, 2, 2, 1, 0]
    # quota 1.0: c expects floor(0.2 * 5) = 1 row, b floor(0.3 * 5) = 1 (has one): c takes its best candidate
    assert apply_rule(p, make_rule(classes, [0, 0, 0], {}, 1.0, prior)).tolist() == [0, 2, 0, 1, 0]
    # quota 0.5: targets round down to 0, no change
    assert apply_rule(p, make_rule(classes, [0, 0, 0], {}, 0.5, prior)).tolist() == [0, 0, 0, 1, 0]
    # everything predicted c: b (rarest first) takes its best row, c keeps its best, a takes 3 of the rest
    p2 = np.array([[0.30, 0.20, 0.50], [0.35, 0.05, 0.60], [0.10, 0.40, 0.50],
                   [0.25, 0.15, 0.60], [0.05, 0.05, 0.90], [0.20, 0.30, 0.50]])
    pred = apply_rule(p2, make_rule(classes, [0, 0, 0], {}, 1.0, [0.6, 0.2, 0.2]))
    assert pred.tolist() == [0, 0, 1, 0, 2, 2]
    with pytest.raises(WBCError, match="3 classes"):
        apply_rule(p[:, :2], make_rule(classes, [0, 0, 0], {}, 0.0, prior))


def test_load_rule_roundtrip_and_errors(tmp_path):
    rule = make_rule(["a", "b"], [0.1, -0.2], {"b": 0.3}, 0.5, [0.7, 0.3])
    (tmp_path / "decision.json").write_text(json.dumps({"rule": rule, "blend": {}}))
    assert load_rule(tmp_path / "decision.json") == rule
    (tmp_path / "bad.json").write_text(json.dumps({"blend": {}}))
    with pytest.raises(WBCError, match="bad.json: no decision rule"):
        load_rule(tmp_path / "bad.json")
    with pytest.raises(WBCError, match="not found"):
        load_rule(tmp_path / "missing.json")


# ---------------------------------------------------------------- tuning

def test_tuning_undoes_a_planted_prior_shift():
    rng = np.random.default_rng(0)
    n_cls, n = 4, 1500
    shift = np.array([1.5, 0.0, -1.0, -0.5])
    y = rng.integers(0, n_cls, n)
    probs = _probs(rng, y, n_cls, 1.5, shift)
    classes = [f"c{i}" for i in range(n_cls)]
    storage = optuna.storages.InMemoryStorage()  # persistence is tested below; this is about the search
    rule, study = tune_rule(probs, y, classes, RuleSpace(tau_max=0, bias_range=3), storage=storage,
                            study_prefix="shift", n_trials=100, seed=0)
    bias = np.array([rule["bias"][c] for c in classes])
    # biases are defined up to a constant: compare centred
    np.testing.assert_allclose(bias - bias.mean(), -(shift - shift.mean()), atol=0.5)
    # and the tuned rule generalises to fresh data from the same shifted model
    y2 = rng.integers(0, n_cls, n)
    p2 = _probs(rng, y2, n_cls, 1.5, shift)
    plain, tuned = macro_f1(y2, p2.argmax(1), n_cls), macro_f1(y2, apply_rule(p2, rule), n_cls)
    assert tuned > plain + 0.15
    assert study.best_value >= macro_f1(y, probs.argmax(1), n_cls)  # the argmax start point is trial 0


def test_negative_tau_gives_back_a_prior_that_members_over_corrected():
    """Members trained past the balanced prior over-predict rare classes; only tau < 0 can undo that."""
    rng = np.random.default_rng(0)
    prior, n = np.array([0.6, 0.25, 0.1, 0.05]), 3000
    classes = [f"c{i}" for i in range(4)]

    def member(y):  # an informative model whose logits push the rare classes by twice the log prior
        z = rng.normal(0, 1, (len(y), 4))
        z[np.arange(len(y)), y] += 1.5
        return softmax(z - 2.0 * np.log(prior), axis=1)

    y, y2 = rng.choice(4, n, p=prior), rng.choice(4, n, p=prior)
    p, p2 = member(y), member(y2)
    plain = macro_f1(y2, p2.argmax(1), 4)
    got = {}
    for tau_min in (0.0, -2.0):
        space = RuleSpace.from_cfg({"tau_min": tau_min, "tau_max": 2.0, "bias_range": 0})
        rule, study = tune_rule(p, y, classes, space, storage=optuna.storages.InMemoryStorage(),
                                study_prefix=f"neg{tau_min}", n_trials=60, seed=0)
        got[tau_min] = (study.best_params["tau"], macro_f1(y2, apply_rule(p2, rule), 4))
    assert got[0.0][0] >= 0 and got[0.0][1] < plain + 0.02  # tau >= 0 only pushes further the wrong way
    assert got[-2.0][0] < -1.0 and got[-2.0][1] > plain + 0.3  # on fresh data from the same members
    with pytest.raises(WBCError, match="tau_min <= 0 <= tau_max"):
        RuleSpace.from_cfg({"tau_min": 0.5})


def test_nested_estimate_is_not_above_in_sample_on_noise():
    rng = np.random.default_rng(1)
    n_cls, n = 4, 600
    y = rng.integers(0, n_cls, n)
    probs = rng.dirichlet(np.ones(n_cls), n)  # no signal at all
    folds = np.arange(n) % 3
    classes = [f"c{i}" for i in range(n_cls)]
    space = RuleSpace(tau_max=0, bias_range=2, thresholds_k=1, quota=True)
    storage = optuna.storages.InMemoryStorage()
    _, study = tune_rule(probs, y, classes, space, storage=storage, study_prefix="in", n_trials=30, seed=0)
    nested = nested_estimate([probs], y, folds, classes, space, weights=np.ones(1), blend_space="prob",
                             storage=storage, study_prefix="nested", n_trials=30, seed=0)
    assert study.best_value > macro_f1(y, probs.argmax(1), n_cls)  # tuning fits the noise in-sample
    assert nested["macro_f1"] <= study.best_value
    assert abs(nested["macro_f1"] - 1 / n_cls) < 0.06  # held out, it is chance
    assert sorted(nested["fold_macro_f1"]) == [0, 1, 2] and (nested["pred"] >= 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_resumed_study_continues_its_trials(tmp_path, kind):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    probs = _probs(rng, y, 3, 1.0)
    spec = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'study.journal'}"
    args = dict(study_prefix="resume", seed=0, prior=class_prior(y, 3))
    _, first = tune_rule(probs, y, ["a", "b", "c"], RuleSpace(), storage=make_storage(spec), n_trials=6, **args)
    before = [(t.number, t.params) for t in first.trials]
    # the trials are on disk: a fresh storage object sees them before anything reruns
    assert n_finished(optuna.load_study(study_name=first.study_name, storage=make_storage(spec))) == 6
    # a new process: fresh storage object on the same file, a larger budget
    _, resumed = tune_rule(probs, y, ["a", "b", "c"], RuleSpace(), storage=make_storage(spec), n_trials=12, **args)
    assert resumed.study_name == first.study_name
    assert n_finished(resumed) == 12
    assert [(t.number, t.params) for t in resumed.trials[:6]] == before
    # its new random trials are new points, not the first run's draws again
    assert not {str(t.params) for t in resumed.trials[6:]} & {str(p) for _, p in before}
    # at its budget, rerunning adds nothing; different inputs get a different study
    _, again = tune_rule(probs, y, ["a", "b", "c"], RuleSpace(), storage=make_storage(spec), n_trials=12, **args)
    assert len(again.trials) == 12
    _, other = tune_rule(probs[::-1].copy(), y, ["a", "b", "c"], RuleSpace(), storage=make_storage(spec),
                         n_trials=2, **args)
    assert other.study_name != first.study_name and len(other.trials) == 2


# ---------------------------------------------------------------- blending and member checks

def test_blend_weights_sum_to_one_and_favour_the_informative_member():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), [20, 40, 80, 160])
    good, noise = _probs(rng, y, 4, 3.0), rng.dirichlet(np.ones(4), len(y))
    for space in ("prob", "logit"):
        w = fit_weights([good, noise, good], y, space)
        assert w.sum() == pytest.approx(1.0, abs=1e-12) and (w >= 0).all()
        assert w[1] < 0.1  # the noise member is (nearly) dropped
        blended = combine([good, noise, good], w, space)
        np.testing.assert_allclose(blended.sum(1), 1.0, atol=1e-9)
    members = [None, None]
    w, _ = resolve_weights([3, 1], members, "prob")
    np.testing.assert_allclose(w, [0.75, 0.25])
    with pytest.raises(WBCError, match="2 non-negative weights"):
        resolve_weights([1, -1], members, "prob")


def _edit_oof(run, fn):
    df = pd.read_csv(run / "oof.csv", dtype={"ID": str, "labels": str}, keep_default_na=False)
    fn(df)
    df.to_csv(run / "oof.csv", index=False)


def _drop_row(df):
    df.drop(index=5, inplace=True)


def _rename_id(df):
    df.loc[7, "ID"] = "intruder.jpg"


def _move_fold(df):
    df.loc[9, "fold"] = (df.loc[9, "fold"] + 1) % 3


def _relabel(df):
    df.loc[9, "labels"] = "EO"  # img0009 is a BA image


@pytest.mark.parametrize("edit, match", [
    (_drop_row, r"run_b/oof.csv: IDs differ .*1 ID\(s\) of .*missing, e.g. img0005"),
    (_rename_id, r"run_b/oof.csv: IDs differ .*intruder.jpg"),
    (_move_fold, r"run_b/oof.csv:11: ID img0009.jpg has fold [012], but fold [012] in .*run_a/oof.csv"),
    (_relabel, r"run_b/oof.csv:11: ID img0009.jpg has label EO, but label BA in .*run_a/oof.csv"),
])
def test_mismatched_members_are_refused(runs, edit, match):
    a, b = runs
    _edit_oof(b, edit)
    with pytest.raises(WBCError, match=match):
        check_members([load_member(a), load_member(b)])


def test_members_with_other_classes_are_refused(runs):
    a, b = runs
    for f in ("oof.csv", "eval.csv", "test.csv"):
        df = pd.read_csv(b / f, dtype={"ID": str, "labels": str}, keep_default_na=False)
        df.rename(columns={"prob_MO": "prob_XX"}).replace({"labels": {"MO": "XX"}}).to_csv(b / f, index=False)
    with pytest.raises(WBCError, match=r"run_b/oof.csv: classes BA, EO, LY, XX, NE differ from BA, EO, LY, MO, NE"):
        check_members([load_member(a), load_member(b)])


def test_members_must_hold_probabilities(runs):
    a, _ = runs
    df = pd.read_csv(a / "test.csv", dtype={"ID": str, "labels": str}, keep_default_na=False)
    df.loc[3, "prob_NE"] += 2.0  # e.g. logits instead of probabilities
    df.to_csv(a / "test.csv", index=False)
    with pytest.raises(WBCError, match=r"run_a/test.csv:5: probabilities of ID te003.jpg are not a distribution"):
        load_member(a)


def test_member_checks_eval_and_class_order(runs):
    a, b = runs
    # the same classes in another column order are realigned, not refused
    df = pd.read_csv(b / "test.csv", dtype={"ID": str, "labels": str}, keep_default_na=False)
    df[["ID", "labels"] + [f"prob_{c}" for c in CLASSES[::-1]]].to_csv(b / "test.csv", index=False)
    m = check_members([load_member(a), load_member(b)])
    np.testing.assert_allclose(m[1].test.probs, load_probs(b / "test.csv").probs[:, ::-1])
    (b / "eval.csv").unlink()
    with pytest.raises(WBCError, match=r"run_b/eval.csv: missing, but .*run_a/eval.csv exists"):
        check_members([load_member(a), load_member(b)])
    (a / "eval.csv").unlink()
    # eval images that were also trained on would make the eval score dishonest
    leak = load_probs(a / "oof.csv").subset(np.arange(3))
    for run in (a, b):
        save_probs(run / "eval.csv", Probs(leak.ids, leak.probs, CLASSES, labels=leak.labels))
    with pytest.raises(WBCError, match="also in the OOF pool"):
        check_members([load_member(a), load_member(b)])


@pytest.mark.parametrize("space", ["prob", "logit"])
def test_a_seed_group_is_one_member_averaged_with_equal_weights(runs, space):
    a, b = runs
    a2 = _make_run(a.parent, "run_a_seed2", 7, 2.0)
    group = load_member([str(a), str(a2)], space)
    assert group.name == "run_a+run_a_seed2" and group.paths == (a, a2)
    for split in ("oof", "eval", "test"):
        want = combine([getattr(load_member(r), split).probs for r in (a, a2)], [0.5, 0.5], space)
        np.testing.assert_allclose(getattr(group, split).probs, want, atol=1e-12)
    np.testing.assert_array_equal(group.oof.folds, load_member(a).oof.folds)
    members = check_members([group, load_member(b)])
    assert [m.paths for m in members] == [(a, a2), (b,)]
    # a list of one run is that run
    np.testing.assert_array_equal(load_member([str(a)]).oof.probs, load_member(a).oof.probs)


def test_a_seed_group_must_share_the_folds(runs):
    a, _ = runs
    a2 = _make_run(a.parent, "run_a_seed2", 7, 2.0)
    _edit_oof(a2, _move_fold)
    with pytest.raises(WBCError, match=r"run_a_seed2/oof.csv:11: ID img0009.jpg has fold [012], but fold [012]"):
        load_member([str(a), str(a2)])
    for bad in ([], [{"run": str(a)}], 3):
        with pytest.raises(WBCError, match="is not a run folder or a list of run folders"):
            load_member(bad)


# ---------------------------------------------------------------- the command

def _data_root(tmp_path, test_ids):
    root = tmp_path / "data"
    root.mkdir()
    pd.DataFrame({"ID": test_ids, "labels": ""}).to_csv(root / "phase2_test.csv", index=False)
    # a labelled split: the dataset's classes, which a submission is checked against
    pd.DataFrame({"ID": [f"lab{c}.jpg" for c in CLASSES], "labels": CLASSES}).to_csv(root / "phase1_label.csv",
                                                                                     index=False)
    return root


def test_ensemble_command_end_to_end(tmp_path, runs):
    a, b = runs
    test_ids = list(load_probs(a / "test.csv").ids)
    root = _data_root(tmp_path, test_ids)
    cfg_file = tmp_path / "demo.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "demo", "ensemble": {
        "members": [str(a), str(b)], "blend": {"space": "prob", "weights": "fit"},
        "tuning": {"n_trials": 8, "seed": 0, "thresholds_k": 1, "quota": True, "nested": True,
                   "storage": f"journal:{tmp_path / 'ens.journal'}"},
        "submit_dir": str(tmp_path / "subs")}}))
    argv = ["ensemble", "--config", str(cfg_file), f"output_dir={tmp_path / 'out'}", f"data.root={root}"]
    assert main(argv) == 0
    out = tmp_path / "out" / "ensemble" / "demo"
    for f in ("oof.csv", "eval.csv", "test.csv", "oof_pred.csv", "eval_pred.csv", "test_pred.csv", "decision.json",
              "report.json", "confusion_oof.png", "confusion_eval.png"):
        assert (out / f).is_file(), f

    decision = json.loads((out / "decision.json").read_text())
    assert sum(decision["blend"]["weights"].values()) == pytest.approx(1.0)
    assert decision["blend"]["weights"]["run_a"] > decision["blend"]["weights"]["run_b"]  # the stronger member
    rule = load_rule(out / "decision.json")

    oof = load_probs(out / "oof.csv")
    assert oof.folds is not None and (oof.labels != "").all() and len(oof.ids) == sum(COUNTS)
    expected = combine([load_probs(a / "oof.csv").probs, load_probs(b / "oof.csv").probs],
                       list(decision["blend"]["weights"].values()), "prob")
    np.testing.assert_allclose(oof.probs, expected, atol=1e-9)

    # every decision file is the rule applied to the blended probabilities of the same IDs
    for split in ("oof", "eval", "test"):
        p = load_probs(out / f"{split}.csv")
        pred = pd.read_csv(out / f"{split}_pred.csv", dtype=str, keep_default_na=False)
        assert pred["ID"].tolist() == list(p.ids)
        assert pred["labels"].tolist() == [CLASSES[i] for i in apply_rule(p.probs, rule)]

    report = json.loads((out / "report.json").read_text())
    final = report["final_step"]
    ev = load_probs(out / "eval.csv")
    eval_pred = pd.read_csv(out / "eval_pred.csv", dtype=str, keep_default_na=False)["labels"]
    assert report["scores"]["eval"][final]["macro_f1"] == pytest.approx(
        macro_f1(ev.label_index(), eval_pred.map(CLASSES.index), 5))
    in_sample = report["scores"]["oof"][final]["macro_f1"]
    assert in_sample >= report["scores"]["oof"]["blend"]["macro_f1"]  # the plain argmax is a start point
    assert 0 < report["scores"]["oof_nested"] <= 1 and sorted(report["nested"]["fold_macro_f1"]) == ["0", "1", "2"]
    assert set(report["scores"]["oof"]) >= {"run_a", "run_b", "blend", "+bias"}
    # the submitted step's held-out decisions, which score as its nested estimate
    held = pd.read_csv(out / "oof_nested_pred.csv", dtype=str, keep_default_na=False)
    assert held["ID"].tolist() == list(oof.ids)
    nested_key = "oof_nested_blend" if final == "blend" else "oof_nested"
    assert macro_f1(oof.label_index(), held["labels"].map(CLASSES.index), 5) == pytest.approx(
        report["scores"][nested_key])

    sub = pd.read_csv(tmp_path / "subs" / "demo.csv", dtype=str, keep_default_na=False)
    test_pred = pd.read_csv(out / "test_pred.csv", dtype=str, keep_default_na=False)
    assert sub["ID"].tolist() == test_ids
    assert sub.set_index("ID")["labels"].to_dict() == test_pred.set_index("ID")["labels"].to_dict()
    assert json.loads((tmp_path / "subs" / "demo.json").read_text())["oof_macro_f1"] == pytest.approx(in_sample)

    # a rerun resumes the finished studies: no new trials, the same rule
    finished = decision["study"]["finished_trials"]
    report2 = run_ensemble(load_config(cfg_file, argv[3:]))
    decision2 = json.loads((out / "decision.json").read_text())
    assert decision2["study"]["finished_trials"] == finished == 8
    assert decision2["rule"] == decision["rule"]
    assert report2["scores"]["oof_nested"] == report["scores"]["oof_nested"]


def test_ensemble_command_blends_a_seed_group_as_one_member(tmp_path, runs):
    a, b = runs
    a2 = _make_run(a.parent, "run_a_seed2", 7, 2.0)
    root = _data_root(tmp_path, list(load_probs(a / "test.csv").ids))
    cfg_file = tmp_path / "seeds.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "seeds", "ensemble": {
        "members": [[str(a), str(a2)], str(b)], "blend": {"space": "logit", "weights": "fit"},
        "tuning": {"n_trials": 4, "seed": 0, "nested": False, "storage": f"journal:{tmp_path / 'ens.journal'}"},
        "submit": False}}))
    assert main(["ensemble", "--config", str(cfg_file), f"output_dir={tmp_path / 'out'}", f"data.root={root}"]) == 0
    out = tmp_path / "out" / "ensemble" / "seeds"
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["members"]] == ["run_a+run_a_seed2", "run_b"]
    assert report["members"][0]["path"] == [str(a), str(a2)] and report["members"][1]["path"] == str(b)
    weights = [m["weight"] for m in report["members"]]
    group = combine([load_probs(r / "oof.csv").probs for r in (a, a2)], [0.5, 0.5], "logit")
    want = combine([group, load_probs(b / "oof.csv").probs], weights, "logit")
    np.testing.assert_allclose(load_probs(out / "oof.csv").probs, want, atol=1e-9)


def test_ensemble_command_reports_bad_members(tmp_path, runs, capsys):
    a, b = runs
    _edit_oof(b, lambda df: df.drop(index=0, inplace=True))
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "bad", "ensemble": {"members": [str(a), str(b)], "submit": False}}))
    assert main(["ensemble", "--config", str(cfg_file), f"output_dir={tmp_path / 'out'}"]) == 2
    assert "run_b/oof.csv: IDs differ" in capsys.readouterr().out
    assert not (tmp_path / "out" / "ensemble" / "bad").exists()  # nothing half-written
    cfg_file.write_text(yaml.safe_dump({"name": "bad", "ensemble": {"members": [str(a)], "tuning": {"n_trails": 5}}}))
    assert main(["ensemble", "--config", str(cfg_file)]) == 2
    assert "unknown config key(s) ensemble.tuning.n_trails" in capsys.readouterr().out
    root = _data_root(tmp_path, list(load_probs(a / "test.csv").ids))
    cfg_file.write_text(yaml.safe_dump({"name": "bad", "data": {"classes": [*CLASSES, "ZZ"]},
                                        "ensemble": {"members": [str(a)]}}))
    assert main(["ensemble", "--config", str(cfg_file), f"output_dir={tmp_path / 'out'}", f"data.root={root}"]) == 2
    assert f"predicts classes {','.join(CLASSES)}, but the dataset's are" in capsys.readouterr().out
    assert not (tmp_path / "out" / "ensemble" / "bad").exists()  # refused before anything is written
    cfg_file.write_text(yaml.safe_dump({"name": "bad",
                                        "ensemble": {"members": [str(a)], "tuning": {"select": "nestd"}}}))
    assert main(["ensemble", "--config", str(cfg_file)]) == 2
    assert "ensemble.tuning.select: 'nestd' is not nested or tuned" in capsys.readouterr().out


@pytest.mark.parametrize("select,blend_wins,final", [("nested", True, "blend"), ("nested", False, "tuned"),
                                                      ("tuned", True, "tuned")])
def test_ensemble_submits_the_blend_when_the_rule_loses_out_of_sample(tmp_path, runs, monkeypatch, select,
                                                                      blend_wins, final):
    import wbc.s5_ensemble.run as run_mod

    a, b = runs
    root = _data_root(tmp_path, list(load_probs(a / "test.csv").ids))
    n = len(load_probs(a / "oof.csv").ids)
    fake = {"macro_f1": 0.5, "blend_macro_f1": 0.6 if blend_wins else 0.4, "fold_macro_f1": {}, "fold_weights": {},
            "pred": np.zeros(n, int), "pred_blend": np.ones(n, int)}
    monkeypatch.setattr(run_mod, "nested_estimate", lambda *a, **k: fake)
    real_tune = run_mod.tune_rule

    def planted_tune(*a, **k):  # a rule that surely differs from the argmax, so submitted step != blend shows
        rule, study = real_tune(*a, **k)
        return dict(rule, bias={c: 3.0 if c == "BA" else 0.0 for c in CLASSES}), study

    monkeypatch.setattr(run_mod, "tune_rule", planted_tune)
    cfg_file = tmp_path / "sel.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "sel", "ensemble": {
        "members": [str(a), str(b)],
        "tuning": {"n_trials": 4, "seed": 0, "select": select, "storage": f"journal:{tmp_path / 'j.journal'}"},
        "submit_dir": str(tmp_path / "subs")}}))
    report = run_ensemble(load_config(cfg_file, [f"output_dir={tmp_path / 'out'}", f"data.root={root}"]))
    out = tmp_path / "out" / "ensemble" / "sel"
    test = load_probs(out / "test.csv")
    pred = pd.read_csv(out / "test_pred.csv", dtype=str, keep_default_na=False)["labels"].tolist()
    if final == "blend":
        assert report["final_step"] == "blend"
        assert pred == [CLASSES[i] for i in test.probs.argmax(1)]
        assert not any(load_rule(out / "decision.json")["bias"].values())
    else:
        assert report["final_step"] != "blend"
    assert report["scores"]["oof_nested_blend"] == fake["blend_macro_f1"]
    # the sidecar's nested score is the submitted step's
    sidecar = json.loads((tmp_path / "subs" / "sel.json").read_text())
    assert sidecar["oof_nested_macro_f1"] == fake["blend_macro_f1" if final == "blend" else "macro_f1"]
    assert (sidecar["oof_nested_blend"], sidecar["oof_nested_rule"]) == (fake["blend_macro_f1"], fake["macro_f1"])
    held = pd.read_csv(out / "oof_nested_pred.csv", dtype=str, keep_default_na=False)["labels"]
    assert (held == CLASSES[1 if final == "blend" else 0]).all()  # the submitted step's held-out decisions
    # eval decisions and the sidecar's eval score are the submitted step's too
    ev = load_probs(out / "eval.csv")
    eval_pred = pd.read_csv(out / "eval_pred.csv", dtype=str, keep_default_na=False)["labels"].tolist()
    assert eval_pred == [CLASSES[i] for i in apply_rule(ev.probs, load_rule(out / "decision.json"))]
    assert (eval_pred == [CLASSES[i] for i in ev.probs.argmax(1)]) == (final == "blend")
    assert sidecar["eval_macro_f1"] == pytest.approx(report["scores"]["eval"][report["final_step"]]["macro_f1"])


def test_blend_weights_follow_the_shift_weights():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 400)
    # Member a is informative on the first half of the images, member b on the second half.
    half = np.arange(400) < 200
    a = _probs(rng, y, 5, 0.0)
    a[half] = _probs(rng, y[half], 5, 4.0)
    b = _probs(rng, y, 5, 0.0)
    b[~half] = _probs(rng, y[~half], 5, 4.0)
    plain = fit_weights([a, b], y)
    towards_second = fit_weights([a, b], y, sample_weight=np.where(half, 0.1, 1.9))
    assert abs(plain[0] - 0.5) < 0.1 and towards_second[1] > 0.8 and towards_second.sum() == pytest.approx(1.0)


def test_ensemble_with_shift_weights(tmp_path, runs):
    a, b = runs
    oof = load_probs(a / "oof.csv")
    root = _data_root(tmp_path, list(load_probs(a / "test.csv").ids))
    # The shift weights favour the head class NE: weighted scores must follow them.
    wfile = tmp_path / "weights.csv"
    pd.DataFrame({"ID": oof.ids, "weight": np.where(oof.labels == "NE", 3.0, 0.5)}).to_csv(wfile, index=False)
    cfg_file = tmp_path / "shifted.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "shifted", "ensemble": {
        "members": [str(a), str(b)], "shift_weights": str(wfile), "submit": False,
        "tuning": {"n_trials": 6, "nested_trials": 4, "seed": 0, "storage": f"journal:{tmp_path / 'ens.journal'}"}}}))
    argv = [f"output_dir={tmp_path / 'out'}", f"data.root={root}"]
    report = run_ensemble(load_config(cfg_file, argv))
    out = tmp_path / "out" / "ensemble" / "shifted"
    pred = pd.read_csv(out / "oof_pred.csv", dtype=str, keep_default_na=False)["labels"].map(CLASSES.index)
    w = np.where(oof.labels == "NE", 3.0, 0.5)
    final = report["final_step"]
    assert report["scores"]["oof_shift_weighted"][final] == pytest.approx(
        macro_f1(oof.label_index(), pred.to_numpy(), 5, w / w.mean()))
    assert report["scores"]["oof_shift_weighted"][final] != pytest.approx(report["scores"]["oof"][final]["macro_f1"])
    assert "macro_f1_unweighted" in report["nested"]
    assert json.loads((out / "decision.json").read_text())["shift_weights"] == str(wfile)

    pd.DataFrame({"ID": oof.ids[1:], "weight": 1.0}).to_csv(wfile, index=False)
    with pytest.raises(WBCError, match=f"no weight for OOF image {oof.ids[0]}"):
        run_ensemble(load_config(cfg_file, argv))


def test_quota_serves_the_rarest_class_first():
    # all rows argmax a; targets a 6, b 3, c 1. Row 0 is c's best candidate and a's top row: served rarest
    # first, c gets it; served commonest first, a would lock it and leave c its worst row.
    p = np.array([[0.50, 0.10, 0.40], [0.49, 0.41, 0.10], [0.48, 0.40, 0.12], [0.47, 0.39, 0.14],
                  [0.46, 0.30, 0.24], [0.45, 0.29, 0.26], [0.44, 0.28, 0.28], [0.43, 0.27, 0.30],
                  [0.42, 0.26, 0.32], [0.41, 0.25, 0.34]])
    pred = apply_rule(p, make_rule(["a", "b", "c"], [0, 0, 0], {}, 1.0, [0.6, 0.3, 0.1]))
    assert pred.tolist() == [2, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_tuning_starts_from_the_argmax_then_logit_adjustment():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), [20, 50, 130])
    probs = _probs(rng, y, 3, 1.0)
    space = RuleSpace(tau_max=2.0, bias_range=1.0, thresholds_k=1, quota=True)
    _, study = tune_rule(probs, y, ["a", "b", "c"], space, storage=optuna.storages.InMemoryStorage(),
                         study_prefix="start", n_trials=3, seed=0)
    base = {"b_a": 0.0, "b_b": 0.0, "b_c": 0.0, "t_a": 1.0, "quota": 0.0}  # the threshold is on the rarest class, a
    assert study.trials[0].params == dict(base, tau=0.0)
    assert study.trials[1].params == dict(base, tau=1.0)
    assert study.trials[0].value == pytest.approx(macro_f1(y, probs.argmax(1), 3))


def test_blend_weights_balance_the_classes():
    # a is sure of the rare class and unsure of the head class, b the other way round: with each class
    # counting the same, neither member wins; counted per image, the head class would hand b the blend.
    y = np.repeat([0, 1], [10, 190])
    a = np.where(y[:, None] == 0, [0.9, 0.1], [0.5, 0.5])
    b = np.where(y[:, None] == 0, [0.5, 0.5], [0.1, 0.9])
    for space in ("prob", "logit"):
        np.testing.assert_allclose(fit_weights([a, b], y, space), [0.5, 0.5], atol=0.02)


def test_logit_blend_is_the_softmax_of_the_weighted_log_probabilities():
    p1, p2 = np.array([[0.7, 0.2, 0.1]]), np.array([[0.1, 0.3, 0.6]])
    got = combine([p1, p2], [0.25, 0.75], "logit")
    expected = softmax(0.25 * np.log(p1) + 0.75 * np.log(p2), axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_allclose(combine([p1, p2], [0.25, 0.75], "prob"), 0.25 * p1 + 0.75 * p2, atol=1e-12)
    assert not np.allclose(got, 0.25 * p1 + 0.75 * p2, atol=1e-3)


@pytest.mark.parametrize("part", ["test", "eval"])
def test_member_test_and_eval_ids_are_checked_and_aligned(runs, part):
    a, b = runs
    f = b / f"{part}.csv"
    df = pd.read_csv(f, dtype={"ID": str, "labels": str}, keep_default_na=False)
    df.iloc[::-1].to_csv(f, index=False)  # same IDs, other row order: realigned by ID
    m = check_members([load_member(a), load_member(b)])
    got = getattr(m[1], part)
    assert list(got.ids) == list(getattr(m[0], part).ids)
    np.testing.assert_allclose(got.probs, load_probs(f).align(got.ids).probs)
    df.drop(index=3).to_csv(f, index=False)
    with pytest.raises(WBCError, match=rf"run_b/{part}.csv: IDs differ .*1 ID\(s\) of .*missing"):
        check_members([load_member(a), load_member(b)])


def test_quota_is_tuned_when_it_is_the_only_lever():
    # c (rare) is never the argmax, but its probability ranks its own images first: only a quota can use it
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(3), [120, 60, 20])
    z = rng.normal(0, 0.3, (len(y), 3)) + [1.0, 0.8, -2.0]
    z[np.arange(len(y)), y] += 1.5
    probs = softmax(z, axis=1)
    assert (probs.argmax(1) != 2).all()
    space = RuleSpace(tau_max=0, bias_range=0, quota=True)
    rule, study = tune_rule(probs, y, ["a", "b", "c"], space, storage=optuna.storages.InMemoryStorage(),
                            study_prefix="quota", n_trials=15, seed=0)
    plain = macro_f1(y, probs.argmax(1), 3)
    assert rule["quota"] == study.best_params["quota"] > 0.5
    assert study.best_value == pytest.approx(macro_f1(y, apply_rule(probs, rule), 3))
    assert study.best_value > plain + 0.15


def test_tuning_is_seeded():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, 200)
    probs = _probs(rng, y, 3, 1.0)
    params = [[t.params for t in tune_rule(probs, y, ["a", "b", "c"], RuleSpace(), study_prefix="seed",
                                            storage=optuna.storages.InMemoryStorage(), n_trials=6, seed=seed)[1].trials]
              for seed in (0, 0, 1)]
    assert params[0] == params[1] and params[0][2:] != params[2][2:]  # trials 0-1 are the fixed start points


def test_report_steps_add_one_part_of_the_rule_at_a_time():
    rule = make_rule(["a", "b", "c"], [0.1, 0.0, -0.2], {"c": 0.3}, 0.8, [0.5, 0.3, 0.2])
    steps = dict(rule_steps(rule))
    assert list(steps) == ["+bias", "+thresholds", "+quota"]
    assert steps["+bias"] == dict(rule, thresholds={}, quota=0.0, pairs={})
    assert steps["+thresholds"] == dict(rule, quota=0.0, pairs={})
    assert steps["+quota"] == rule
    assert [s for s, _ in rule_steps(dict(rule, thresholds={}, quota=0.0))] == ["+bias"]
    paired = make_rule(["a", "b", "c"], [0.1, 0.0, -0.2], {}, 0.8, [0.5, 0.3, 0.2], pairs={"a|b": 0.4})
    steps = dict(rule_steps(paired))
    assert list(steps) == ["+bias", "+pairs", "+quota"] and steps["+pairs"] == dict(paired, quota=0.0)
    assert steps["+bias"]["pairs"] == {}


def test_nested_estimate_refits_the_blend_weights_without_the_held_out_fold():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 300)
    folds = np.arange(300) % 3
    good, weak = _probs(rng, y, 3, 2.0), _probs(rng, y, 3, 0.5)
    good[folds == 0] = _probs(rng, y[folds == 0], 3, 0.0)  # good is useless on fold 0 only
    nested = nested_estimate([good, weak], y, folds, ["a", "b", "c"], RuleSpace(tau_max=0, bias_range=0),
                             weights=None, blend_space="prob", storage=optuna.storages.InMemoryStorage(),
                             study_prefix="nw", n_trials=1, seed=0)
    for k in range(3):
        tr = folds != k
        np.testing.assert_allclose(nested["fold_weights"][k], fit_weights([good[tr], weak[tr]], y[tr]), atol=1e-9)
    assert nested["fold_weights"][0][0] > nested["fold_weights"][1][0] + 0.1


def test_members_that_finished_other_folds_blend_on_the_common_ones(tmp_path, runs):
    """A run that finished only some folds (a time-boxed GPU call) is refused with the way out named; with
    `ensemble.folds` every member and the rule use those folds' OOF rows only."""
    a, b = runs
    _edit_oof(b, lambda df: df.drop(df.index[df["fold"] == 2], inplace=True))
    with pytest.raises(WBCError, match=r"run_b/oof.csv: covers folds 0, 1, but .*run_a/oof.csv covers 0, 1, 2: "
                                       r"train the missing folds, or .* ensemble.folds=\[0,1\]"):
        check_members([load_member(a), load_member(b)])
    with pytest.raises(WBCError, match=r"run_b/oof.csv: fold\(s\) 2 of ensemble.folds not in this file"):
        load_member(b, folds=[0, 2])
    members = check_members([load_member(a, folds=[0, 1]), load_member(b, folds=[0, 1])])
    folds = load_probs(a / "oof.csv").folds
    assert [len(m.oof.ids) for m in members] == [int((folds < 2).sum())] * 2
    assert set(members[0].oof.folds.tolist()) == {0, 1}

    root = _data_root(tmp_path, list(load_probs(a / "test.csv").ids))
    cfg_file = tmp_path / "partial.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "partial", "ensemble": {
        "members": [str(a), str(b)], "folds": [0, 1],
        "tuning": {"n_trials": 4, "seed": 0, "nested": True, "storage": f"journal:{tmp_path / 'p.journal'}"},
        "submit_dir": str(tmp_path / "subs")}}))
    assert main(["ensemble", "--config", str(cfg_file), f"output_dir={tmp_path / 'out'}", f"data.root={root}"]) == 0
    report = json.loads((tmp_path / "out" / "ensemble" / "partial" / "report.json").read_text())
    assert report["folds"] == [0, 1] and report["n"]["oof"] == int((folds < 2).sum())
    assert json.loads((tmp_path / "subs" / "partial.json").read_text())["folds"] == [0, 1]
    cfg_file.write_text(cfg_file.read_text().replace("- 0\n  - 1", "- 1"))
    assert main(["ensemble", "--config", str(cfg_file), f"output_dir={tmp_path / 'out'}", f"data.root={root}"]) == 2


def test_a_pair_margin_moves_rows_only_between_its_two_classes():
    classes = ["a", "b", "c"]
    probs = np.array([[0.40, 0.50, 0.10],   # b by argmax; a with a margin above log(0.5 / 0.4)
                      [0.20, 0.70, 0.10],   # b either way below log(0.7 / 0.2)
                      [0.30, 0.25, 0.45],   # c: no margin between a and b touches it
                      [0.05, 0.60, 0.35]])  # b, but c by threshold: the pair leaves it to the threshold
    rule = make_rule(classes, [0, 0, 0], {"c": 0.3}, 0.0, [1 / 3] * 3)
    plain = apply_rule(probs, rule)
    assert plain.tolist() == [1, 1, 2, 2]
    assert apply_rule(probs, {**rule, "pairs": {"a|b": 0.0}}).tolist() == plain.tolist()  # margin 0: identity
    assert apply_rule(probs, {**rule, "pairs": {"a|b": 0.5}}).tolist() == [0, 1, 2, 2]
    assert apply_rule(probs, {**rule, "pairs": {"a|b": 2.0}}).tolist() == [0, 0, 2, 2]
    with pytest.raises(WBCError, match="unknown class"):
        apply_rule(probs, {**rule, "pairs": {"a|z": 1.0}})


def test_tuned_pair_margin_separates_two_neighbouring_stages():
    """True a rows look like (0.4, 0.5, 0.1), true b rows (0.2, 0.7, 0.1): argmax calls all of them b; only a margin in
    (log 1.25, log 3.5) between a and b gets both right, with the class biases off."""
    classes = ["a", "b", "c"]
    probs = np.array([[0.4, 0.5, 0.1]] * 20 + [[0.2, 0.7, 0.1]] * 30 + [[0.1, 0.1, 0.8]] * 10)
    y = np.array([0] * 20 + [1] * 30 + [2] * 10)
    space = RuleSpace.from_cfg({"tau_max": 0, "bias_range": 0, "pairs": [["a", "b"]], "pair_range": 2.0})
    rule, _ = tune_rule(probs, y, classes, space, storage=optuna.storages.InMemoryStorage(), study_prefix="p",
                        n_trials=40, seed=0)
    assert np.log(1.25) < rule["pairs"]["a|b"] < np.log(3.5)
    assert macro_f1(y, apply_rule(probs, rule), 3) == 1.0
    with pytest.raises(WBCError, match="not among the classes"):
        tune_rule(probs, y, classes, RuleSpace.from_cfg({"pairs": [["a", "z"]]}),
                  storage=optuna.storages.InMemoryStorage(), study_prefix="p", n_trials=1, seed=0)
    with pytest.raises(WBCError, match="two different classes"):
        RuleSpace.from_cfg({"pairs": [["a", "a"]]})


def test_a_garbage_journal_is_one_line(tmp_path):
    (tmp_path / "study.journal").write_text("garbage\n{\"op_code\": \n")  # only a torn last line is skipped
    with pytest.raises(WBCError, match=r"study.journal: not an Optuna journal"):
        make_storage(f"journal:{tmp_path / 'study.journal'}")
