"""`label-issues`: confident learning finds planted label flips, does not flag a rare class for being uncertain,
and writes the review files and the QA sheet of the sample data's images."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest

from helpers import peaked
from wbc.core.errors import WBCError
from wbc.core.io import Probs, save_probs
from wbc.optional.label_issues import confident_joint, find_issues, label_issues
from wbc.s1_data.layout import read_splits

CLASSES = ["H", "M", "R"]


def test_planted_flips_are_found_and_an_uncertain_rare_class_is_not_flagged():
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], [300, 100, 20])
    probs = peaked(rng, truth, 3, 0.85)
    # the rare class R: the models hesitate between R and H on every R image (p_R ~ 0.45, p_H ~ 0.5)
    r = truth == 2
    probs[r] = np.column_stack([rng.uniform(0.45, 0.55, r.sum()), np.full(r.sum(), 0.02), np.zeros(r.sum())])
    probs[r, 2] = 1 - probs[r, :2].sum(1)
    given = truth.copy()
    flipped = rng.choice(np.flatnonzero(truth < 2), 12, replace=False)
    given[flipped] = 1 - truth[flipped]  # H <-> M, which the models are sure of (an error above the usual confidence)
    probs[flipped] = peaked(rng, truth[flipped], 3, 0.97)
    ids = [f"img{i}" for i in range(len(truth))]

    issues, c, t = find_issues(ids, probs, np.array(CLASSES)[given], CLASSES, folds=np.arange(len(truth)) % 5)
    assert set(issues["ID"]) == {ids[i] for i in flipped}
    assert (issues["suspected"].to_numpy() == np.array(CLASSES)[truth[[int(i[3:]) for i in issues["ID"]]]]).all()
    assert issues["margin"].is_monotonic_decreasing and list(issues.columns[:2]) == ["ID", "fold"]
    assert c.sum() <= len(truth) and c[2, 2] > 0 and c[2, 0] == 0  # R stays R: its threshold is its own ~0.47
    assert t[2] == pytest.approx(probs[r, 2].mean())
    # an argmax test would have flagged R images as H
    assert (probs[r].argmax(1) == 0).sum() > 0

    cj, sus, _ = confident_joint(np.array([[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]]), np.array([0, 1, 1]))
    # thresholds t = [0.6, (0.8 + 0.5) / 2 = 0.65]; row 2 reaches neither
    assert sus.tolist() == [0, 1, -1] and cj.tolist() == [[1, 0], [0, 1]]

    # A hard class with a low threshold: row 2 reaches class 1's t = 0.45 only, yet still prefers its label 0.
    # It is off the confident joint's diagonal, but listed only when min_margin lets a negative margin through.
    probs2 = np.array([[0.9, 0.1], [0.8, 0.2], [0.55, 0.45], [0.6, 0.4], [0.5, 0.5]])
    labels2 = np.array(["a", "a", "a", "b", "b"])
    cj, sus, t = confident_joint(probs2, np.array([0, 0, 0, 1, 1]))
    assert t.tolist() == pytest.approx([0.75, 0.45]) and sus.tolist() == [0, 0, 1, -1, 1] and cj[0, 1] == 1
    assert find_issues(list("vwxyz"), probs2, labels2, ["a", "b"])[0].empty
    assert find_issues(list("vwxyz"), probs2, labels2, ["a", "b"], min_margin=-1)[0]["ID"].tolist() == ["x"]


def test_label_issues_writes_the_review_files_and_sheet(sample_root, make_cfg, tmp_path):
    cfg = make_cfg(sample_root)
    pool = read_splits(sample_root, cfg["data"]["train_splits"])
    classes = sorted(pool["labels"].unique())
    y = pool["labels"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    rng = np.random.default_rng(1)
    probs = peaked(rng, y, len(classes), 0.8)
    given = y.copy()
    given[:3] = (y[:3] + 1) % len(classes)
    probs[:3] = peaked(rng, y[:3], len(classes), 0.97)
    run = tmp_path / "outputs" / "myrun"
    save_probs(run / "oof.csv", Probs(pool["ID"], probs, classes, np.arange(len(y)) % 2,
                                      np.array(classes)[given]))
    rep = label_issues(cfg, run, top=2)
    out = tmp_path / "outputs" / "label_issues" / "myrun"
    issues = pd.read_csv(out / "issues.csv", keep_default_na=False)
    assert set(issues["ID"]) == set(pool["ID"][:3]) and rep["flagged"] == 3
    assert json.loads((out / "report.json").read_text())["per_class"][classes[0]]["images"] == int((given == 0).sum())
    cj = pd.read_csv(out / "confident_joint.csv")
    assert list(cj.columns) == ["given"] + classes and cj[classes].to_numpy().sum() <= len(y)
    sheet = cv2.imread(str(out / "sheet.png"))
    assert sheet.shape[:2] == (150, 150 * 8)  # two tiles, padded to a row of eight

    save_probs(run / "oof.csv", Probs(pool["ID"], probs, classes, np.arange(len(y)) % 2, [""] * len(y)))
    with pytest.raises(WBCError, match="every row needs its label"):
        label_issues(cfg, run)
